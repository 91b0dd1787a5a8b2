"""Per-call values handed from the interceptor to handlers and log lines."""

from __future__ import annotations

from contextvars import ContextVar

from service.domain.principal import Principal

current_principal: ContextVar[Principal | None] = ContextVar("current_principal", default=None)
current_request_id: ContextVar[str] = ContextVar("current_request_id", default="-")
# The running call's full method name (`/package.Service/Method`), for log lines.
current_method: ContextVar[str | None] = ContextVar("current_method", default=None)


def principal() -> Principal:
    """The authenticated caller of the running handler. The interceptor always sets it for
    methods whose policy needs a key; reaching this without one is a bug in the policy table."""
    value = current_principal.get()
    if value is None:  # pragma: no cover - guarded by the policy table
        raise RuntimeError("handler ran without an authenticated principal")
    return value
