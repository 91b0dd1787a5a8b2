"""Per-call values handed from the interceptor to handlers and log lines."""

from __future__ import annotations

from contextvars import ContextVar

from service.domain.calls import current_request_id
from service.domain.principal import Principal

__all__ = ["credential", "current_credential", "current_principal", "current_request_id", "principal"]

current_principal: ContextVar[Principal | None] = ContextVar("current_principal", default=None)
# The running call's full method name (`/package.Service/Method`), for log lines.
current_method: ContextVar[str | None] = ContextVar("current_method", default=None)


def principal() -> Principal:
    """The authenticated caller of the running handler. The interceptor always sets it for
    methods whose policy needs a key; reaching this without one is a bug in the policy table."""
    value = current_principal.get()
    if value is None:  # pragma: no cover - guarded by the policy table
        raise RuntimeError("handler ran without an authenticated principal")
    return value


# A VerifyApiKey caller's `x-agentpost-min-revision` (0: none), read by the interceptor.
current_min_revision: ContextVar[int] = ContextVar("current_min_revision", default=0)

current_credential: ContextVar[str | None] = ContextVar("current_credential", default=None)


def credential() -> str:
    """The secret the caller of a running stream presented: a stream checks the key again as it
    goes. The interceptor sets it for every authenticated stream."""
    value = current_credential.get()
    if value is None:  # pragma: no cover - guarded by the interceptor
        raise RuntimeError("stream ran without the caller's credential")
    return value
