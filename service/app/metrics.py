"""Prometheus metrics at `/metrics` when AGENTPOST_METRICS_ADDRESS is set.

Each server has a registry of its own (several may run in one process, as in the tests). Call
series come from the transport's interceptor; the state of the access cache and of the database
pool is read when Prometheus scrapes, so it costs nothing between scrapes. The endpoint is
prometheus-client's HTTP server on a thread of its own: a scrape never waits for the event loop,
and a busy event loop never delays a scrape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.pool import Pool

from service.app.config import host_and_port
from service.app.credentials import ServerTls
from service.application.access import CacheStats
from service.storage.database import CommitCounts
from service.transport.metrics import CallMetrics

log = logging.getLogger(__name__)


class StateCollector(Collector):
    """The access cache's sizes, key hits and misses and revision lag, the open event streams,
    the database's commits and the pool's connections, read at scrape time. Reading from the scrape thread is safe: each value is one read of a
    counter or a container's length, which the interpreter does atomically."""

    def __init__(
        self,
        cache_stats: Callable[[], CacheStats],
        pool: Pool,
        subscribers: Callable[[], int],
        commits: Callable[[], CommitCounts],
        tls: ServerTls | None = None,
    ) -> None:
        self._cache_stats = cache_stats
        self._pool = pool
        self._subscribers = subscribers
        self._commits = commits
        self._tls = tls

    def collect(self) -> Iterator[Metric]:
        """Yields the current values."""
        stats = self._cache_stats()
        entries = GaugeMetricFamily(
            "agentpost_access_cache_entries",
            "Entries held by the access cache: API keys, and organization snapshots.",
            labels=["cache"],
        )
        entries.add_metric(["keys"], stats.keys)
        entries.add_metric(["organizations"], stats.organizations)
        yield entries
        yield CounterMetricFamily(
            "agentpost_access_cache_key_hits",
            "Key lookups (authentication and VerifyApiKey) answered from memory.",
            value=stats.key_hits,
        )
        yield CounterMetricFamily(
            "agentpost_access_cache_key_misses",
            "Key lookups that read the database (unknown secrets included: they are never cached).",
            value=stats.key_misses,
        )
        yield GaugeMetricFamily(
            "agentpost_revision_lag",
            "Revisions this replica knows its followed organizations committed but has not applied "
            "yet (the largest over organizations).",
            value=stats.revision_lag,
        )
        yield GaugeMetricFamily(
            "agentpost_revision_unconfirmed_seconds",
            "Seconds since the database last confirmed this replica's view (a successful poll): "
            "the bound on any lag it does not know of yet.",
            value=stats.unconfirmed_seconds,
        )
        yield CounterMetricFamily(
            "agentpost_event_log_reads",
            "Reads of the event log to catch up an organization: other replicas' commits, or a gap "
            "(a replica applies its own commits as it makes them).",
            value=stats.log_reads,
        )
        yield GaugeMetricFamily(
            "agentpost_event_stream_subscribers",
            "Open WatchEvents streams on this process.",
            value=self._subscribers(),
        )
        commits = self._commits()
        yield CounterMetricFamily(
            "agentpost_database_commits",
            "Write transactions this process committed. On SQLite, writers that queue while one "
            "writes share its commit: compare with agentpost_database_committed_writes_total.",
            value=commits.commits,
        )
        yield CounterMetricFamily(
            "agentpost_database_committed_writes",
            "Writes (one call's transaction each) those commits held.",
            value=commits.writes,
        )
        yield from self._pool_metrics()
        yield from self._tls_metrics()

    def _tls_metrics(self) -> Iterator[Metric]:
        if self._tls is None:
            return
        expiry = self._tls.expiry_timestamp()
        if expiry is not None:
            yield GaugeMetricFamily(
                "agentpost_tls_certificate_expiry_timestamp_seconds",
                "When the TLS certificate served to new connections expires (Unix time).",
                value=expiry,
            )
        reloads = CounterMetricFamily(
            "agentpost_tls_reloads",
            "Changes of the TLS files taken up (loaded) or refused as unusable (the previous "
            "certificate kept serving).",
            labels=["outcome"],
        )
        for outcome, count in self._tls.reloads.items():
            reloads.add_metric([outcome], count)
        yield reloads

    def _pool_metrics(self) -> Iterator[Metric]:
        # Queue pools (PostgreSQL, SQLite files) count their connections; other pool classes
        # (a StaticPool for an in-memory database) have nothing to report.
        size = getattr(self._pool, "size", None)
        checked_out = getattr(self._pool, "checkedout", None)
        checked_in = getattr(self._pool, "checkedin", None)
        if size is None or checked_out is None or checked_in is None:
            return
        yield GaugeMetricFamily(
            "agentpost_database_pool_size",
            "Connections the pool keeps open when idle (more may open, up to its overflow).",
            value=size(),
        )
        connections = GaugeMetricFamily(
            "agentpost_database_pool_connections",
            "Open database connections of this process: in use by a call or idle in the pool.",
            labels=["state"],
        )
        connections.add_metric(["in_use"], checked_out())
        connections.add_metric(["idle"], checked_in())
        yield connections


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as (host, port); port 0 picks any free port."""
    host, port = host_and_port(address)
    return host or "0.0.0.0", port  # noqa: S104 - an empty host means every interface


def _answering_head(app: Any) -> Any:
    """The WSGI app, with HEAD answered as GET without its body (RFC 9110 allows a HEAD
    response no body; prometheus-client's app refuses HEAD with a 405 that has one)."""

    def answer(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") != "HEAD":
            return app(environ, start_response)
        body = app({**environ, "REQUEST_METHOD": "GET"}, start_response)
        close = getattr(body, "close", None)
        if close is not None:
            close()
        return []

    return answer


class MetricsEndpoint:
    """The call metrics, the state collector and the standard process series, served over HTTP."""

    def __init__(
        self,
        address: str,
        cache_stats: Callable[[], CacheStats],
        pool: Pool,
        subscribers: Callable[[], int],
        commits: Callable[[], CommitCounts],
        tls: ServerTls | None = None,
    ) -> None:
        self.address = address
        # `*_created` gauges (one per series, the time it first appeared) double the exposition
        # and no query here needs them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = CallMetrics(self.registry)
        self.registry.register(StateCollector(cache_stats, pool, subscribers, commits, tls))
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            # The default collectors are registered globally; the same objects serve here too.
            self.registry.register(standard)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        """Starts serving; returns the bound port. Raises OSError when the address is taken."""
        host, port = parse_address(self.address)
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        self._server.set_app(_answering_head(self._server.get_app()))
        self.port = int(self._server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        """Stops serving and closes the socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
