"""A database outage under real server processes: the database is a private PostgreSQL cluster
(never the shared one) that the test stops and starts.

While it is down, every call that needs the database is UNAVAILABLE DATABASE_UNAVAILABLE (never
UNKNOWN, INTERNAL or a hang), warm keys keep verifying from memory and health stays SERVING for at
most the configured staleness; when it is back, writes succeed again and replicas notice each
other's revocations within the usual bound. The figures printed here are the README's.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from agentpost.environments.v1 import (
    api_key_pb2,
    environment_pb2,
    event_pb2,
    event_pb2_grpc,
    organization_pb2,
    resource_pb2,
    resource_pb2_grpc,
)
from grpc_health.v1 import health_pb2
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.domain.errors import DomainError, ResourceExhausted, Unavailable
from service.storage.database import PING_AFTER_IDLE_SECONDS, translated_errors
from service.storage.errors import unreachable
from tests.harness import Harness, Org, auth, create_organization, every_event, failure_of
from tests.outages import (
    CALL_TIMEOUT,
    REFRESH_SECONDS,
    Replica,
    start_database,
    stop_database,
    until,
)
from tests.private_postgres import PrivatePostgres

REVOCATION_BOUND_SECONDS = 3.0
RECOVERY_BOUND_SECONDS = 60.0
WARM_VERIFIES = 50

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Named [postgres] so that, under CI=true, a skip fails the run like every PostgreSQL test.
on_postgres = pytest.mark.parametrize("database", ["postgres"])


class Codes:
    """The outcome of each call made during the outage, by code and reason."""

    def __init__(self) -> None:
        self.seen: collections.Counter[str] = collections.Counter()

    async def call(self, call: Awaitable[object]) -> object | None:
        """Runs the call and records OK or its code and reason; returns its response, if any."""
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            self.seen[f"{failure.code.name} {failure.reason}".strip()] += 1
            return None
        self.seen["OK"] += 1
        return response

    async def unavailable(self, call: Awaitable[object]) -> None:
        """The call must be UNAVAILABLE DATABASE_UNAVAILABLE."""
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            self.seen[f"{failure.code.name} {failure.reason}"] += 1
            assert (failure.code, failure.reason) == (UNAVAILABLE, "DATABASE_UNAVAILABLE"), (
                f"{failure.code} {failure.reason}: {failure.message}"
            )
            return
        raise AssertionError(f"expected UNAVAILABLE during the outage, got {response}")


async def _write_works(replica: Replica, secret: str) -> bool:
    """True when CreateEnvironment commits on this replica; UNAVAILABLE means not yet."""
    try:
        await replica.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name=f"After {uuid.uuid4().hex[:8]}"),
            metadata=auth(secret),
            timeout=CALL_TIMEOUT,
        )
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        assert (failure.code, failure.reason) == (UNAVAILABLE, "DATABASE_UNAVAILABLE"), failure
        return False
    return True


async def _new_key(replica: Replica, owner_secret: str, name: str) -> tuple[str, str]:
    response = await replica.api_keys.CreateApiKey(
        api_key_pb2.CreateApiKeyRequest(name=name, scopes=["inboxes:read", "environments:read"]),
        metadata=auth(owner_secret),
        timeout=CALL_TIMEOUT,
    )
    return response.api_key.id, response.secret


@on_postgres
async def test_database_outage_under_two_replicas(
    database: str, cluster: PrivatePostgres, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    a = await replicas("replica-a")
    b = await replicas("replica-b")
    org = await create_organization(a.organizations, "Outage", CALL_TIMEOUT)
    owner = org.owner_api_key_secret
    _, warm = await _new_key(a, owner, "warm")
    revoked_id, to_revoke = await _new_key(a, owner, "revoked after the outage")
    _, cold = await _new_key(a, owner, "never used before the outage")
    # Warm the owner key and two keys on both replicas, after the last write.
    for replica in (a, b):
        for secret in (owner, warm, to_revoke):
            assert (await replica.verify(secret)).valid
        await replica.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(), metadata=auth(owner), timeout=CALL_TIMEOUT
        )

    down_at = await stop_database(cluster)
    codes = Codes()
    for replica in (a, b):
        # The refresh loop fails, logs it with its traceback, and goes on failing.
        async def refresh_failed(replica: Replica = replica) -> bool:
            log = replica.process.log_path.read_text(errors="replace")
            return "access cache refresh failed" in log and "Traceback" in log and "(5 in a row)" in log

        await until(
            refresh_failed, RECOVERY_BOUND_SECONDS, f"{replica.process.name} logs the refresh failure"
        )
        # Uncached keys: VerifyApiKey, and the interceptor's authentication.
        await codes.unavailable(replica.verify(cold))
        await codes.unavailable(
            replica.organizations.GetOrganization(
                organization_pb2.GetOrganizationRequest(), metadata=auth(cold), timeout=CALL_TIMEOUT
            )
        )
        # Handlers that read or write the database, with a warm key.
        await codes.unavailable(
            replica.api_keys.ListApiKeys(
                api_key_pb2.ListApiKeysRequest(), metadata=auth(owner), timeout=CALL_TIMEOUT
            )
        )
        await codes.unavailable(
            replica.environments.CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name="During the outage"),
                metadata=auth(owner),
                timeout=CALL_TIMEOUT,
            )
        )
        # Warm keys still verify from memory, failed writes notwithstanding; environment reads
        # come from the cached snapshot.
        answered = 0
        for _ in range(WARM_VERIFIES):
            response = await codes.call(replica.verify(warm))
            answered += isinstance(response, api_key_pb2.VerifyApiKeyResponse) and response.valid
        assert answered == WARM_VERIFIES
        listed = await codes.call(
            replica.environments.ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(), metadata=auth(owner), timeout=CALL_TIMEOUT
            )
        )
        assert listed is not None
        assert await replica.health() == SERVING
    outage_seconds = time.monotonic() - down_at
    assert not any(code.startswith(("UNKNOWN", "INTERNAL", "DEADLINE")) for code in codes.seen), codes.seen

    up_at = await start_database(cluster)
    recovered = {
        replica.process.name: await until(
            lambda replica=replica: _write_works(replica, owner),  # type: ignore[misc]
            RECOVERY_BOUND_SECONDS,
            f"{replica.process.name} writes again",
        )
        for replica in (a, b)
    }
    for replica in (a, b):
        assert await replica.health() == SERVING
        assert (await replica.verify(warm)).valid

    # B's refresh loop survived the outage: a revoke on A reaches it within the usual bound.
    assert (await b.verify(to_revoke)).valid
    await a.api_keys.RevokeApiKey(
        api_key_pb2.RevokeApiKeyRequest(id=revoked_id), metadata=auth(owner), timeout=CALL_TIMEOUT
    )

    async def b_refuses() -> bool:
        return not (await b.verify(to_revoke)).valid

    revoke_seen = await until(b_refuses, REVOCATION_BOUND_SECONDS, "replica B refuses the revoked key")
    assert (await b.verify(to_revoke)).denial_reason == api_key_pb2.VerifyApiKeyResponse.REVOKED
    print(
        f"\n[{database}] outage of {outage_seconds:.1f} s: codes {dict(codes.seen)}; "
        f"warm verifies answered {2 * WARM_VERIFIES}/{2 * WARM_VERIFIES}; "
        f"first successful write after restart: "
        + ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in recovered.items())
        + f" (database up {time.monotonic() - up_at:.1f} s ago); revoke seen by B after {revoke_seen * 1000:.0f} ms"
    )


@on_postgres
async def test_cached_keys_refused_after_max_staleness(
    database: str, cluster: PrivatePostgres, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    max_staleness = 2.0
    replica = await replicas("stale", AGENTPOST_MAX_STALENESS_SECONDS=str(max_staleness))
    org = await create_organization(replica.organizations, "Outage", CALL_TIMEOUT)
    owner = org.owner_api_key_secret
    _, warm = await _new_key(replica, owner, "warm")
    assert (await replica.verify(warm)).valid

    down_at = await stop_database(cluster, "fast")

    async def not_serving() -> bool:
        return await replica.health() == NOT_SERVING

    await until(not_serving, RECOVERY_BOUND_SECONDS, "health turns NOT_SERVING")
    turned = time.monotonic() - down_at
    # The last successful poll started at most one refresh interval before the stop.
    assert turned >= max_staleness - REFRESH_SECONDS - 0.05, f"NOT_SERVING after only {turned:.2f} s"
    codes = Codes()

    async def warm_refused() -> bool:
        # A key and organization loaded after the last successful poll count from their load,
        # which may be up to one refresh interval after the moment health goes by.
        try:
            await replica.verify(warm)
        except grpc.aio.AioRpcError:
            return True
        return False

    await until(warm_refused, RECOVERY_BOUND_SECONDS, "the warm key is refused")
    await codes.unavailable(replica.verify(warm))
    await codes.unavailable(
        replica.organizations.GetOrganization(
            organization_pb2.GetOrganizationRequest(), metadata=auth(warm), timeout=CALL_TIMEOUT
        )
    )

    up_at = await start_database(cluster)

    async def serving() -> bool:
        return await replica.health() == SERVING

    back = await until(serving, RECOVERY_BOUND_SECONDS, "health turns SERVING again")
    assert (await replica.verify(warm)).valid
    write = await until(lambda: _write_works(replica, owner), RECOVERY_BOUND_SECONDS, "writes work again")

    # A shutdown during an outage still completes: the last-used flush fails, is logged, and the
    # engine is disposed.
    assert (await replica.verify(warm)).valid
    await stop_database(cluster)
    await asyncio.to_thread(replica.process.stop)
    assert replica.process.process.returncode == 0, replica.process.log_tail()
    log = replica.process.log_path.read_text(errors="replace")
    assert "last-used times could not be written at shutdown" in log
    assert log.rstrip().endswith("stopped"), replica.process.log_tail()
    print(
        f"\n[{database}] max staleness {max_staleness:.1f} s: NOT_SERVING {turned:.2f} s after the stop, "
        f"then {dict(codes.seen)} for the warm key; SERVING {back * 1000:.0f} ms after the restart, "
        f"write {write * 1000:.0f} ms later (up {time.monotonic() - up_at:.1f} s)"
    )


class _DriverError(Exception):
    """Stands in for the driver exception SQLAlchemy wraps, with its SQLSTATE."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


