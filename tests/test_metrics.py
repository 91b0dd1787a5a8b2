"""Prometheus metrics: a server with AGENTPOST_METRICS_ADDRESS serves /metrics, and the series count
the calls that really happened, refusals (ended by `context.abort`) with their own codes."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as pb
from agentpost.environments.v1 import environment_pb2, organization_pb2, resource_pb2
from prometheus_client.parser import text_string_to_metric_families

from service.app.config import Settings
from service.app.metrics import parse_address
from service.app.server import Application, BindError
from service.domain import keys
from service.domain.models import KeyMode
from tests.harness import Harness, auth, fails
from tests.own_database import own_database
from tests.servers import Backend, start_server
from tests.watching import Watcher

ORG = "agentpost.environments.v1.OrganizationService"
ENVIRONMENTS = "agentpost.environments.v1.EnvironmentService"
KEYS = "agentpost.environments.v1.ApiKeyService"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def metered(backend: Backend, tmp_path: Path) -> AsyncIterator[Harness]:
    """A server of its own with metrics on, on any free port."""
    app, channel = await start_server(own_database(backend, tmp_path), metrics_address="127.0.0.1:0")
    try:
        yield Harness(app, channel, backend.name)
    finally:
        await channel.close()
        await app.stop(grace=0)


async def scrape(harness: Harness) -> tuple[str, Samples]:
    """GET /metrics; the text and every sample by name and labels."""
    assert harness.app.metrics is not None
    url = f"http://127.0.0.1:{harness.app.metrics.port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


async def scrape_until(harness: Harness, ready: Callable[[Samples], bool]) -> tuple[str, Samples]:
    """Scrapes until `ready` holds (at most 5 s). A call ended by `context.abort` is answered
    before the interceptor's `finally` counts it, so its count may lag its answer by a moment."""
    for _ in range(500):  # 10 ms apart: at most 5 s
        text, samples = await scrape(harness)
        if ready(samples):
            break
        await asyncio.sleep(0.01)
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, service: str, method: str, code: str) -> float:
    return value(
        samples,
        "grpc_server_handled_total",
        grpc_type="unary",
        grpc_service=service,
        grpc_method=method,
        grpc_code=code,
    )


def verified(samples: Samples, outcome: str) -> float:
    return value(samples, "agentpost_verify_api_key_total", outcome=outcome)


async def test_calls_are_counted_by_method_and_code(metered: Harness) -> None:
    org = await metered.new_org()
    _, before = await scrape(metered)
    get_organization = organization_pb2.GetOrganizationRequest()
    for _ in range(3):
        await metered.organizations.GetOrganization(get_organization, metadata=auth(org.owner_secret))
    corrupted = org.owner_secret[:-1] + ("A" if org.owner_secret[-1] != "A" else "B")
    for _ in range(2):
        # Refused by the authentication interceptor with context.abort.
        await fails(
            metered.organizations.GetOrganization(get_organization, metadata=auth(corrupted)),
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_MALFORMED",
        )
    # Refused by the use case: a domain error, turned into an abort.
    await fails(
        metered.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name="Bad", slug="-bad-"),
            metadata=auth(org.owner_secret),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
        await metered.channel.unary_unary("/agentpost.environments.v1.NoSuchService/NoSuchMethod")(b"")
    assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED

    def grew(after: Samples, method: str, code: str, service: str = ORG) -> float:
        return handled(after, service, method, code) - handled(before, service, method, code)

    text, after = await scrape_until(
        metered,
        lambda after: (
            grew(after, "GetOrganization", "UNAUTHENTICATED") >= 2
            and grew(after, "CreateEnvironment", "INVALID_ARGUMENT", ENVIRONMENTS) >= 1
        ),
    )

    def delta(method: str, code: str, service: str = ORG) -> float:
        return grew(after, method, code, service)

    assert delta("GetOrganization", "OK") == 3
    assert delta("GetOrganization", "UNAUTHENTICATED") == 2
    assert delta("CreateEnvironment", "INVALID_ARGUMENT", ENVIRONMENTS) == 1
    assert delta("CreateEnvironment", "OK", ENVIRONMENTS) == 0
    unknown = {"grpc_type": "unknown", "grpc_service": "unknown", "grpc_method": "unknown"}
    assert (
        value(after, "grpc_server_handled_total", grpc_code="UNIMPLEMENTED", **unknown)
        - value(before, "grpc_server_handled_total", grpc_code="UNIMPLEMENTED", **unknown)
        == 1
    )
    # Every call observed once in the latency histogram, within the +Inf bucket.
    labels = {"grpc_type": "unary", "grpc_service": ORG, "grpc_method": "GetOrganization"}
    count = value(after, "grpc_server_handling_seconds_count", **labels)
    assert count - value(before, "grpc_server_handling_seconds_count", **labels) == 5
    assert value(after, "grpc_server_handling_seconds_bucket", le="+Inf", **labels) == count
    assert value(after, "grpc_server_handling_seconds_sum", **labels) > 0
    # The exposition carries help text and types, as Prometheus expects.
    assert "# TYPE grpc_server_handled_total counter" in text
    assert "# TYPE grpc_server_handling_seconds histogram" in text


