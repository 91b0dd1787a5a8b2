"""Authentication in `intercept_service`, authorization against the request in a wrapped handler.

The interceptor identifies the caller from `authorization: Bearer <secret>` (or the operator
token) and records what it learnt in a ContextVar of the call's task. Each method's behaviour is
wrapped once (building a handler per call measured about 10% slower on an echo server); once
the request is decoded, the wrapper checks the policy rule against it, resolves the environment
context for context-scoped methods, hands the principal to the handler through a ContextVar, and
turns every domain error into a rich status.

Looking the credential up waits for the wrapper too: refused credentials are throttled per peer
address (`throttle.py`), and only the handler's context knows the peer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.application.access import AccessCache
from service.domain.calls import committed_revision, reached_revision
from service.domain.errors import Denied, DomainError, InvalidArgument, ResourceExhausted, Unauthenticated
from service.domain.policy import POLICY, Level, Rule, authorize
from service.domain.principal import Principal, unauthenticated
from service.domain.redaction import SECRET_PREFIX
from service.transport import context as call_context
from service.transport import enums
from service.transport.bearer_tokens import BearerTokens, VerifierTokens
from service.transport.errors import abort, internal_status, to_status
from service.transport.throttle import AuthFailureThrottle

log = logging.getLogger(__name__)

ENVIRONMENT_HEADER = "x-agentpost-environment"
REQUEST_ID_HEADER = "x-request-id"
# Answered by every successful write: the organization's revision it committed (SPEC §6).
REVISION_HEADER = "x-agentpost-revision"
# Asked by a caller that needs an answer reflecting at least this revision of its organization.
MIN_REVISION_HEADER = "x-agentpost-min-revision"
MAX_REVISION = 2**63 - 1
_MAX_REVISION_DIGITS = len(str(MAX_REVISION))
_MAX_REQUEST_ID = 128
# A request's metadata, counted as HTTP/2 counts a header list (name, value and 32 bytes an
# entry). The server advertises it (grpc.max_metadata_size) and gRPC clients keep to it; other
# HTTP/2 clients are held to it here, before anything is read from the metadata.
MAX_METADATA_BYTES = 16 * 1024
_ENTRY_OVERHEAD = 32


@dataclass(slots=True)
class _Call:
    """What `intercept_service` learnt about one call, for the wrapped handler."""

    rule: Rule | None
    metadata: dict[str, str]
    raw: Sequence[tuple[str, str | bytes]]
    environment: str | None
    request_id: str
    # The bearer secret, kept only for streams (which check the key again as they go).
    credential: str | None = None


# Identifies a call's caller once its peer is known; raises the DomainError that refuses it.
Authenticate = Callable[[_Call, str], Awaitable[Principal | None]]


_current_call: ContextVar[_Call | None] = ContextVar("current_call", default=None)


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a request whose bytes are not a valid message."""

    error: str


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as error:
            return _Undecodable(type(error).__name__)

    return decode


def _repeated(raw: Sequence[tuple[str, str | bytes]], name: str) -> bool:
    """Whether the request metadata holds more than one `name` entry (the dict of it keeps the
    last): which one a proxy or library in between would have used is anyone's guess."""
    return sum(1 for key, _ in raw if key == name) > 1


def _bearer(metadata: dict[str, str], raw: Sequence[tuple[str, str | bytes]]) -> str:
    value = metadata.get("authorization")
    if value is None:
        raise Unauthenticated("send `authorization: Bearer <API key>`", reason="CREDENTIALS_MISSING")
    # `metadata` keeps only the last of repeated keys; which credential a proxy or library in
    # between would have used is anyone's guess, so more than one is refused outright.
    if _repeated(raw, "authorization"):
        raise Unauthenticated("send exactly one authorization metadata entry", reason="CREDENTIALS_MALFORMED")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "the authorization metadata must be `Bearer <API key>`", reason="CREDENTIALS_MALFORMED"
        )
    return token.strip()


# Calls without an x-request-id get `<process prefix>-<counter>`: unique per process, and far
# cheaper on the hot path than a fresh UUID per call.
_REQUEST_ID_PREFIX = secrets.token_hex(4)
_request_numbers = itertools.count(1)


def _request_id(metadata: dict[str, str]) -> str:
    given = metadata.get(REQUEST_ID_HEADER, "")
    # Printable ASCII only: it is echoed in trailing metadata, where gRPC refuses anything else
    # (the answer, even a committed write's, would become INTERNAL), and written in log lines.
    # Nor a secret: a request id is logged and echoed by design.
    if (
        given
        and len(given) <= _MAX_REQUEST_ID
        and given.isascii()
        and given.isprintable()
        and SECRET_PREFIX not in given
    ):
        return given
    return f"{_REQUEST_ID_PREFIX}-{next(_request_numbers):x}"