# The ways an unreachable database shows itself that the outage above cannot produce on demand
# (a server still starting, a full pool, a connect that times out), each as the driver raises it.
UNREACHABLE = {
    "refused": ConnectionRefusedError(111, "Connect call failed"),
    "connect timed out": TimeoutError(),
    "starting up (57P03, raw)": asyncpg.exceptions.CannotConnectNowError(
        "the database system is starting up"
    ),
    "admin shutdown (57P01, raw)": asyncpg.exceptions.AdminShutdownError("terminating connection"),
    "idle session timeout (57P05, raw)": asyncpg.exceptions.IdleSessionTimeoutError("terminating connection"),
    "idle in a transaction too long (25P03, raw)": asyncpg.exceptions.IdleInTransactionSessionTimeoutError(
        "terminating connection due to idle-in-transaction timeout"
    ),
    "too many connections (53300, raw)": asyncpg.exceptions.TooManyConnectionsError("too many clients"),
    "connection closed (raw)": asyncpg.exceptions.InterfaceError("connection is closed"),
    # What the next statement meets on a session the server ended while idle, before asyncpg has
    # seen its socket close (test_pooled_connections_the_database_ended_are_replaced hit it).
    "ended while idle (raw)": asyncpg.exceptions.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    ),
    "admin shutdown (57P01, wrapped)": DBAPIError("SELECT 1", None, _DriverError("57P01")),
    "cannot connect now (57P03, wrapped)": DBAPIError("SELECT 1", None, _DriverError("57P03")),
    "connection failure (08006, wrapped)": DBAPIError("SELECT 1", None, _DriverError("08006")),
    "pool timed out": PoolTimeout("QueuePool limit reached"),
}
SERVICE_FAULTS = {
    "a bug": ValueError("bug"),
    "undefined table (42P01, wrapped)": DBAPIError("SELECT 1", None, _DriverError("42P01")),
    "misuse of a connection (raw)": asyncpg.exceptions.InterfaceError("another operation is in progress"),
    "a fault of the driver (raw)": asyncpg.exceptions.InternalClientError(
        "unknown error in protocol implementation"
    ),
}


