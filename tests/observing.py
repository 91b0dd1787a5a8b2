"""A server whose every observable output is captured (text and JSON logs, metrics, spans, error
answers), for the tests that search those outputs, and what they share about trace context."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service.app import logs, tracing
from service.app.server import Application
from tests.harness import Failure, Harness, failure_of
from tests.own_database import own_database
from tests.servers import Backend

PEPPER = "pepper-for-observability-attacks-7f3a9c"
VERIFIER_TOKENS = ("verifier-token-alpha-31d9", "verifier-token-beta-8e27")
# Answers are expected well within this; it only keeps a hung call from hanging a test.
HANG = 15.0
# What does not depend on the database (metrics HTTP, method paths, trace headers) runs on SQLite
# only; the rest runs on both databases.
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
VALID_PARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@dataclass
class Observed:
    """A server with metrics, spans and both log formats captured, and every error answer it
    gave through `attempt`."""

    harness: Harness
    text_log: io.StringIO
    json_log: io.StringIO
    spans: InMemorySpanExporter
    answers: list[tuple[str, Failure]] = field(default_factory=list)

    @property
    def metrics_port(self) -> int:
        assert self.harness.app.metrics is not None
        return self.harness.app.metrics.port

    async def attempt(self, label: str, call: Awaitable[Any]) -> Any:
        """Awaits `call`; returns its result, or its Failure (kept, to be searched)."""
        try:
            async with asyncio.timeout(HANG):
                return await call
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            self.answers.append((label, failure))
            return failure

    async def scrape(self, path: str = "/metrics") -> str:
        """The metrics text."""

        def get() -> str:
            url = f"http://127.0.0.1:{self.metrics_port}{path}"
            with urllib.request.urlopen(url, timeout=HANG) as response:
                assert response.status == 200
                return str(response.read().decode())

        return await asyncio.to_thread(get)

    def span_texts(self) -> list[str]:
        """Every finished span as JSON: name, attributes, events, status, links, trace state."""
        return [span.to_json(indent=None) for span in self.spans.get_finished_spans()]

    def answer_texts(self) -> list[str]:
        """Every error answer: message, ErrorInfo, field violations and trailers."""
        return [
            f"{label}: {failure.code.name} {failure.reason} {failure.message!r} {failure.metadata!r} "
            f"{failure.violations!r} {failure.trailers!r}"
            for label, failure in self.answers
        ]

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.json_log.getvalue().split("\n") if line]

    async def outputs(self) -> dict[str, list[str]]:
        """Every observable output, line by line, by where it came from."""
        await asyncio.sleep(0.2)  # lets calls ended by an abort write their access lines and spans
        return {
            "text log": self.text_log.getvalue().split("\n"),
            "json log": self.json_log.getvalue().split("\n"),
            "metrics": (await self.scrape()).split("\n"),
            "spans": self.span_texts(),
            "answers": self.answer_texts(),
        }


def server_side(record: logging.LogRecord) -> bool:
    """Leaves out what the test's own plain HTTP/2 client logs (h2 and hpack, which no part of
    the server uses): it logs the headers it sends, secrets included, at DEBUG."""
    return not record.name.startswith(("hpack", "h2"))


@contextlib.contextmanager
def captured_logs() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Everything logged at DEBUG and above, in the text and the json format."""
    logs.install_request_ids()
    text, as_json = io.StringIO(), io.StringIO()
    handlers = [logs.handler("text", text), logs.handler("json", as_json)]
    for handler in handlers:
        handler.addFilter(server_side)
    root = logging.getLogger()
    level = root.level
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield text, as_json
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(level)


@contextlib.asynccontextmanager
async def observed_server(backend: Backend, folder: Path, **settings: object) -> AsyncIterator[Observed]:
    """A server of its own, every output captured from before it starts."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    values: dict[str, object] = {
        "metrics_address": "127.0.0.1:0",
        "access_log": True,
        "log_level": "DEBUG",
        "key_pepper": PEPPER,
        "verifier_tokens": ",".join(VERIFIER_TOKENS),
        # On, so that its own logging of refused credentials is searched too; high enough that
        # no test here is throttled.
        "auth_failures_per_minute": 100_000,
    }
    values.update(settings)
    with captured_logs() as (text, as_json):
        app = Application(own_database(backend, folder).settings(**values), traces=tracing.Tracing(provider))
        await app.migrate()
        await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        try:
            yield Observed(Harness(app, channel, backend.name), text, as_json, spans)
        finally:
            await channel.close()
            async with asyncio.timeout(HANG):
                await app.stop(grace=0)
            provider.shutdown()


def server_spans(observed: Observed) -> list[ReadableSpan]:
    return [span for span in observed.spans.get_finished_spans() if span.kind == SpanKind.SERVER]


def span_of(observed: Observed, request_id: str) -> ReadableSpan:
    """The one server span of the call with `request_id`."""
    found = [
        span
        for span in server_spans(observed)
        if (span.attributes or {}).get("agentpost.request_id") == request_id
    ]
    assert len(found) == 1, (request_id, len(found))
    return found[0]