def _min_revision(metadata: dict[str, str], raw: Sequence[tuple[str, str | bytes]]) -> int:
    """The revision of the caller's organization the answer must reflect (0: any). Decimal ASCII
    digits, at most the largest revision (a signed 64-bit integer); sent at most once, since a
    repeated demand would be read as only one of its values."""
    given = metadata.get(MIN_REVISION_HEADER)
    if given is None:
        return 0
    if _repeated(raw, MIN_REVISION_HEADER):
        raise InvalidArgument.field(
            MIN_REVISION_HEADER, "must be sent at most once", reason="INVALID_MIN_REVISION"
        )
    if not given:
        return 0
    if (
        not (given.isascii() and given.isdigit())
        or len(given) > _MAX_REVISION_DIGITS
        or int(given) > MAX_REVISION
    ):
        raise InvalidArgument.field(
            MIN_REVISION_HEADER,
            f"must be a revision: an integer from 0 to {MAX_REVISION}",
            reason="INVALID_MIN_REVISION",
        )
    return int(given)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Identifies callers and enforces the policy table on every call."""

    def __init__(
        self,
        access: AccessCache,
        operator_tokens: BearerTokens,
        verifier_tokens: VerifierTokens | None = None,
        throttle: AuthFailureThrottle | None = None,
    ) -> None:
        self._access = access
        self._operator_tokens = operator_tokens
        self._verifier_tokens = verifier_tokens if verifier_tokens is not None else VerifierTokens(())
        self._throttle = throttle if throttle is not None else AuthFailureThrottle(0)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def authenticate(self, call: _Call, peer: str) -> Principal | None:
        """Identifies the caller of `call` once its peer is known."""
        rule = call.rule
        if rule is None:
            raise Denied("this method has no access rule and is refused", reason="METHOD_NOT_ALLOWED")
        if rule.level is Level.PUBLIC:
            return None
        return await self._throttle.guard(
            peer, lambda throttled: self._identify(rule, call.metadata, call.raw, known_only=throttled)
        )

    async def _identify(
        self,
        rule: Rule,
        metadata: dict[str, str],
        raw: Sequence[tuple[str, str | bytes]],
        known_only: bool = False,
    ) -> Principal | None:
        if rule.level is Level.PUBLIC:
            return None
        if rule.level is Level.VERIFIER:
            self._verifier_tokens.require(raw)
            # VerifyApiKey takes the demand from its request too, and honours the higher.
            call_context.current_min_revision.set(_min_revision(metadata, raw))
            return None
        token = _bearer(metadata, raw)
        if rule.level is Level.OPERATOR:
            if not self._operator_tokens.configured():
                raise Denied(
                    "no operator token is configured on this server", reason="OPERATOR_TOKEN_NOT_CONFIGURED"
                )
            if not self._operator_tokens.accepts(token):
                raise Unauthenticated("the operator token is wrong", reason="OPERATOR_TOKEN_INVALID")
            return None
        outcome = await self._access.authenticate(
            token, min_revision=_min_revision(metadata, raw), known_only=known_only
        )
        if outcome.principal is None:
            assert outcome.denial is not None
            raise unauthenticated(outcome.denial)
        return outcome.principal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        # Every line the call logs names its method (the access log, when on, sets it earlier).
        call_context.current_method.set(details.method)
        handler = await continuation(details)
        if handler is None:
            return None
        raw = details.invocation_metadata or ()
        metadata = {key: value for key, value in raw if isinstance(value, str)}
        rule = POLICY.get(details.method)
        if handler.unary_unary is None:
            if rule is not None and rule.level is Level.PUBLIC:
                return handler  # the public standard services: health Watch, reflection
            if handler.unary_stream is None:
                return None  # no client-streaming method of this API takes credentials
            return self._intercept_stream(handler, details, rule, metadata, raw)
        # The handler runs in this call's own task, so this reaches it and no other call.
        _current_call.set(_Call(rule, metadata, raw, metadata.get(ENVIRONMENT_HEADER), _request_id(metadata)))
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                _guarded(handler.unary_unary, self.authenticate),
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
            self._wrapped[details.method] = wrapped
        return wrapped

    def _intercept_stream(
        self,
        handler: grpc.RpcMethodHandler,
        details: grpc.HandlerCallDetails,
        rule: Rule | None,
        metadata: dict[str, str],
        raw: Sequence[tuple[str, str | bytes]],
    ) -> grpc.RpcMethodHandler:
        """`intercept_service` for a server-streaming method: the same identification, with the
        credential kept for the stream to check the key again as it goes."""
        credential: str | None = None
        with contextlib.suppress(DomainError):
            credential = _bearer(metadata, raw)
        _current_call.set(
            _Call(rule, metadata, raw, metadata.get(ENVIRONMENT_HEADER), _request_id(metadata), credential)
        )
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                _guarded_stream(handler.unary_stream, self.authenticate),
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
            self._wrapped[details.method] = wrapped
        return wrapped


async def _admitted(
    authenticate: Authenticate, state: _Call | None, request: Any, peer: str
) -> Principal | None:
    """The principal a call or stream acts as once the policy admits it (with its environment
    context for context-scoped methods); raises the domain error that refuses it."""
    if state is None:  # pragma: no cover - intercept_service always sets it
        raise Denied("the call was not authenticated", reason="METHOD_NOT_ALLOWED")
    raw = state.raw
    if sum(len(key) + len(value) for key, value in raw) + _ENTRY_OVERHEAD * len(raw) > MAX_METADATA_BYTES:
        raise ResourceExhausted(
            f"the request metadata is larger than {MAX_METADATA_BYTES} bytes", reason="METADATA_TOO_LARGE"
        )
    principal = await authenticate(state, peer)
    assert state.rule is not None
    if isinstance(request, _Undecodable):
        raise InvalidArgument.field(
            "request", f"is not a valid protobuf message ({request.error})", reason="MALFORMED_REQUEST"
        )
    acting = principal
    if acting is not None:
        authorize(state.rule, acting, enums.requested_kind(request) if state.rule.resource_access else None)
        if state.rule.level is Level.CONTEXT:
            acting = acting.in_context(_environment_reference(state))
    return acting


def _environment_reference(call: _Call) -> str | None:
    """The environment `x-agentpost-environment` names (None: not sent). Sent more than once or
    empty, it names none unambiguously, and a context-scoped call must not guess which one."""
    reference = call.environment
    if reference is None:
        return None
    if _repeated(call.raw, ENVIRONMENT_HEADER):
        raise InvalidArgument.field(
            ENVIRONMENT_HEADER, "must be sent at most once", reason="INVALID_ENVIRONMENT_HEADER"
        )
    if not reference:
        raise InvalidArgument.field(
            ENVIRONMENT_HEADER,
            "must name an environment (id or slug); leave it out to act in the key's own or the default one",
            reason="INVALID_ENVIRONMENT_HEADER",
        )
    return reference


def _guarded_stream(
    behaviour: Callable[[Any, grpc.aio.ServicerContext], AsyncGenerator[Any, None]],
    authenticate: Authenticate,
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    """A server-streaming method's behaviour behind the same policy, request id and error mapping
    as unary calls. However the stream ends, its trailing metadata carries the revision it
    reached (`reached_revision`), so the client can resume from it."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        state = _current_call.get()
        request_id = state.request_id if state is not None else _request_id({})
        id_token = call_context.current_request_id.set(request_id)
        principal_token = call_context.current_principal.set(None)
        credential_token = call_context.current_credential.set(state.credential if state else None)
        reached_token = reached_revision.set(None)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        try:
            call_context.current_principal.set(await _admitted(authenticate, state, request, context.peer()))
            async with aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id), *_reached()))
        except DomainError as error:
            log.info("stream ended: %s %s", error.reason, error.message)
            await abort(context, to_status(error), request_id, _reached())
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("failed")
            await abort(context, internal_status(request_id), request_id, _reached())
        finally:
            reached_revision.reset(reached_token)
            call_context.current_credential.reset(credential_token)
            call_context.current_principal.reset(principal_token)
            call_context.current_request_id.reset(id_token)

    return call