async def _translated(error: Exception, kind: type[DomainError]) -> DomainError:
    """The domain error of `kind` the driver error becomes, caused by it."""
    with pytest.raises(kind) as raised:
        async with translated_errors():
            raise error
    assert raised.value.__cause__ is error
    return raised.value


@pytest.mark.parametrize("error", UNREACHABLE.values(), ids=UNREACHABLE.keys())
async def test_every_unreachable_database_error_is_database_unavailable(error: Exception) -> None:
    assert (await _translated(error, Unavailable)).reason == "DATABASE_UNAVAILABLE"


def _adapted(error: Exception) -> Exception:
    """The driver error as SQLAlchemy's asyncpg adapter re-raises it outside a statement (a BEGIN
    it starts): its own exception class, not SQLAlchemy's DBAPIError, caused by the driver's."""
    adapted = Exception(str(error))
    adapted.__cause__ = error
    return adapted


# A statement the server cancelled (statement_timeout, pg_cancel_backend): the server is there,
# the call may be retried; never a fault of the service, and never a reason to drop the pool.
BUSY = {
    "cancelled (57014, raw)": asyncpg.exceptions.QueryCanceledError(
        "canceling statement due to user request"
    ),
    "cancelled (57014, wrapped)": DBAPIError("SELECT 1", None, _DriverError("57014")),
    "cancelled BEGIN (57014, adapter)": _adapted(
        asyncpg.exceptions.QueryCanceledError("canceling statement")
    ),
}


