"""Tracing: with a tracer provider, every call is a server span carrying its request id, and every
statement it runs is a span of the same trace; without OTEL_EXPORTER_OTLP_ENDPOINT, nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import environment_pb2, organization_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.app import tracing
from service.app.server import Application
from service.transport.tracing import REQUEST_ID_ATTRIBUTE
from tests.harness import Harness, auth, fails
from tests.own_database import own_database
from tests.servers import Backend

CREATE_ENVIRONMENT = "/agentpost.environments.v1.EnvironmentService/CreateEnvironment"


@dataclass
class Traced:
    """A server whose spans end up in `spans`."""

    harness: Harness
    spans: InMemorySpanExporter


@pytest.fixture
async def traced(backend: Backend, tmp_path: Path) -> AsyncIterator[Traced]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = Application(own_database(backend, tmp_path).settings(), traces=tracing.Tracing(provider))
    await app.migrate()
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Traced(Harness(app, channel, backend.name), spans)
    finally:
        await channel.close()
        await app.stop(grace=0)
        provider.shutdown()


def _server_spans(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [span for span in spans if span.kind == SpanKind.SERVER]


async def _finished_server_spans(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    """The server spans once there is one (at most 5 s): a call ended by `context.abort` is
    answered before its span ends."""
    for _ in range(500):  # 10 ms apart: at most 5 s
        if _server_spans(spans.get_finished_spans()):
            break
        await asyncio.sleep(0.01)
    return _server_spans(spans.get_finished_spans())


def _descends_from(span: ReadableSpan, ancestor: ReadableSpan, spans: tuple[ReadableSpan, ...]) -> bool:
    by_id = {each.context.span_id: each for each in spans}
    parent = span.parent
    while parent is not None:
        if parent.span_id == ancestor.context.span_id:
            return True
        found = by_id.get(parent.span_id)
        parent = found.parent if found is not None else None
    return False


async def test_a_call_is_a_span_with_its_request_id_and_statements(traced: Traced) -> None:
    harness = traced.harness
    org = await harness.new_org()
    traced.spans.clear()

    created = await harness.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name="Traced"),
        metadata=auth(org.owner_secret, request_id="trace-me-1"),
    )

    spans = traced.spans.get_finished_spans()
    calls = _server_spans(spans)
    assert [call.name for call in calls] == [CREATE_ENVIRONMENT]
    call = calls[0]
    assert call.parent is None, "no traceparent was sent: the call starts a trace"
    assert call.attributes is not None
    assert call.attributes["rpc.system"] == "grpc"
    assert call.attributes["rpc.service"] == "agentpost.environments.v1.EnvironmentService"
    assert call.attributes["rpc.method"] == "CreateEnvironment"
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert call.attributes[REQUEST_ID_ATTRIBUTE] == "trace-me-1"
    # Background work (the cache's polls and catch-ups) runs statements of its own, in traces
    # of their own; the call's are those of its trace, and each descends from its span.
    statements = [
        span
        for span in spans
        if span.kind == SpanKind.CLIENT and span.context.trace_id == call.context.trace_id
    ]
    assert statements, "the write ran statements; each must be a span"
    for statement in statements:
        assert _descends_from(statement, call, spans)
    texts = " ".join(str((span.attributes or {}).get("db.statement", "")) for span in statements)
    # The key was not cached yet: authentication's read is in the call's trace too.
    assert "FROM api_keys" in texts
    assert "INSERT INTO environments" in texts
    assert created.id


async def test_a_refused_call_is_a_span_with_its_code_and_made_up_request_id(traced: Traced) -> None:
    harness = traced.harness
    traced.spans.clear()

    failure = await fails(
        harness.organizations.GetOrganization(
            organization_pb2.GetOrganizationRequest(), metadata=auth("not-a-key")
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )

    calls = await _finished_server_spans(traced.spans)
    assert len(calls) == 1
    attributes = calls[0].attributes or {}
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    # A refusal answers what the client sent: not a failure of the server (OTel's gRPC conventions).
    assert calls[0].status.status_code == StatusCode.UNSET
    # The id the server made up is the one the caller got back.
    assert attributes[REQUEST_ID_ATTRIBUTE] == failure.trailers["x-request-id"]


async def test_a_callers_traceparent_continues_its_trace(traced: Traced) -> None:
    harness = traced.harness
    org = await harness.new_org()
    traced.spans.clear()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    await harness.organizations.GetOrganization(
        organization_pb2.GetOrganizationRequest(),
        metadata=(*auth(org.owner_secret), ("traceparent", f"00-{trace_id}-{parent_id}-01")),
    )

    calls = _server_spans(traced.spans.get_finished_spans())
    assert len(calls) == 1
    assert calls[0].context.trace_id == int(trace_id, 16)
    assert calls[0].parent is not None and calls[0].parent.span_id == int(parent_id, 16)


async def test_health_checks_are_not_traced(traced: Traced) -> None:
    from grpc_health.v1 import health_pb2

    traced.spans.clear()
    await traced.harness.health.Check(health_pb2.HealthCheckRequest())
    assert _server_spans(traced.spans.get_finished_spans()) == []


def test_tracing_is_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracing.ENDPOINT_VARIABLE, raising=False)
    assert tracing.from_environment() is None


def test_tracing_is_on_with_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracing.ENDPOINT_VARIABLE, "http://127.0.0.1:4317")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    configured = tracing.from_environment()
    assert configured is not None
    try:
        assert configured.provider.resource.attributes["service.name"] == tracing.SERVICE_NAME
    finally:
        configured.shutdown()


async def test_a_server_without_an_endpoint_has_no_tracing(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(tracing.ENDPOINT_VARIABLE, raising=False)
    app = Application(backend.settings())
    try:
        assert app.traces is None
    finally:
        await app.database.dispose()


_TRACE_CONTEXT_PROBE = """
import json, os, types
from service.app import tracing
from service.transport import tracing as call_tracing
traces = tracing.from_environment()
interceptor = traces.interceptors()[0]
details = types.SimpleNamespace(
    method="/agentpost.environments.v1.OrganizationService/GetOrganization",
    invocation_metadata=(("traceparent", os.environ["PROBE_TRACEPARENT"]),),
)
interceptor.arrived(details)
context = call_tracing._span.get().get_span_context()
print(json.dumps({"trace_id": format(context.trace_id, "032x"), "sampled": context.trace_flags.sampled}))
os._exit(0)  # nothing to export: the collector's address is a closed port
"""
UNSAMPLED_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


@pytest.mark.parametrize(
    ("variables", "continued", "sampled"),
    [
        ({}, True, False),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, True, True),
        ({"OTEL_PROPAGATORS": "none"}, False, True),
    ],
    ids=["default", "always-on-sampler", "no-propagators"],
)
def test_the_standard_variables_decide_how_far_a_callers_trace_context_is_trusted(
    variables: dict[str, str], continued: bool, sampled: bool
) -> None:
    """A caller's `traceparent` is continued by default, its sampled flag included (the default
    sampler is parentbased_always_on); `OTEL_TRACES_SAMPLER=always_on` samples every call
    whatever the caller says; `OTEL_PROPAGATORS=none` ignores the caller's trace context, every
    call starting a trace of its own. (README, Tracing.)"""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")} | {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "PROBE_TRACEPARENT": UNSAMPLED_PARENT,
        **variables,
    }
    finished = subprocess.run(
        [sys.executable, "-c", _TRACE_CONTEXT_PROBE],
        cwd=Path(__file__).resolve().parents[1],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    span = json.loads(finished.stdout.strip().splitlines()[-1])
    assert (span["trace_id"] == UNSAMPLED_PARENT.split("-")[1]) is continued, span
    assert span["sampled"] is sampled, span