def _reached() -> tuple[tuple[str, str], ...]:
    """The trailing metadata naming the revision a stream reached, if it reached one."""
    revision = reached_revision.get()
    return () if revision is None else ((REVISION_HEADER, str(revision)),)


def _guarded(
    behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    authenticate: Authenticate,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """The method's behaviour behind the policy: built once per method, it reads what
    `intercept_service` learnt about this call from `_current_call`."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        state = _current_call.get()
        request_id = state.request_id if state is not None else _request_id({})
        id_token = call_context.current_request_id.set(request_id)
        principal_token = call_context.current_principal.set(None)
        revision_token = committed_revision.set(None)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        try:
            call_context.current_principal.set(await _admitted(authenticate, state, request, context.peer()))
            response = await behaviour(request, context)
            revision = committed_revision.get()
            if revision is not None:
                context.set_trailing_metadata(
                    ((REQUEST_ID_HEADER, request_id), (REVISION_HEADER, str(revision)))
                )
            return response
        except DomainError as error:
            # Refused credentials are logged by the throttle: once per peer address and minute.
            if not isinstance(error, (Unauthenticated, ResourceExhausted)):
                log.info("refused: %s %s", error.reason, error.message)
            await abort(context, to_status(error), request_id)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("failed")
            await abort(context, internal_status(request_id), request_id)
        finally:
            committed_revision.reset(revision_token)
            call_context.current_principal.reset(principal_token)
            call_context.current_request_id.reset(id_token)

    return call
