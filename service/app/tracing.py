"""OpenTelemetry traces: a span for every call and every database statement.

On only when OTEL_EXPORTER_OTLP_ENDPOINT is set and the `otel` extra is installed; off, nothing
of OpenTelemetry is imported and no interceptor is added, so it costs nothing. The standard
OTel variables apply (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER,
OTEL_PROPAGATORS, OTEL_EXPORTER_OTLP_HEADERS, ...); spans leave over OTLP/gRPC in batches.

Call spans come from the transport's tracing interceptor. Statement spans come from
opentelemetry-instrumentation-sqlalchemy's engine tracer, attached to this server's engine only
(its `instrument()` would also patch every engine the process creates, and only once per
process).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import grpc
from sqlalchemy import Engine

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
SERVICE_NAME = "agentpost-environments"
QUIET_LOGGERS = ("opentelemetry.trace.span", "opentelemetry.baggage.propagation")


class Tracing:
    """Spans for calls and statements, handed to `provider`'s processors."""

    def __init__(self, provider: TracerProvider, *, owns_provider: bool = False) -> None:
        self.provider = provider
        self._owns_provider = owns_provider

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The interceptors to place first, before every other."""
        from service.transport.tracing import TracingInterceptor

        # A trace header the propagators cannot parse is ignored; they would log a warning with
        # the caller's raw value for every such call, before the call has a request id.
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        return [TracingInterceptor(self.provider.get_tracer(__name__))]

    def instrument(self, engine: Engine) -> None:
        """Makes every statement run on `engine` a span, a child of the call's span."""
        # Imported here, as everything of OpenTelemetry: only installed with the otel extra.
        from opentelemetry.instrumentation.sqlalchemy import __name__ as instrumentation
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
        from opentelemetry.metrics import NoOpMeterProvider

        # Connection-usage metrics go nowhere: Prometheus reports the pool.
        usage = (
            NoOpMeterProvider()
            .get_meter(instrumentation)
            .create_up_down_counter("db.client.connections.usage")
        )
        EngineTracer(self.provider.get_tracer(instrumentation), engine, usage)  # type: ignore[no-untyped-call]

    def shutdown(self) -> None:
        """Exports what is pending, when this server made the provider."""
        if self._owns_provider:
            self.provider.shutdown()


def from_environment() -> Tracing | None:
    """Tracing configured by the standard OTel variables, or None when OTEL_EXPORTER_OTLP_ENDPOINT
    is unset (or the `otel` extra is missing, which is logged)."""
    if not os.environ.get(ENDPOINT_VARIABLE):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "%s is set but OpenTelemetry is not installed (pip install 'agentpost-environments[otel]'); "
            "tracing stays off",
            ENDPOINT_VARIABLE,
        )
        return None
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        # Neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES named the service.
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("tracing to %s", os.environ[ENDPOINT_VARIABLE])
    return Tracing(provider, owns_provider=True)
