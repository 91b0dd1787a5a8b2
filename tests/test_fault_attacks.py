"""Faults of processes and databases while the service is busy: a PostgreSQL killed with SIGKILL
in the middle of a burst of writes, a PostgreSQL restarted under open WatchEvents streams on two
replicas, SIGTERM to a `serve` process under 32 writers, SIGKILL of a `serve --workers 2` worker
or supervisor on SQLite, the SQLite file moved away underneath a server, and an organization's
revision row held locked by another session.

Each test checks what a client can rely on through the gRPC surface: every acknowledged write is
stored, a retry with the same request id never stores a second record, nothing a client sent is
answered UNKNOWN or INTERNAL, and the service recovers by itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from agentpost.environments.v1 import (
    api_key_pb2,
    environment_pb2,
    environment_pb2_grpc,
    event_pb2_grpc,
    organization_pb2_grpc,
    resource_pb2,
    resource_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import (
    OPERATOR_TOKEN,
    Harness,
    auth,
    create_organization,
    every_event,
    every_page,
    failure_of,
    stored_events,
)
from tests.outages import CALL_TIMEOUT, Replica, start_database, stop_database, until
from tests.own_database import own_database
from tests.private_postgres import PrivatePostgres
from tests.servers import Backend, free_port, postgres_dsn, serving
from tests.watching import Watcher
from tests.workers import Served, process_gone, serve_workers
from tests.writes import assert_gapless, stored_resources

INBOX = resource_pb2.ScopedResource.Kind.INBOX
SERVING = health_pb2.HealthCheckResponse.SERVING
RECOVERY_SECONDS = 60.0
# Answers a write may get while its database or process fails: OK, or "busy or unreachable".
DATABASE_UNAVAILABLE = "UNAVAILABLE DATABASE_UNAVAILABLE"

on_postgres = pytest.mark.parametrize("database", ["postgres"])


def _code(error: grpc.aio.AioRpcError) -> str:
    failure = failure_of(error)
    return f"{failure.code.name} {failure.reason}".strip()


async def _answer(call: Awaitable[Any]) -> tuple[str, Any]:
    """("OK", response) or ("CODE REASON", None)."""
    try:
        return "OK", await call
    except grpc.aio.AioRpcError as error:
        return _code(error), None


def _register(
    channel: grpc.aio.Channel,
    secret: str,
    resource_id: str,
    request_id: str = "",
    timeout: float = CALL_TIMEOUT,
) -> Any:
    return resource_pb2_grpc.ResourceServiceStub(channel).RegisterResource(
        resource_pb2.RegisterResourceRequest(kind=INBOX, resource_id=resource_id, request_id=request_id),
        metadata=auth(secret),
        timeout=timeout,
    )


def _create(channel: grpc.aio.Channel, secret: str, name: str, request_id: str = "") -> Any:
    return environment_pb2_grpc.EnvironmentServiceStub(channel).CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name=name, request_id=request_id),
        metadata=auth(secret),
        timeout=CALL_TIMEOUT,
    )


async def _inboxes(channel: grpc.aio.Channel, secret: str) -> list[str]:
    """Every registered inbox id the caller may list, with repeats if any."""
    stub = resource_pb2_grpc.ResourceServiceStub(channel)
    return await every_page(
        lambda token: stub.ListResources(
            resource_pb2.ListResourcesRequest(kind=INBOX, page_size=500, page_token=token),
            metadata=auth(secret),
            timeout=CALL_TIMEOUT,
        ),
        lambda page: (resource.resource_id for resource in page.resources),
    )


async def _environment_names(channel: grpc.aio.Channel, secret: str) -> list[str]:
    """The names of every environment the caller may list, with repeats if any."""
    stub = environment_pb2_grpc.EnvironmentServiceStub(channel)
    return await every_page(
        lambda token: stub.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=500, page_token=token),
            metadata=auth(secret),
            timeout=CALL_TIMEOUT,
        ),
        lambda page: (environment.name for environment in page.environments),
    )


def _crash(pg: PrivatePostgres) -> None:
    """kill -9 of the cluster's postmaster and every process of it, at once: a machine crash as
    far as the clients can tell (no `pg_ctl`, no shutdown checkpoint)."""
    postmaster = int((pg._data / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    for pid in (postmaster, *map(int, children)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not all(process_gone(pid) for pid in (postmaster, *map(int, children))):
        assert time.monotonic() < deadline, "the killed cluster did not go away"
        time.sleep(0.05)


@on_postgres
async def test_postgres_killed_mid_burst_keeps_acknowledged_writes_and_retries_store_once(
    database: str,
    cluster: PrivatePostgres,
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    """kill -9 of PostgreSQL while 16 callers create environments and register inboxes, each with
    a request id; it is restarted 2 s later. Every answer is OK or UNAVAILABLE
    DATABASE_UNAVAILABLE; every OK is stored; every refused call, retried with the same request
    id once the database is back, succeeds and leaves exactly one record (never a duplicate, never
    RESOURCE_EXISTS/SLUG_TAKEN for its own first attempt); the replica is SERVING and writing
    again without a restart, and the event log has no gap."""
    replica = await replicas("crashed")
    owner = (await create_organization(replica.organizations, "Crash", CALL_TIMEOUT)).owner_api_key_secret
    attempts: list[tuple[str, str, str, str]] = []  # (kind, name, request id, first answer)
    crashed = asyncio.Event()
    stop_at: list[float] = []

    async def caller(number: int) -> None:
        sequence = 0
        while not stop_at or time.monotonic() < stop_at[0]:
            sequence += 1
            kind = "environment" if (number + sequence) % 2 else "inbox"
            name = f"c{number}-{sequence}-{uuid.uuid4().hex[:6]}"
            request_id = str(uuid.uuid4())
            if kind == "environment":
                code, _ = await _answer(_create(replica.channel, owner, name, request_id))
            else:
                code, _ = await _answer(_register(replica.channel, owner, name, request_id))
            attempts.append((kind, name, request_id, code))
            if crashed.is_set() and code != "OK":
                await asyncio.sleep(0.05)

    async def fault() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(_crash, cluster)
        crashed.set()
        await asyncio.sleep(2.0)
        await start_database(cluster)
        stop_at.append(time.monotonic() + 1.0)

    await asyncio.gather(fault(), *(caller(number) for number in range(16)))
    codes = collections.Counter(code for *_, code in attempts)
    print(f"\n[{database}] kill -9 mid-burst: {dict(codes)}")
    assert set(codes) <= {"OK", DATABASE_UNAVAILABLE}, (codes, replica.process.log_tail(60))
    assert codes["OK"] > 0 and codes[DATABASE_UNAVAILABLE] > 0, codes

    async def writes_again() -> bool:
        code, _ = await _answer(_register(replica.channel, owner, f"after-{uuid.uuid4().hex[:8]}"))
        assert code in ("OK", DATABASE_UNAVAILABLE), code
        return code == "OK"

    await until(writes_again, RECOVERY_SECONDS, "the replica writes again by itself")
    assert await replica.health() == SERVING

    retried: dict[str, str] = {}
    # The revisions the retries answered: a retry whose first attempt had committed (its answer
    # lost with the connection) is answered the first result under an empty revision.
    retry_revisions: set[int] = set()
    for kind, name, request_id, code in attempts:
        if code == "OK":
            continue
        if kind == "environment":
            call = _create(replica.channel, owner, name, request_id)
        else:
            call = _register(replica.channel, owner, name, request_id)
        again, _ = await _answer(call)
        retried[name] = again
        if again == "OK":
            trailers = dict(await call.trailing_metadata() or ())
            retry_revisions.add(int(trailers["x-agentpost-revision"]))
    assert set(retried.values()) == {"OK"}, collections.Counter(retried.values())

    environments = collections.Counter(await _environment_names(replica.channel, owner))
    inboxes = collections.Counter(await _inboxes(replica.channel, owner))
    for kind, name, _, _ in attempts:
        stored = environments[name] if kind == "environment" else inboxes[name]
        assert stored == 1, f"{kind} {name} stored {stored} times"
    events = await every_event(
        event_pb2_grpc.EventServiceStub(replica.channel), auth(owner), deadline=CALL_TIMEOUT
    )
    # Every revision holds its write's events, but for those of retries answered the first result.
    with_events = {event.revision for event in events}
    missing = set(range(1, max(with_events) + 1)) - with_events
    assert missing <= retry_revisions, (sorted(missing), sorted(retry_revisions))


@on_postgres
async def test_watch_streams_and_revocations_survive_a_postgres_restart_under_two_replicas(
    database: str,
    cluster: PrivatePostgres,
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    """PostgreSQL stopped (immediate) and started again while WatchEvents streams are open on two
    replicas and each holds its LISTEN connection, with the production refresh interval (1 s).
    Each stream either goes on or ends UNAVAILABLE DATABASE_UNAVAILABLE; one that goes on
    delivers the writes made after the restart on either replica. A revoke on A is then refused
    by B within the documented hard bound (the poll interval plus a read; 3 s allowed)."""
    a = await replicas("watch-a", AGENTPOST_CACHE_REFRESH_SECONDS="1")
    b = await replicas("watch-b", AGENTPOST_CACHE_REFRESH_SECONDS="1")
    owner = (await create_organization(a.organizations, "Watched", CALL_TIMEOUT)).owner_api_key_secret
    created = await a.api_keys.CreateApiKey(
        api_key_pb2.CreateApiKeyRequest(name="to revoke", scopes=["inboxes:read"]),
        metadata=auth(owner),
        timeout=CALL_TIMEOUT,
    )
    for replica in (a, b):
        assert (await replica.verify(created.secret)).valid
    watchers = {"a": Watcher(a.channel, owner), "b": Watcher(b.channel, owner)}
    try:
        for watcher in watchers.values():
            await watcher.live()

        await stop_database(cluster)
        await asyncio.sleep(1.5)
        await start_database(cluster)
        for replica in (a, b):
            await until(
                lambda replica=replica: _write_ok(replica, owner),  # type: ignore[misc]
                RECOVERY_SECONDS,
                f"{replica.process.name} writes again",
            )
        call = _create(b.channel, owner, "After the restart on B")
        await call
        revision = int(dict(await call.trailing_metadata())["x-agentpost-revision"])
        for name, watcher in watchers.items():
            if watcher.ended:
                assert watcher.failure is not None
                assert f"{watcher.failure.code.name} {watcher.failure.reason}" == DATABASE_UNAVAILABLE, (
                    name,
                    watcher.failure,
                )
                continue
            await watcher.reached(revision, seconds=10.0)
            delivered = {event.revision for event in watcher.events}
            assert revision in delivered, (name, sorted(delivered))
            assert "After the restart on B" in {
                event.environment.name for event in watcher.events if event.HasField("environment")
            }

        await a.api_keys.RevokeApiKey(
            api_key_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=auth(owner), timeout=CALL_TIMEOUT
        )

        async def b_refuses() -> bool:
            return not (await b.verify(created.secret)).valid

        took = await until(b_refuses, 3.0, "replica B refuses the key revoked on A after the restart")
        print(
            f"\n[{database}] after a restart: streams "
            + ", ".join(f"{n} {'ended' if w.ended else 'went on'}" for n, w in watchers.items())
            + f"; revoke seen by B after {took * 1000:.0f} ms"
        )
    finally:
        for watcher in watchers.values():
            await watcher.close()


async def _write_ok(replica: Replica, owner: str) -> bool:
    code, _ = await _answer(_create(replica.channel, owner, f"Probe {uuid.uuid4().hex[:8]}"))
    assert code in ("OK", DATABASE_UNAVAILABLE), code
    return code == "OK"


async def _spawn_serve(
    backend: Backend, tmp_path: Path, port: int, drain: float, grace: float, *flags: str
) -> Any:
    """`serve` with `flags` in a process of its own, its output in a file (a pipe nobody reads
    would block its logging)."""
    environment = backend.environment(
        {
            "AGENTPOST_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "AGENTPOST_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "AGENTPOST_SHUTDOWN_DRAIN_SECONDS": str(drain),
            "AGENTPOST_SHUTDOWN_GRACE_SECONDS": str(grace),
            "AGENTPOST_DATABASE_TIMEOUT_SECONDS": "2",
            "AGENTPOST_CACHE_REFRESH_SECONDS": "0.2",
        }
    )
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as output:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "serve",
            *flags,
            env=environment,
            stdout=output,
            stderr=output,
        ), log


async def _until_serving(channel: grpc.aio.Channel, process: Any) -> None:
    async with asyncio.timeout(60):
        while True:
            assert process.returncode is None, "the server exited while starting"
            try:
                checked = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if checked.status == SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)


# Answers a call may get while its server process stops or dies: the transport's UNAVAILABLE
# (with or without the service's reason) or the runtime's CANCELLED for a call it dropped.
STOPPING = ("OK", "UNAVAILABLE", "CANCELLED")


def _stopping_answer(code: str) -> bool:
    return code.split()[0] in STOPPING


async def _write_until_refused(
    channel: grpc.aio.Channel, owner: str, prefix: str, answers: dict[str, str], stop: asyncio.Event
) -> None:
    """Registers inboxes one after another until a call is refused (or `stop` is set)."""
    sequence = 0
    while not stop.is_set():
        sequence += 1
        name = f"{prefix}-{sequence}"
        code, _ = await _answer(_register(channel, owner, name))
        answers[name] = code
        if code != "OK":
            return


async def _stored_after(backend: Backend, organization_id: str) -> set[str]:
    """The inboxes stored for the organization, read by a new server on the same database; the
    event log must have no gap."""
    async with serving(backend) as harness:
        stored = {key.split(":", 1)[1] for key in await stored_resources(harness, organization_id)}
        assert_gapless(await stored_events(harness, organization_id))
    return stored


async def test_sigterm_under_32_writers_loses_no_acknowledged_write(backend: Backend, tmp_path: Path) -> None:
    """SIGTERM to `serve` while 32 callers register inboxes: the process exits 0 within the drain
    plus the grace; every call is answered OK, UNAVAILABLE or (at the instant the server stops
    accepting) CANCELLED; every acknowledged write is there for a new server on the same
    database, nothing that was never sent is, and the event log has no gap."""
    database = own_database(backend, tmp_path / "db")
    port = free_port()
    drain, grace = 0.5, 5.0
    process, log = await _spawn_serve(database, tmp_path, port, drain, grace, "--migrate")
    answers: dict[str, str] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _until_serving(channel, process)
            org = await create_organization(organization_pb2_grpc.OrganizationServiceStub(channel), "Sigterm")
            owner = org.owner_api_key_secret
            stop = asyncio.Event()
            writers = [
                asyncio.ensure_future(_write_until_refused(channel, owner, f"w{n}", answers, stop))
                for n in range(32)
            ]
            await asyncio.sleep(1.0)
            before = dict(answers)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            async with asyncio.timeout(60):
                status = await process.wait()
            took = time.monotonic() - signalled
            stop.set()
            async with asyncio.timeout(60):
                await asyncio.gather(*writers)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = log.read_text(errors="replace")
    assert status == 0, output[-3000:]
    assert took < drain + grace + 10, f"exited {took:.1f} s after SIGTERM"
    assert set(before.values()) <= {"OK"}, collections.Counter(before.values())
    codes = collections.Counter(answers.values())
    print(f"\n[{backend.name}] SIGTERM under 32 writers: {dict(codes)}, exit {status} after {took:.1f} s")
    assert all(_stopping_answer(code) for code in codes), codes
    acknowledged = {name for name, code in answers.items() if code == "OK"}
    assert len(acknowledged) >= 32

    stored = await _stored_after(database, org.organization.id)
    assert acknowledged <= stored, sorted(acknowledged - stored)[:10]
    assert stored <= set(answers), sorted(stored - set(answers))[:10]
    async with serving(database) as harness:
        assert acknowledged <= set(await _inboxes(harness.channel, owner))


@pytest.mark.parametrize("victim", ["worker", "supervisor"])
async def test_sigkill_under_sqlite_writes_with_two_workers_leaves_a_sound_file(
    victim: str, tmp_path: Path
) -> None:
    """SIGKILL of one `serve --workers 2` worker (the supervisor then stops the other and exits
    1) or of the supervisor (the workers drain and exit by themselves) while 16 callers on 8
    connections register inboxes on SQLite. Every answer is OK, UNAVAILABLE or CANCELLED; the
    file passes `PRAGMA integrity_check`; a new server on it finds every acknowledged write and
    nothing never sent, and the event log has no gap."""
    path = tmp_path / "workers.db"
    database = Backend("sqlite", f"sqlite+aiosqlite:///{path}", None)
    served: Served = await serve_workers(database, tmp_path, "--migrate")
    workers: set[int] = set()
    answers: dict[str, str] = {}
    channels: list[grpc.aio.Channel] = []
    try:
        await served.until_serving()
        workers = served.worker_pids()
        assert len(workers) == 2
        channels = [served.channel() for _ in range(8)]
        org = await create_organization(organization_pb2_grpc.OrganizationServiceStub(channels[0]), "Killed")
        owner = org.owner_api_key_secret
        stop = asyncio.Event()
        writers = [
            asyncio.ensure_future(
                _write_until_refused(channels[n % len(channels)], owner, f"w{n}", answers, stop)
            )
            for n in range(16)
        ]
        await asyncio.sleep(1.0)
        if victim == "worker":
            os.kill(min(workers), signal.SIGKILL)
            async with asyncio.timeout(30):
                status = await served.process.wait()
            assert status == 1, served.log()[-3000:]
        else:
            await served.stop(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not all(process_gone(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers still running 30 s on:\n{served.log()[-3000:]}"
            await asyncio.sleep(0.1)
        stop.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*writers)
    finally:
        for channel in channels:
            await channel.close()
        await served.stop(signal.SIGKILL)
        for pid in workers:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
    codes = collections.Counter(answers.values())
    print(f"\n[sqlite] SIGKILL of the {victim} under 16 writers: {dict(codes)}")
    assert all(_stopping_answer(code) for code in codes), codes
    acknowledged = {name for name, code in answers.items() if code == "OK"}
    assert acknowledged

    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    stored = await _stored_after(database, org.organization.id)
    assert acknowledged <= stored, sorted(acknowledged - stored)[:10]
    assert stored <= set(answers), sorted(stored - set(answers))[:10]


async def test_sqlite_file_moved_away_refuses_writes_cleanly_and_recovers_when_it_returns(
    tmp_path: Path,
) -> None:
    """The SQLite file renamed away underneath a serving process (as a careless backup or
    deploy script would), then put back; then deleted. Writes meanwhile are refused as UNAVAILABLE
    DATABASE_UNAVAILABLE (SQLite refuses to write to a moved file) or succeed, reads answer or
    are UNAVAILABLE, never UNKNOWN or INTERNAL; once the file is back writes succeed by themselves
    and every acknowledged write is there."""
    path = tmp_path / "moved" / "agentpost.db"
    path.parent.mkdir()
    database = Backend("sqlite", f"sqlite+aiosqlite:///{path}", None)
    async with serving(database) as harness:
        org = await harness.new_org("Moved")
        owner = org.owner_secret
        acknowledged: set[str] = set()
        assert (await _answer(_register(harness.channel, owner, "before")))[0] == "OK"
        acknowledged.add("before")

        async def attempts(label: str) -> collections.Counter[str]:
            seen: collections.Counter[str] = collections.Counter()
            for index in range(5):
                name = f"{label}-{index}"
                code, _ = await _answer(_register(harness.channel, owner, name))
                seen[f"register {code}"] += 1
                if code == "OK":
                    acknowledged.add(name)
                code, _ = await _answer(_create(harness.channel, owner, f"{label} {index}"))
                seen[f"create {code}"] += 1
                code, _ = await _answer(
                    harness.api_keys.CreateApiKey(
                        api_key_pb2.CreateApiKeyRequest(name=f"{label} {index}", scopes=["inboxes:read"]),
                        metadata=auth(owner),
                        timeout=CALL_TIMEOUT,
                    )
                )
                seen[f"key {code}"] += 1
                code, _ = await _answer(
                    resource_pb2_grpc.ResourceServiceStub(harness.channel).GetResource(
                        resource_pb2.GetResourceRequest(kind=INBOX, resource_id="before"),
                        metadata=auth(owner),
                        timeout=CALL_TIMEOUT,
                    )
                )
                seen[f"read {code}"] += 1
            return seen

        moved = path.with_name("elsewhere.db")
        path.rename(moved)
        while_moved = await attempts("moved")
        moved.rename(path)
        print(f"\n[sqlite] while the file was moved away: {dict(while_moved)}")
        assert all(key.split(" ", 1)[1] in ("OK", DATABASE_UNAVAILABLE) for key in while_moved), while_moved

        async def writes_again() -> bool:
            code, _ = await _answer(_register(harness.channel, owner, f"back-{uuid.uuid4().hex[:6]}"))
            assert code in ("OK", DATABASE_UNAVAILABLE), code
            return code == "OK"

        await until(writes_again, 10.0, "writes succeed once the file is back")
        assert acknowledged <= set(await _inboxes(harness.channel, owner))
        assert_gapless(await stored_events(harness, org.id))

        path.unlink()
        deleted = await attempts("deleted")
        print(f"[sqlite] after the file was deleted: {dict(deleted)}")
        assert all(key.split(" ", 1)[1] in ("OK", DATABASE_UNAVAILABLE) for key in deleted), deleted


@contextlib.asynccontextmanager
async def _organization_locked(backend: Backend, organization_id: str) -> AsyncIterator[None]:
    """Another session holds the organization's row (its revision) FOR UPDATE while the block
    runs, as a long transaction or a stuck migration would."""
    connection = await asyncpg.connect(postgres_dsn(backend.url))
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute(f'SET LOCAL search_path TO "{backend.schema}"')
        locked = await connection.fetchval(
            "SELECT revision FROM organizations WHERE id = $1 FOR UPDATE", organization_id
        )
        assert locked is not None
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await connection.close()


async def test_an_organization_locked_elsewhere_times_out_alone(backend: Backend, harness: Harness) -> None:
    """An organization's revision row held FOR UPDATE by another session: its writes (with and
    without request ids, 2 s deadlines) end DEADLINE_EXCEEDED or UNAVAILABLE, never OK and never
    a fault; meanwhile another organization writes and the locked one's reads answer. Once the
    lock goes, the organization writes again; a timed-out write retried with its request id
    succeeds and leaves one record; nothing is stored twice and the event log has no gap."""
    if backend.schema is None:
        pytest.skip("a row lock held by another PostgreSQL session")
    locked = await harness.new_org("Locked")
    free = await harness.new_org("Free")
    for org in (locked, free):
        assert (await harness.verify(org.owner_secret)).valid
        assert (await _answer(_register(harness.channel, org.owner_secret, "warm")))[0] == "OK"

    attempted: dict[str, str] = {}  # name -> request id ("" for none)
    async with _organization_locked(backend, locked.id):

        async def locked_write(index: int) -> str:
            name = f"locked-{index}"
            attempted[name] = str(uuid.uuid4()) if index % 2 else ""
            code, _ = await _answer(
                _register(harness.channel, locked.owner_secret, name, attempted[name], 2.0)
            )
            return code

        async def free_write(index: int) -> tuple[str, float]:
            began = time.monotonic()
            code, _ = await _answer(_register(harness.channel, free.owner_secret, f"free-{index}"))
            return code, time.monotonic() - began

        async def locked_read() -> str:
            code, _ = await _answer(
                harness.environments.ListEnvironments(
                    environment_pb2.ListEnvironmentsRequest(), metadata=auth(locked.owner_secret), timeout=5.0
                )
            )
            verified = await harness.verify(locked.owner_secret)
            return code if verified.valid else "NOT VALID"

        blocked = asyncio.gather(*(locked_write(index) for index in range(20)))
        await asyncio.sleep(0.3)
        others = await asyncio.gather(*(free_write(index) for index in range(20)))
        reads = await asyncio.gather(*(locked_read() for _ in range(5)))
        locked_codes = collections.Counter(await blocked)
    print(
        f"\n[{backend.name}] locked organization: {dict(locked_codes)}; other organization: "
        f"{collections.Counter(code for code, _ in others)}, slowest {max(s for _, s in others):.2f} s"
    )
    assert set(locked_codes) <= {"DEADLINE_EXCEEDED", DATABASE_UNAVAILABLE}, locked_codes
    assert {code for code, _ in others} == {"OK"}, others
    assert max(seconds for _, seconds in others) < 5.0, others
    assert set(reads) == {"OK"}, reads

    async def writes_again() -> bool:
        code, _ = await _answer(
            _register(harness.channel, locked.owner_secret, f"after-{uuid.uuid4().hex[:6]}")
        )
        assert code in ("OK", "DEADLINE_EXCEEDED", DATABASE_UNAVAILABLE), code
        return code == "OK"

    await until(writes_again, 30.0, "the organization writes again once the lock is gone")
    for name, request_id in attempted.items():
        if request_id:
            code, _ = await _answer(_register(harness.channel, locked.owner_secret, name, request_id))
            assert code == "OK", (name, code)
    inboxes = collections.Counter(await _inboxes(harness.channel, locked.owner_secret))
    assert all(inboxes[name] == 1 for name, request_id in attempted.items() if request_id), inboxes
    assert all(count == 1 for count in inboxes.values()), inboxes
    assert_gapless(await stored_events(harness, locked.id))


@on_postgres
async def test_a_server_started_during_an_outage_serves_once_the_database_answers_and_stops_cleanly(
    database: str,
    cluster: PrivatePostgres,
    tmp_path: Path,
) -> None:
    """`serve` started while PostgreSQL is down: it listens, health is NOT_SERVING and calls that
    need the database are UNAVAILABLE DATABASE_UNAVAILABLE (§7: NOT_SERVING until the database
    has answered once); when the database starts it turns SERVING and writes by itself. With the
    database down again, SIGTERM still ends it with status 0 within the drain plus the grace
    (shutdown always closes the pool, §5)."""
    await stop_database(cluster)
    port = free_port()
    process, log = await _spawn_serve(Backend("postgres", cluster.url, None), tmp_path, port, 0.2, 2.0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            organizations = organization_pb2_grpc.OrganizationServiceStub(channel)

            async def answers_health() -> bool:
                assert process.returncode is None, log.read_text(errors="replace")[-3000:]
                try:
                    checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                except grpc.aio.AioRpcError:
                    return False
                assert checked.status != SERVING, "SERVING before the database ever answered"
                return True

            await until(answers_health, RECOVERY_SECONDS, "the server listens while the database is down")
            code, _ = await _answer(create_organization(organizations, "Too early", CALL_TIMEOUT))
            assert code == DATABASE_UNAVAILABLE, code

            await start_database(cluster)

            async def serving_now() -> bool:
                checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
                return bool(checked.status == SERVING)

            await until(serving_now, RECOVERY_SECONDS, "SERVING once the database answers")
            owner = (await create_organization(organizations, "On time", CALL_TIMEOUT)).owner_api_key_secret
            assert (await _answer(_register(channel, owner, "first")))[0] == "OK"

        await stop_database(cluster)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        async with asyncio.timeout(60):
            status = await process.wait()
        took = time.monotonic() - signalled
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = log.read_text(errors="replace")
    assert status == 0, output[-3000:]
    assert took < 0.2 + 2.0 + 10, f"exited {took:.1f} s after SIGTERM"