async def test_verify_outcomes_and_cache_hits_are_counted(metered: Harness) -> None:
    org = await metered.new_org()
    _, secret = await metered.new_key(org, ["inboxes:read"], [org.default_environment.id])
    # Warm the key: its first lookup reads the database.
    first = await metered.api_keys.VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret))
    assert first.valid
    _, before = await scrape(metered)

    for _ in range(4):
        answer = await metered.api_keys.VerifyApiKey(
            pb.VerifyApiKeyRequest(secret=secret, required_scopes=["inboxes:read"])
        )
        assert answer.valid
    missing = await metered.api_keys.VerifyApiKey(
        pb.VerifyApiKeyRequest(secret=secret, required_scopes=["inboxes:write"])
    )
    assert missing.denial_reason == pb.VerifyApiKeyResponse.SCOPE_MISSING
    malformed = await metered.api_keys.VerifyApiKey(pb.VerifyApiKeyRequest(secret="ap_sk_live_nope"))
    assert malformed.denial_reason == pb.VerifyApiKeyResponse.MALFORMED
    await fails(
        metered.api_keys.VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret, required_scopes=["nope:read"])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    _, after = await scrape_until(
        metered,
        lambda after: (
            handled(after, KEYS, "VerifyApiKey", "INVALID_ARGUMENT")
            > handled(before, KEYS, "VerifyApiKey", "INVALID_ARGUMENT")
        ),
    )
    assert verified(after, "VALID") - verified(before, "VALID") == 4
    assert verified(after, "SCOPE_MISSING") - verified(before, "SCOPE_MISSING") == 1
    assert verified(after, "MALFORMED") - verified(before, "MALFORMED") == 1
    # An invalid request is an error, not an outcome.
    assert (
        sum(v for (name, _), v in after.items() if name == "agentpost_verify_api_key_total")
        - sum(v for (name, _), v in before.items() if name == "agentpost_verify_api_key_total")
        == 6
    )
    assert handled(after, KEYS, "VerifyApiKey", "OK") - handled(before, KEYS, "VerifyApiKey", "OK") == 6
    assert (
        handled(after, KEYS, "VerifyApiKey", "INVALID_ARGUMENT")
        - handled(before, KEYS, "VerifyApiKey", "INVALID_ARGUMENT")
        == 1
    )
    # Five lookups of a warm key (the malformed secret is refused before any lookup, the unknown
    # scope before the key is looked up): all hits.
    assert delta(before, after, "agentpost_access_cache_key_hits_total") == 5
    assert delta(before, after, "agentpost_access_cache_key_misses_total") == 0

    # A well-formed secret of no key is looked up every time: unknown secrets are never cached.
    unknown = keys.generate(KeyMode.LIVE).secret
    for _ in range(2):
        answer = await metered.api_keys.VerifyApiKey(pb.VerifyApiKeyRequest(secret=unknown))
        assert answer.denial_reason == pb.VerifyApiKeyResponse.NOT_FOUND
    _, last = await scrape(metered)
    assert delta(after, last, "agentpost_access_cache_key_misses_total") == 2
    assert verified(last, "NOT_FOUND") - verified(after, "NOT_FOUND") == 2


def delta(before: Samples, after: Samples, name: str) -> float:
    """How much an unlabelled series grew."""
    return value(after, name) - value(before, name)


async def test_cache_and_pool_state_is_read_at_scrape_time(metered: Harness) -> None:
    org = await metered.new_org()
    await metered.organizations.GetOrganization(
        organization_pb2.GetOrganizationRequest(), metadata=auth(org.owner_secret)
    )
    _, samples = await scrape(metered)
    stats = metered.app.access.stats()
    assert value(samples, "agentpost_access_cache_entries", cache="keys") == stats.keys >= 1
    assert value(samples, "agentpost_access_cache_entries", cache="organizations") == stats.organizations >= 1
    database = metered.app.database
    pool = database.read_pool
    assert value(samples, "agentpost_database_pool_size") == pool.size()  # type: ignore[attr-defined]
    # Background work (polls, catch-ups) may hold a connection at any moment, so the test holds
    # two of its own (a unit of work holds its connection from start to end) and looks for them.
    async with database.read(), database.read():
        _, held = await scrape(metered)
    _, released = await scrape(metered)
    in_use, idle = (
        value(held, "agentpost_database_pool_connections", state="in_use"),
        value(released, "agentpost_database_pool_connections", state="idle"),
    )
    assert in_use >= 2
    assert idle + value(released, "agentpost_database_pool_connections", state="in_use") >= 2
    # The standard process series come along.
    assert value(samples, "process_resident_memory_bytes") > 0


async def test_metrics_are_off_unless_an_address_is_set(backend: Backend) -> None:
    assert Settings(database_url=backend.url).metrics_address is None  # type: ignore[call-arg]
    app = Application(backend.settings())
    try:
        assert app.metrics is None
    finally:
        await app.database.dispose()


