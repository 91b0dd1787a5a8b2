"""Call metrics: every unary call counted by method and status code, and its latency.

A server interceptor of its own, placed before the authentication interceptor so that what it
measures includes authentication and what it counts includes refusals. The clock starts in
`intercept_service` (where the caller is identified, possibly with a database read) and stops
when the wrapped behaviour returns or raises; the code is read from the context, which
`context.abort` sets before raising `AbortError`. Label children are looked up once per method
and code and kept, so a call costs two dictionary lookups, a counter increment and a histogram
observation.

Series names follow go-grpc-prometheus (`grpc_server_handled_total`,
`grpc_server_handling_seconds`) so existing dashboards work unchanged.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.transport.call_wrapping import Behaviour, UnaryWrappingInterceptor, on_finish

# Hot paths answer from memory in well under a millisecond; writes take milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNKNOWN = "unknown"

_started: ContextVar[float | None] = ContextVar("call_started", default=None)


def split_method(full_method: str) -> tuple[str, str]:
    """`/package.Service/Method` as (`package.Service`, `Method`)."""
    service, _, method = full_method.lstrip("/").partition("/")
    return (service, method) if method else (UNKNOWN, UNKNOWN)


class CallMetrics:
    """The call series and the VerifyApiKey outcomes, registered in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._handled = Counter(
            "grpc_server_handled_total",
            "gRPC calls completed on the server, by method and status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self._latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from a call's arrival (before authentication) to its answer, by method.",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._verifications = Counter(
            "agentpost_verify_api_key_total",
            "VerifyApiKey answers by outcome: VALID or the denial reason.",
            ["outcome"],
            registry=registry,
        )
        self._handled_children: dict[tuple[str, str], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._verification_children: dict[str, Any] = {}

    def record(self, full_method: str, code: str, seconds: float) -> None:
        """Counts one finished unary call and observes its latency."""
        handled = self._handled_children.get((full_method, code))
        if handled is None:
            handled = self._handled.labels("unary", *split_method(full_method), code)
            self._handled_children[(full_method, code)] = handled
        handled.inc()
        latency = self._latency_children.get(full_method)
        if latency is None:
            latency = self._latency.labels("unary", *split_method(full_method))
            self._latency_children[full_method] = latency
        latency.observe(seconds)

    def record_unimplemented(self) -> None:
        """Counts a call to a method this server does not serve. Its name is not a label: any
        client could otherwise grow the series without bound. Nor is its type known."""
        self._handled.labels(UNKNOWN, UNKNOWN, UNKNOWN, grpc.StatusCode.UNIMPLEMENTED.name).inc()

    def verification(self, outcome: str) -> None:
        """Counts one VerifyApiKey answer: "VALID" or the name of its denial reason."""
        child = self._verification_children.get(outcome)
        if child is None:
            child = self._verifications.labels(outcome)
            self._verification_children[outcome] = child
        child.inc()

    def interceptor(self) -> MetricsInterceptor:
        """The server interceptor that feeds these series."""
        return MetricsInterceptor(self)


class MetricsInterceptor(UnaryWrappingInterceptor):
    """Counts and times every unary call."""

    def __init__(self, metrics: CallMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def arrived(self, details: grpc.HandlerCallDetails) -> None:
        """Starts the call's clock, before authentication."""
        _started.set(time.perf_counter())

    def unimplemented(self) -> None:
        """Counts the call under the `unknown` method."""
        self._metrics.record_unimplemented()

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        """The behaviour, counted and timed."""
        record = self._metrics.record

        def finished(_context: grpc.aio.ServicerContext, code: str, _error: Exception | None) -> None:
            now = time.perf_counter()
            record(method, code, now - (_started.get() or now))

        return on_finish(behaviour, finished)