@pytest.mark.parametrize("error", BUSY.values(), ids=BUSY.keys())
async def test_a_cancelled_statement_is_busy_not_unreachable(error: Exception) -> None:
    assert not unreachable(error)
    translated = await _translated(error, Unavailable)
    assert (translated.reason, translated.message) == (
        "DATABASE_UNAVAILABLE",
        "the database is busy or unreachable; retry later",
    )


# The database has no space left (tests/test_database_full.py fills a real disk under SQLite).
FULL = {
    "disk full (53100, raw)": asyncpg.exceptions.DiskFullError(
        "could not extend file: No space left on device"
    ),
    "disk full (53100, wrapped)": DBAPIError("INSERT", None, _DriverError("53100")),
}


@pytest.mark.parametrize("error", FULL.values(), ids=FULL.keys())
async def test_a_database_without_space_is_database_full(error: Exception) -> None:
    assert (await _translated(error, ResourceExhausted)).reason == "DATABASE_FULL"


@pytest.mark.parametrize("error", SERVICE_FAULTS.values(), ids=SERVICE_FAULTS.keys())
async def test_faults_of_the_service_are_not_called_unavailable(error: Exception) -> None:
    with pytest.raises(type(error)) as raised:
        async with translated_errors():
            raise error
    assert raised.value is error


async def _signal_sessions(pg: PrivatePostgres, signal: str, condition: str = "") -> int:
    """Calls `signal` (pg_terminate_backend, pg_cancel_backend) on the cluster's client sessions
    that match `condition`; returns on how many. The listening session is spared: its reconnect
    would read through the pool and so retire the ended sessions before the call under test meets
    them."""
    connection = await asyncpg.connect(pg.url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        signalled = await connection.fetchval(
            f"SELECT count(*) FROM (SELECT {signal}(pid) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            f" AND query NOT ILIKE 'LISTEN%' {condition}) AS signalled"
        )
    finally:
        await connection.close()
    return int(signalled)