async def test_a_taken_metrics_port_fails_the_start(
    metered: Harness, backend: Backend, tmp_path: Path
) -> None:
    assert metered.app.metrics is not None
    taken = f"127.0.0.1:{metered.app.metrics.port}"
    app = Application(own_database(backend, tmp_path / "second").settings(metrics_address=taken))
    try:
        await app.migrate()
        with pytest.raises(BindError, match="metrics"):
            await app.start()
    finally:
        await app.server.stop(0)
        await app.database.dispose()


def test_metrics_addresses_are_host_and_port() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address(":9464") == ("0.0.0.0", 9464)
    with pytest.raises(ValueError, match="host:port"):
        parse_address("9464x")


async def test_open_event_streams_are_counted(metered: Harness) -> None:
    org = await metered.new_org()
    _, before = await scrape(metered)
    assert value(before, "agentpost_event_stream_subscribers") == 0
    watchers = [Watcher(metered.channel, org.owner_secret) for _ in range(2)]
    try:
        for watcher in watchers:
            await watcher.live()
        _, watching = await scrape(metered)
        assert value(watching, "agentpost_event_stream_subscribers") == 2
    finally:
        for watcher in watchers:
            await watcher.close()
    # A closed stream unsubscribes as its handler ends, a moment after the client cancelled.
    _, after = await scrape_until(metered, lambda s: value(s, "agentpost_event_stream_subscribers") == 0)
    assert value(after, "agentpost_event_stream_subscribers") == 0


async def test_revision_lag_shows_revisions_heard_of_and_not_yet_applied(
    metered: Harness, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    org = await metered.new_org()
    # The metered replica follows the organization once it serves a call of its key.
    await metered.organizations.GetOrganization(
        organization_pb2.GetOrganizationRequest(), metadata=auth(org.owner_secret)
    )
    _, before = await scrape(metered)
    assert value(before, "agentpost_revision_lag") == 0
    # Tests poll every 0.2 s: the database confirmed the view moments ago.
    assert 0 <= value(before, "agentpost_revision_unconfirmed_seconds") < 5

    # Another replica of the same database writes twice, while the metered one holds back
    # reading the log: it hears of the revisions (notification or poll) but cannot apply them.
    async def held_back(_organization_id: str) -> None:
        return None

    monkeypatch.setattr(metered.app.access, "catch_up", held_back)
    other, channel = await start_server(own_database(backend, tmp_path))
    try:
        writer = Harness(other, channel, backend.name)
        for name in ("Lag one", "Lag two"):
            await writer.environments.CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name=name), metadata=auth(org.owner_secret)
            )
    finally:
        await channel.close()
        await other.stop(grace=0)
    _, behind = await scrape_until(metered, lambda s: value(s, "agentpost_revision_lag") >= 2)
    assert value(behind, "agentpost_revision_lag") == 2

    monkeypatch.undo()
    _, caught_up = await scrape_until(metered, lambda s: value(s, "agentpost_revision_lag") == 0)
    assert value(caught_up, "agentpost_revision_lag") == 0


async def test_own_commits_are_applied_without_reading_the_log(metered: Harness) -> None:
    """A replica hears of its own commits too (its own NOTIFY on PostgreSQL, its poll on SQLite),
    under load often before the writer has resumed to apply them. It then waits for its writer
    instead of reading the log: 320 writes, 32 at a time, read it at most once (before, on
    PostgreSQL, 11-30 times)."""
    org = await metered.new_org()
    _, before = await scrape(metered)

    async def register(worker: int) -> None:
        for index in range(10):
            await metered.resources.RegisterResource(
                resource_pb2.RegisterResourceRequest(
                    kind=resource_pb2.ScopedResource.Kind.INBOX, resource_id=f"inbox-{worker}-{index}"
                ),
                metadata=auth(org.owner_secret),
            )

    await asyncio.gather(*(register(worker) for worker in range(32)))
    # Any catch-up a late notification starts has begun within its grace and waits (see access).
    await asyncio.sleep(0.2)
    _, after = await scrape(metered)
    reads = value(after, "agentpost_event_log_reads_total") - value(before, "agentpost_event_log_reads_total")
    assert reads <= 1
    assert metered.app.access.stats().revision_lag == 0


async def test_commits_and_the_writes_they_held_are_counted(metered: Harness) -> None:
    """Forty registrations at once: each is a committed write. On SQLite, writers that queued
    shared commits, so there are fewer commits than writes; on PostgreSQL each is its own."""
    org = await metered.new_org()
    _, before = await scrape(metered)
    calls = [
        metered.resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(
                kind=resource_pb2.ScopedResource.INBOX, resource_id=f"c-{n}"
            ),
            metadata=auth(org.owner_secret),
        )
        for n in range(40)
    ]
    await asyncio.gather(*calls)
    _, after = await scrape(metered)
    writes = value(after, "agentpost_database_committed_writes_total") - value(
        before, "agentpost_database_committed_writes_total"
    )
    commits = value(after, "agentpost_database_commits_total") - value(
        before, "agentpost_database_commits_total"
    )
    # Other writes may commit meanwhile (a flush of keys' last use), never fewer.
    assert writes >= 40, writes
    if metered.backend == "sqlite":
        assert 1 <= commits < writes, (commits, writes)
    else:
        assert commits == writes
