"""The shape shared by the observing interceptors (metrics, access log, trace annotations): wrap
each unary method's behaviour once, and read the finished call's outcome from its context.

Building a wrapped handler per call measured about 10% slower than building one per method, so
wrapped handlers are kept by method name. Streams (health Watch, reflection) pass through: a
stream's duration is its lifetime, not a latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]

REQUEST_ID_HEADER = "x-request-id"


def code_name(context: grpc.aio.ServicerContext) -> str:
    """The name of the status code the call ended with. `context.abort` and `set_code` record
    it on the context; a behaviour that returned without setting one ended OK."""
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    # The C core may report the wire number.
    return next((str(known.name) for known in grpc.StatusCode if known.value[0] == code), "UNKNOWN")


Finished = Callable[[grpc.aio.ServicerContext, str, Exception | None], None]


def on_finish(behaviour: Behaviour, finished: Finished) -> Behaviour:
    """`behaviour`, then `finished(context, code, error)` however it ended: the name of the status
    code the call ended with, and the exception that escaped the behaviour (None when it returned
    or aborted). An escaping exception is UNKNOWN, as grpc.aio answers it; a cancelled call is
    CANCELLED; an abort, or a return, is whatever the context recorded."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        code: str | None = None
        error: Exception | None = None
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise  # context.abort recorded the code, read below
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED.name
            raise
        except Exception as escaped:
            code, error = grpc.StatusCode.UNKNOWN.name, escaped
            raise
        finally:
            finished(context, code or code_name(context), error)

    return call


def echoed_request_id(context: grpc.aio.ServicerContext) -> str | None:
    """The request id that authentication echoed in the trailers (the caller's or a made-up
    one), readable after the call's behaviour has finished."""
    for key, value in context.trailing_metadata() or ():
        if key == REQUEST_ID_HEADER:
            return value if isinstance(value, str) else bytes(value).decode(errors="replace")
    return None


class UnaryWrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps the behaviour of every unary method with `wrap`, once per method. `arrived` runs
    as each call arrives, in the call's own task (so a ContextVar it sets reaches the
    interceptors after this one and the behaviour); `unimplemented` when no handler serves the
    method, `streaming` when the call streams."""

    def __init__(self) -> None:
        # Per method: the inner behaviour wrapped, and the handler built around it.
        self._wrapped: dict[str, tuple[Behaviour, grpc.RpcMethodHandler]] = {}

    def arrived(self, details: grpc.HandlerCallDetails) -> None:
        """Called as a call arrives, before the interceptors after this one."""

    def unimplemented(self) -> None:
        """Called for a call that no handler serves."""

    def streaming(self) -> None:
        """Called for a streaming call, which passes through unwrapped."""

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour | None:
        """The behaviour to run instead of `behaviour`; None leaves the method as it is."""
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        self.arrived(details)
        handler = await continuation(details)
        if handler is None:
            self.unimplemented()
            return None
        if handler.unary_unary is None:
            self.streaming()
            return handler
        inner = handler.unary_unary
        cached = self._wrapped.get(details.method)
        # An inner interceptor may build a handler per call (OpenTelemetry's does): reuse a
        # wrapper only around the very behaviour it wrapped.
        if cached is not None and cached[0] is inner:
            return cached[1]
        behaviour = self.wrap(details.method, inner)
        wrapped = (
            handler
            if behaviour is None
            else grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        )
        self._wrapped[details.method] = (inner, wrapped)
        return wrapped
