"""What log lines know about the call they are written in, and the access log.

Every call's method is put in a ContextVar as the call arrives, so any line logged while it runs
names it. With the access log on, each finished unary call also writes one line at INFO on the
`service.access` logger with its method, status code and duration (extra record fields
`method`, `code` and `duration_ms`). Off, calls are not wrapped at all: the access log costs
nothing unless asked for.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar

import grpc

from service.transport import context as call_context
from service.transport.call_wrapping import Behaviour, UnaryWrappingInterceptor, echoed_request_id, on_finish

access_log = logging.getLogger("service.access")

_arrived_at: ContextVar[float | None] = ContextVar("call_arrived_at", default=None)


class CallLogInterceptor(UnaryWrappingInterceptor):
    """Names the call's method for log lines and, when `access_log_on`, logs each call once it
    has finished. Placed before authentication, so refused calls are logged too."""

    def __init__(self, access_log_on: bool) -> None:
        super().__init__()
        self._access_log_on = access_log_on

    def arrived(self, details: grpc.HandlerCallDetails) -> None:
        """Names the method for every line the call logs, and starts the access log's clock
        (before authentication, which may read the database)."""
        call_context.current_method.set(details.method)
        if self._access_log_on:
            _arrived_at.set(time.perf_counter())

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour | None:
        """The behaviour, logged when it finishes; None (unchanged) with the access log off."""
        return _logged(method, behaviour) if self._access_log_on else None


def _logged(method: str, behaviour: Behaviour) -> Behaviour:
    def finished(context: grpc.aio.ServicerContext, code: str, _error: Exception | None) -> None:
        if access_log.isEnabledFor(logging.INFO):
            now = time.perf_counter()
            _log_call(method, code, now - (_arrived_at.get() or now), context)

    return on_finish(behaviour, finished)


def _log_call(method: str, code: str, seconds: float, context: grpc.aio.ServicerContext) -> None:
    """Writes the access line of a finished call."""
    duration_ms = seconds * 1000.0
    # Authentication has reset its request id by now; the trailers still carry it.
    token = call_context.current_request_id.set(echoed_request_id(context) or "-")
    try:
        access_log.info(
            "%s %s %.2f ms",
            method,
            code,
            duration_ms,
            extra={"code": code, "duration_ms": round(duration_ms, 3)},
        )
    finally:
        call_context.current_request_id.reset(token)