async def _terminate_server_connections(pg: PrivatePostgres) -> int:
    """Ends the pooled sessions of the cluster, as an idle-session killer or a proxy in between
    would; returns how many it ended."""
    return await _signal_sessions(pg, "pg_terminate_backend")


async def _cancel_running_statements(pg: PrivatePostgres) -> int:
    """Cancels the statements running on the cluster at this moment (as statement_timeout or an
    operator would); returns how many."""
    return await _signal_sessions(pg, "pg_cancel_backend", "AND state = 'active'")


# How the sessions are disturbed, and how long between two disturbances (seconds): ended at any
# moment, or their running statement cancelled (that needs a statement running, so more often).
DISTURBANCES = {
    "sessions ended": (_terminate_server_connections, (0.02, 0.25)),
    "statements cancelled": (_cancel_running_statements, (0.0, 0.005)),
}


@on_postgres
async def test_pooled_connections_the_database_ended_are_replaced(
    database: str, cluster: PrivatePostgres, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    """Pooled connections are not pinged on every checkout (that cost a write three round
    trips), only after sitting idle: one the database ended while idle is replaced before use,
    and one ended while in steady use fails one call as UNAVAILABLE at most."""
    # The revision poll would otherwise meet the ended connections first, and retire them.
    a = await replicas("replica-a", AGENTPOST_CACHE_REFRESH_SECONDS="60")
    owner = (await create_organization(a.organizations, "Ended sessions", CALL_TIMEOUT)).owner_api_key_secret
    assert await _write_works(a, owner)

    assert await _terminate_server_connections(cluster) >= 1
    await asyncio.sleep(PING_AFTER_IDLE_SECONDS + 0.5)
    # Idle past the bound: the checkout pings, finds the connection dead and connects anew.
    assert await _write_works(a, owner), "the first write after the idle connection was ended failed"

    # In steady use: calls right after the sessions end may fail, only as UNAVAILABLE (asserted
    # by _write_works), and the replica writes again by itself.
    assert await _terminate_server_connections(cluster) >= 1
    failed = 0
    for _ in range(20):
        failed += not await _write_works(a, owner)
    assert failed <= 2, f"{failed} of 20 writes failed after the sessions were ended"
    assert await _write_works(a, owner)
    assert await a.health() == SERVING


async def test_a_connection_left_inside_a_transaction_is_not_handed_out_again(
    harness: Harness, org: Org
) -> None:
    """A pooled connection that comes back while the server still holds a transaction on it (a
    BEGIN or ROLLBACK cancelled midway leaves SQLAlchemy's adapter tracking none, so its reset on
    return does nothing) is replaced at its next checkout; handed out again, every write on it
    failed as INTERNAL ("cannot use Connection.transaction() in a manually started
    transaction")."""
    if harness.backend != "postgres":
        pytest.skip("a PostgreSQL pool's connections (SQLite has no server-side session)")
    engine = harness.app.database.engine
    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None
        await driver.execute("BEGIN")
        assert driver.is_in_transaction()
    # The pool hands its connections out in turn (10 kept, 10 more at most): enough writes and
    # reads to reach that one.
    for index in range(30):
        await harness.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name=f"After {index}"), metadata=auth(org.owner_secret)
        )
        assert (await harness.verify(org.owner_secret)).valid
    assert driver.is_closed()


