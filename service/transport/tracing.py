"""A server span for every call, from its arrival to its answer, carrying its request id.

The span starts as the call arrives, before authentication, and is made current there: the
database reads that identify the caller (a key not yet cached) are its children, as are the
statements of the use case. (opentelemetry-instrumentation-grpc's aio interceptor starts its span
only once the behaviour runs, after authentication, which would leave those reads outside any
trace.) A caller's `traceparent` metadata continues its trace, with at most 512 characters of its
`tracestate` (W3C's bound; OTEL_PROPAGATORS=none ignores both, OTEL_TRACES_SAMPLER decides
whether a caller's sampled flag counts). The request id is read from the
trailers once the call is over, so refused calls carry theirs too.

Imported only when tracing is on: OpenTelemetry is an optional extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from service.transport.call_wrapping import Behaviour, UnaryWrappingInterceptor, echoed_request_id, on_finish

REQUEST_ID_ATTRIBUTE = "agentpost.request_id"
# Standard services: health checks would drown the traces, and both stream.
UNTRACED_SERVICE_PREFIXES = ("grpc.health.", "grpc.reflection.")
# OpenTelemetry's conventions for gRPC servers: only these codes are the server's own failures;
# the others answer what the client sent and leave the span's status unset.
SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

OTHER_METHOD = "_OTHER"
MAX_ORIGINAL_METHOD = 128
# W3C Trace Context: a tracestate is propagated up to 512 characters; past that, members longer
# than 128 characters go first, then members from the end. OpenTelemetry alone keeps up to 32
# members of up to 256 characters each, about 8 KB a caller could have copied onto every span.
MAX_TRACESTATE = 512
MAX_TRACESTATE_MEMBER = 128

_span: ContextVar[Span | None] = ContextVar("call_span", default=None)


def _code_number(name: str) -> int:
    return int(grpc.StatusCode[name].value[0])


def _peer_attributes(peer: str) -> dict[str, str | int]:
    """`ipv4:127.0.0.1:5555` or `ipv6:[::1]:5555` as network.peer.address and .port."""
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    host, _, port = address.rpartition(":")
    return (
        {"network.peer.address": host.strip("[]"), "network.peer.port": int(port)} if port.isdigit() else {}
    )


def bounded_tracestate(value: str) -> str:
    """A caller's tracestate cut to what W3C Trace Context says to propagate (see above)."""
    if len(value) <= MAX_TRACESTATE:
        return value
    kept: list[str] = []
    length = -1  # the first member has no comma before it
    for member in value.split(","):
        member = member.strip()
        if not member or len(member) > MAX_TRACESTATE_MEMBER:
            continue
        if length + 1 + len(member) > MAX_TRACESTATE:
            break
        kept.append(member)
        length += 1 + len(member)
    return ",".join(kept)


def trace_carrier(metadata: Sequence[tuple[str, str | bytes]]) -> dict[str, str]:
    """The call's metadata as the propagators read it: repeated `tracestate` entries are one list
    (joined, as HTTP joins repeated headers, W3C Trace Context), then bounded. (Of repeated
    `traceparent` headers gRPC itself hands over only the last.)"""
    carrier: dict[str, str] = {}
    states: list[str] = []
    for key, value in metadata:
        if not isinstance(value, str):
            continue
        if key == "tracestate":
            states.append(value)
        else:
            carrier[key] = value
    if states:
        carrier["tracestate"] = bounded_tracestate(",".join(states))
    return carrier


def finish(span: Span, code: str, request_id: str | None) -> None:
    """Records how the call ended and ends its span."""
    span.set_attribute("rpc.grpc.status_code", _code_number(code))
    if request_id is not None:
        span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
    if code in SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, code))
    span.end()


class TracingInterceptor(UnaryWrappingInterceptor):
    """Starts each call's span as it arrives and ends it with the answer. First in the list of
    interceptors, so that everything after it runs inside the span."""

    def __init__(self, tracer: trace.Tracer) -> None:
        super().__init__()
        self._tracer = tracer

    def arrived(self, details: grpc.HandlerCallDetails) -> None:
        """Starts the call's span and makes it current for the rest of the call."""
        method = details.method
        if method.lstrip("/").startswith(UNTRACED_SERVICE_PREFIXES):
            _span.set(None)
            return
        parent = propagate.extract(trace_carrier(details.invocation_metadata or ()))
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        _span.set(span)
        # Left attached: the call's task ends with the call.
        otel_context.attach(trace.set_span_in_context(span, parent))

    def unimplemented(self) -> None:
        """Ends the span of a call that nothing serves, named `_OTHER` as OpenTelemetry's RPC
        conventions name methods a server does not know: any caller can make up method paths,
        and span names must not grow with them. The path it asked for is kept, cut short, in
        `rpc.method_original`."""
        span = _span.get()
        if span is None:
            return
        original = str(getattr(span, "name", ""))
        span.update_name(OTHER_METHOD)
        span.set_attributes(
            {
                "rpc.service": OTHER_METHOD,
                "rpc.method": OTHER_METHOD,
                "rpc.method_original": original[:MAX_ORIGINAL_METHOD],
            }
        )
        finish(span, "UNIMPLEMENTED", None)

    def streaming(self) -> None:
        """A stream's span covers its set-up (authentication) only: streams are not wrapped."""
        span = _span.get()
        if span is not None:
            span.set_attribute("agentpost.stream_setup_only", True)
            span.end()

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        """The behaviour, ending the call's span when it finishes."""

        def finished(context: grpc.aio.ServicerContext, code: str, error: Exception | None) -> None:
            span = _span.get()
            if span is None:
                return
            if error is not None:
                span.record_exception(error)
            span.set_attributes(_peer_attributes(context.peer()))
            finish(span, code, echoed_request_id(context))

        return on_finish(behaviour, finished)