@on_postgres
@pytest.mark.parametrize("disturbance", DISTURBANCES)
async def test_sessions_disturbed_at_any_moment_under_load_fail_only_as_unavailable(
    database: str, disturbance: str, cluster: PrivatePostgres, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    """Sessions ended (or their statements cancelled) at random moments while environments are
    created, resources registered, read and removed, keys created, verified cold and revoked, and
    environments and events listed: a session ends idle in the pool, mid-statement or between a
    transaction's statements. Every call either succeeds or is UNAVAILABLE DATABASE_UNAVAILABLE;
    nothing is a fault of the service (one class of these, a session ended while idle, was
    INTERNAL once); an acknowledged revoke is never followed by a valid verification; calls keep
    succeeding between the disturbances, and the event log stays gapless: no write that failed
    left a revision behind."""
    a = await replicas("replica-a", AGENTPOST_CACHE_REFRESH_SECONDS="60")
    owner = (await create_organization(a.organizations, "Ended at random", CALL_TIMEOUT)).owner_api_key_secret
    seen: collections.Counter[str] = collections.Counter()
    chance = random.Random(20261124)
    until = time.monotonic() + 8.0

    await a.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name="Stress", slug="stress"),
        metadata=auth(owner),
        timeout=CALL_TIMEOUT,
    )
    resources = resource_pb2_grpc.ResourceServiceStub(a.channel)
    events = event_pb2_grpc.EventServiceStub(a.channel)
    inbox = resource_pb2.ScopedResource.Kind.INBOX
    in_stress = auth(owner, "stress")

    async def create() -> None:
        await a.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name=f"Load {uuid.uuid4().hex[:8]}"),
            metadata=auth(owner),
            timeout=CALL_TIMEOUT,
        )

    async def listing() -> None:
        await a.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=50), metadata=auth(owner), timeout=CALL_TIMEOUT
        )
        await events.ListEvents(
            event_pb2.ListEventsRequest(page_size=50), metadata=auth(owner), timeout=CALL_TIMEOUT
        )

    async def resource() -> None:
        name = f"inbox-{uuid.uuid4().hex[:8]}"
        await resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(kind=inbox, resource_id=name),
            metadata=in_stress,
            timeout=CALL_TIMEOUT,
        )
        found = await resources.GetResource(
            resource_pb2.GetResourceRequest(kind=inbox, resource_id=name),
            metadata=in_stress,
            timeout=CALL_TIMEOUT,
        )
        assert found.resource_id == name
        await resources.DeregisterResource(
            resource_pb2.DeregisterResourceRequest(kind=inbox, resource_id=name),
            metadata=in_stress,
            timeout=CALL_TIMEOUT,
        )

    async def revoke() -> None:
        # A new key, verified cold, revoked: once the revoke is acknowledged it never verifies.
        key_id, secret = await _new_key(a, owner, f"k {uuid.uuid4().hex[:6]}")
        assert (await a.verify(secret)).valid
        await a.api_keys.RevokeApiKey(
            api_key_pb2.RevokeApiKeyRequest(id=key_id), metadata=auth(owner), timeout=CALL_TIMEOUT
        )
        refused = await a.verify(secret)
        assert refused.denial_reason == api_key_pb2.VerifyApiKeyResponse.REVOKED, refused

    kinds = {"create": create, "list": listing, "resource": resource, "revoke": revoke}

    async def calls(kind: str) -> None:
        while time.monotonic() < until:
            try:
                await kinds[kind]()
                seen[f"{kind} OK"] += 1
            except grpc.aio.AioRpcError as error:
                failure = failure_of(error)
                seen[f"{kind} {failure.code.name} {failure.reason}"] += 1

    disturb, (shortest, longest) = DISTURBANCES[disturbance]
    ended: list[int] = []

    async def ending() -> None:
        while time.monotonic() < until:
            await asyncio.sleep(chance.uniform(shortest, longest))
            ended.append(await disturb(cluster))

    callers = ["create", "create", "resource", "resource", "revoke", "revoke", "list"]
    await asyncio.gather(*(calls(kind) for kind in callers), ending())
    print(f"\n[{database}] {sum(ended)} {disturbance} at {len(ended)} moments under load: {dict(seen)}")
    faults = {
        key: count for key, count in seen.items() if key.split()[-1] not in ("OK", "DATABASE_UNAVAILABLE")
    }
    assert not faults, (faults, a.process.log_tail(60))
    assert all(seen[f"{kind} OK"] > 0 for kind in kinds), seen
    assert sum(ended) > 0
    # The last end may have come just before: the replica writes again by itself, at once.
    assert await _write_works(a, owner) or await _write_works(a, owner)
    assert await a.health() == SERVING
    revisions = {event.revision for event in await every_event(events, auth(owner), deadline=CALL_TIMEOUT)}
    assert sorted(revisions) == list(range(1, max(revisions) + 1))
