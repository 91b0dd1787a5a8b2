"""Creates without a request id, under contention, cancellation and failure.

On PostgreSQL a CreateEnvironment or RegisterResource without a request_id is one statement
committed on its own (revision, event, row and NOTIFY); a registration whose environment was
deleted meanwhile is refused by that statement and made again as a transaction, which says
why. On SQLite the same calls are ordinary transactions. Either way, through the gRPC surface:

- a clash (same slug, same resource) commits nothing: one event for the winner, no revision
  consumed by the losers, each loser told ALREADY_EXISTS with its reason;
- registrations racing DeleteEnvironment and UndeleteEnvironment never land in a deleted
  interval, and are refused only as FAILED_PRECONDITION ENVIRONMENT_DELETED;
- one-statement and transactional writes of one organization interleave into one gapless
  sequence of revisions, each answered in `x-agentpost-revision` and equal to its event's;
- what such a write stores (row and event) is what it answered, and what a fresh replica loads;
- callers that give up leave each write whole or absent, and the server's view catches up;
- on PostgreSQL, sessions ended under load fail calls only as UNAVAILABLE and lose nothing
  acknowledged; a second replica's one-statement writes interleave with the first's; a replica
  busy with its own one-statement writes still applies another replica's revoke at once.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from agentpost.environments.v1 import (
    api_key_pb2,
    environment_pb2,
    event_pb2_grpc,
    resource_pb2,
)

from tests import private_postgres
from tests.harness import Harness, Org, auth, every_event, fails, mask, stored_events
from tests.private_postgres import PrivatePostgres
from tests.servers import Backend, postgres_dsn, serving
from tests.watching import Watcher
from tests.writes import (
    assert_gapless,
    create_call,
    outcome,
    register_call,
    revision_of,
    stored_environments,
    stored_resources,
    stored_revision,
)

Code = grpc.StatusCode
INBOX = resource_pb2.ScopedResource.INBOX
DOMAIN = resource_pb2.ScopedResource.DOMAIN
REVISION = "x-agentpost-revision"
MIN_REVISION = "x-agentpost-min-revision"
# Delete/undelete cycles raced by registrations.
CYCLES = 15


# -- helpers ---------------------------------------------------------------------------------


async def listed_environments(
    harness: Harness, secret: str, min_revision: int | None = None
) -> dict[str, tuple[str, bool]]:
    """What ListEnvironments (served from the replica's view) answers, deleted ones included."""
    metadata = auth(secret)
    if min_revision is not None:
        metadata = (*metadata, (MIN_REVISION, str(min_revision)))
    found: dict[str, tuple[str, bool]] = {}
    token = ""
    while True:
        page = await harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=500, page_token=token, show_deleted=True),
            metadata=metadata,
        )
        for env in page.environments:
            found[env.id] = (env.name, env.state == environment_pb2.Environment.DELETED)
        token = page.next_page_token
        if not token:
            return found


async def view_matches_database(harness: Harness, org: Org, seconds: float = 5.0) -> None:
    """Waits until the replica's own view of the environments equals the database's."""
    deadline = time.monotonic() + seconds
    while True:
        stored = await stored_environments(harness, org.id)
        shown = await listed_environments(harness, org.owner_secret)
        if shown == stored:
            return
        assert time.monotonic() < deadline, (
            f"view never matched the database: only shown {set(shown) - set(stored)}, "
            f"only stored {set(stored) - set(shown)}"
        )
        await asyncio.sleep(0.05)


# -- clashes ---------------------------------------------------------------------------------


async def one_winner(harness: Harness, org: Org, make_calls: Callable[[], list[Any]], lost: str) -> int:
    """Makes the calls at once: exactly one succeeds, with the revision right after the
    organization's before them, and every other fails as `lost` ("CODE REASON"). Returns the
    winner's revision."""
    before = await stored_revision(harness, org.id)
    calls = make_calls()
    outcomes = await asyncio.gather(*(outcome(call) for call in calls))
    codes = collections.Counter(code for code, _ in outcomes)
    assert codes == {"OK": 1, lost: len(calls) - 1}, codes
    (won,) = [revision for code, revision in outcomes if code == "OK"]
    assert won == before + 1
    return won


async def test_racing_registrations_of_one_id_commit_one_event_and_one_revision(
    harness: Harness, org: Org
) -> None:
    """Eight registrations of one (kind, id) at once, no request id: one wins with the next
    revision, the seven others are ALREADY_EXISTS RESOURCE_EXISTS and leave nothing behind: the
    log holds one REGISTERED event for it, at the revision the winner answered, and the next
    write takes the revision right after."""
    won = await one_winner(
        harness,
        org,
        lambda: [register_call(harness, org.owner_secret, "same.example", kind=DOMAIN) for _ in range(8)],
        "ALREADY_EXISTS RESOURCE_EXISTS",
    )

    events = await stored_events(harness, org.id)
    registered = [event for event in events if event.resource_id == "DOMAIN:same.example"]
    assert [(event.action, event.revision) for event in registered] == [("REGISTERED", won)]
    assert await stored_revision(harness, org.id) == won
    assert_gapless(events)
    following = register_call(harness, org.owner_secret, "other.example", kind=DOMAIN)
    await following
    assert await revision_of(following) == won + 1


async def test_racing_creates_of_one_slug_commit_one_event_and_one_revision(
    harness: Harness, org: Org
) -> None:
    """Eight CreateEnvironment of one slug at once: one wins, seven are ALREADY_EXISTS SLUG_TAKEN;
    one environment and one CREATED event hold the slug, and the losers consumed no revision."""
    won = await one_winner(
        harness,
        org,
        lambda: [create_call(harness, org.owner_secret, f"Race {index}", slug="raced") for index in range(8)],
        "ALREADY_EXISTS SLUG_TAKEN",
    )

    environments = await stored_environments(harness, org.id)
    assert len(environments) == 2  # the default one and the winner
    events = await stored_events(harness, org.id)
    created = [
        event for event in events if event.action == "CREATED" and event.resource_type == "ENVIRONMENT"
    ]
    assert [event.revision for event in created] == [1, won]
    assert created[-1].resource_id in environments
    assert await stored_revision(harness, org.id) == won
    assert_gapless(events)
    shown = await listed_environments(harness, org.owner_secret)
    assert shown == environments


async def test_registrations_with_and_without_request_ids_race_to_one_winner(
    harness: Harness, org: Org
) -> None:
    """Three registrations of one resource without a request id (one statement on PostgreSQL)
    race three with request ids of their own (transactions): exactly one wins; every loser is
    ALREADY_EXISTS RESOURCE_EXISTS whichever way it was made; a retry of the winner's request id
    (if it had one) answers the same resource and logs nothing; the log holds one event for it."""
    request_ids = [str(uuid.uuid4()) for _ in range(3)]
    calls = [register_call(harness, org.owner_secret, "mixed") for _ in range(3)]
    calls += [
        register_call(harness, org.owner_secret, "mixed", request_id=request_id) for request_id in request_ids
    ]
    outcomes = await asyncio.gather(*(outcome(call) for call in calls))
    codes = collections.Counter(code for code, _ in outcomes)
    assert codes == {"OK": 1, "ALREADY_EXISTS RESOURCE_EXISTS": 5}, codes
    winner = next(index for index, (code, _) in enumerate(outcomes) if code == "OK")
    if winner >= 3:
        again = register_call(harness, org.owner_secret, "mixed", request_id=request_ids[winner - 3])
        replayed = await again
        assert replayed.resource_id == "mixed"
    events = await stored_events(harness, org.id)
    assert [event.revision for event in events if event.resource_id == "INBOX:mixed"] == [outcomes[winner][1]]
    assert_gapless(events)


# -- deletes and undeletes -------------------------------------------------------------------


async def flap(harness: Harness, org: Org, environment_id: str, intervals: list[tuple[int, int]]) -> None:
    """Deletes and undeletes the environment CYCLES times, noting each deleted interval as the
    revisions [delete, undelete) the two calls answered."""
    for _ in range(CYCLES):
        await asyncio.sleep(0.01)
        delete = harness.environments.DeleteEnvironment(
            environment_pb2.DeleteEnvironmentRequest(id=environment_id), metadata=auth(org.owner_secret)
        )
        await delete
        await asyncio.sleep(0.01)
        undelete = harness.environments.UndeleteEnvironment(
            environment_pb2.UndeleteEnvironmentRequest(id=environment_id), metadata=auth(org.owner_secret)
        )
        await undelete
        intervals.append((await revision_of(delete), await revision_of(undelete)))


def deleted_at(intervals: list[tuple[int, int]], revision: int) -> bool:
    """Whether `revision` lies in one of the deleted intervals."""
    return any(start <= revision < end for start, end in intervals)


async def test_registrations_racing_deletes_and_undeletes_never_land_in_a_deleted_interval(
    harness: Harness, org: Org
) -> None:
    """Registrations into one environment race fifteen DeleteEnvironment/UndeleteEnvironment cycles.
    Every answer is OK or FAILED_PRECONDITION ENVIRONMENT_DELETED; every acknowledged
    registration, and every REGISTERED event, has a revision outside each deleted interval
    [delete, undelete); the registry holds exactly the acknowledged ones; the log stays gapless
    (a refused registration consumed no revision)."""
    env = await harness.new_environment(org, "Flapping")
    intervals: list[tuple[int, int]] = []
    chance = random.Random(7)

    async def registration(index: int) -> tuple[str, str, int | None]:
        await asyncio.sleep(chance.uniform(0.0, CYCLES * 0.03))
        code, revision = await outcome(register_call(harness, org.owner_secret, f"flap-{index}", env.id))
        return f"INBOX:flap-{index}", code, revision

    flapping = asyncio.ensure_future(flap(harness, org, env.id, intervals))
    answers = await asyncio.gather(*(registration(index) for index in range(200)))
    await flapping
    codes = collections.Counter(code for _, code, _ in answers)
    assert set(codes) <= {"OK", "FAILED_PRECONDITION ENVIRONMENT_DELETED"}, codes
    assert codes["OK"] and codes["FAILED_PRECONDITION ENVIRONMENT_DELETED"], (
        f"the race did not overlap a delete: {codes}"
    )
    acknowledged = {name: revision for name, code, revision in answers if code == "OK"}

    inside = {
        name: revision
        for name, revision in acknowledged.items()
        if revision is None or deleted_at(intervals, revision)
    }
    assert not inside, (intervals, inside)
    events = await stored_events(harness, org.id)
    logged = {event.resource_id: event.revision for event in events if event.action == "REGISTERED"}
    assert logged == acknowledged
    assert not [revision for revision in logged.values() if deleted_at(intervals, revision)], intervals
    stored = await stored_resources(harness, org.id)
    assert stored == dict.fromkeys(acknowledged, env.id)
    assert_gapless(events)


async def test_registrations_that_give_up_while_racing_deletes_stay_out_of_deleted_intervals(
    harness: Harness, org: Org
) -> None:
    """Registrations with deadlines of a few milliseconds, or cancelled by their callers after one,
    race DeleteEnvironment and UndeleteEnvironment cycles, so that some callers give up while their statement is refused and
    made again as a transaction. Every answer is OK, ENVIRONMENT_DELETED or a deadline; whatever
    committed (acknowledged or not) lies outside each deleted interval, the registry holds exactly
    what the log says was registered, and the log is gapless."""
    env = await harness.new_environment(org, "Hasty flapping")
    intervals: list[tuple[int, int]] = []
    chance = random.Random(13)

    async def registration(index: int) -> tuple[str, str, int | None]:
        await asyncio.sleep(chance.uniform(0.0, CYCLES * 0.03))
        deadline = 5.0 if index % 5 == 0 else chance.uniform(0.0001, 0.004)
        call = register_call(harness, org.owner_secret, f"hasty-{index}", env.id, timeout=deadline)
        if index % 5 == 1:
            # A caller that cancels on its own after a moment: a deadline depends on the runtime's
            # timers firing in time on a loaded machine, a cancel does not.
            await asyncio.sleep(chance.uniform(0.0, 0.003))
            call.cancel()
        try:
            code, revision = await outcome(call)
        except asyncio.CancelledError:  # awaiting a call its caller cancelled
            code, revision = "CANCELLED", None
        return f"INBOX:hasty-{index}", code, revision

    flapping = asyncio.ensure_future(flap(harness, org, env.id, intervals))
    answers = await asyncio.gather(*(registration(index) for index in range(200)))
    await flapping
    codes = collections.Counter(code for _, code, _ in answers)
    assert set(codes) <= {
        "OK",
        "FAILED_PRECONDITION ENVIRONMENT_DELETED",
        "DEADLINE_EXCEEDED",
        "CANCELLED",
    }, codes
    assert codes["OK"] and codes["DEADLINE_EXCEEDED"] + codes["CANCELLED"], codes
    await asyncio.sleep(0.3)  # writes whose callers gave up may still be committing
    last = register_call(harness, org.owner_secret, "hasty-last", env.id, timeout=10)
    await last

    events = await stored_events(harness, org.id)
    logged = {event.resource_id: event.revision for event in events if event.action == "REGISTERED"}
    assert not {name: revision for name, revision in logged.items() if deleted_at(intervals, revision)}, (
        intervals
    )
    acknowledged = {name: revision for name, code, revision in answers if code == "OK"}
    assert acknowledged.items() <= logged.items()
    assert await stored_resources(harness, org.id) == dict.fromkeys(logged, env.id)
    assert_gapless(events)
    await view_matches_database(harness, org)


# -- mixed writes ----------------------------------------------------------------------------


async def test_mixed_writes_answer_unique_gapless_revisions_each_its_events(
    harness: Harness, org: Org
) -> None:
    """One organization takes, all at once: CreateEnvironment and RegisterResource without a
    request id (one statement on PostgreSQL) and with one (a transaction), UpdateEnvironment and
    CreateApiKey. Every call succeeds; the revisions answered are distinct and, with nothing else
    writing, exactly the next ones in a row; each write's events carry its answered revision;
    afterwards the replica's view (ListEnvironments, ListResources) equals the database."""
    target = await harness.new_environment(org, "Renamed")
    start = await stored_revision(harness, org.id)

    async def fast_create(index: int) -> tuple[str, int]:
        call = create_call(harness, org.owner_secret, f"Fast {index}")
        created = await call
        return created.id, await revision_of(call)

    async def careful_create(index: int) -> tuple[str, int]:
        call = create_call(harness, org.owner_secret, f"Careful {index}", request_id=str(uuid.uuid4()))
        created = await call
        return created.id, await revision_of(call)

    async def fast_register(index: int) -> tuple[str, int]:
        call = register_call(harness, org.owner_secret, f"fast-{index}")
        await call
        return f"INBOX:fast-{index}", await revision_of(call)

    async def careful_register(index: int) -> tuple[str, int]:
        call = register_call(harness, org.owner_secret, f"careful-{index}", request_id=str(uuid.uuid4()))
        await call
        return f"INBOX:careful-{index}", await revision_of(call)

    async def rename(index: int) -> tuple[str, int]:
        call = harness.environments.UpdateEnvironment(
            environment_pb2.UpdateEnvironmentRequest(
                environment=environment_pb2.Environment(id=target.id, name=f"Renamed {index}"),
                update_mask=mask("name"),
            ),
            metadata=auth(org.owner_secret),
        )
        await call
        return target.id, await revision_of(call)

    async def new_key(index: int) -> tuple[str, int]:
        call = harness.api_keys.CreateApiKey(
            api_key_pb2.CreateApiKeyRequest(name=f"key {index}", scopes=["inboxes:read"]),
            metadata=auth(org.owner_secret),
        )
        created = await call
        return created.api_key.id, await revision_of(call)

    makers: list[Callable[[int], Awaitable[tuple[str, int]]]] = [
        fast_create,
        careful_create,
        fast_register,
        careful_register,
        rename,
        new_key,
    ]
    answered = await asyncio.gather(*(maker(index) for index in range(6) for maker in makers))
    revisions = [revision for _, revision in answered]
    assert len(set(revisions)) == len(revisions), collections.Counter(revisions).most_common(3)
    assert sorted(revisions) == list(range(start + 1, start + 1 + len(answered)))

    events = await stored_events(harness, org.id)
    for resource_id, revision in answered:
        at = [event for event in events if event.revision == revision]
        assert [event.resource_id for event in at] == [resource_id], (revision, at)
    assert await stored_revision(harness, org.id) == start + len(answered)
    assert_gapless(events)
    # The replica applied its own writes: its view is the database's at once.
    assert await listed_environments(harness, org.owner_secret) == await stored_environments(harness, org.id)
    listed: list[str] = []
    token = ""
    while True:
        page = await harness.resources.ListResources(
            resource_pb2.ListResourcesRequest(page_size=100, page_token=token),
            metadata=auth(org.owner_secret),
        )
        listed += [f"INBOX:{item.resource_id}" for item in page.resources]
        token = page.next_page_token
        if not token:
            break
    assert sorted(listed) == sorted(await stored_resources(harness, org.id))


async def test_a_one_statement_write_records_its_caller_and_environment(harness: Harness, org: Org) -> None:
    """A registration by an environment-limited key of a member, and a create by the owner, log
    who made them (key and member), the x-request-id and the environment, at the revision
    answered."""
    env = await harness.new_environment(org, "Team")
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env.id, member.id)
    key, secret = await harness.new_key(org, ["inboxes:write", "inboxes:read"], [env.id], member.id)
    header = f"req-{uuid.uuid4().hex[:8]}"
    call = harness.resources.RegisterResource(
        resource_pb2.RegisterResourceRequest(kind=INBOX, resource_id="by-member", display_name="Member's"),
        metadata=auth(secret, request_id=header),
    )
    registered = await call
    revision = await revision_of(call)
    assert registered.environment_id == env.id
    events = [event for event in await stored_events(harness, org.id) if event.revision == revision]
    assert len(events) == 1
    (event,) = events
    assert (event.action, event.resource_id, event.environment_id) == (
        "REGISTERED",
        "INBOX:by-member",
        env.id,
    )
    assert (event.actor_api_key_id, event.actor_member_id, event.actor_operator) == (key.id, member.id, False)
    assert event.request_id == header
    got = await harness.resources.GetResource(
        resource_pb2.GetResourceRequest(kind=INBOX, resource_id="by-member"), metadata=auth(secret)
    )
    assert got == registered


async def test_what_a_one_statement_write_stores_is_what_it_answered(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """A create and a registration with long non-ASCII text: the answer, the replica's own view
    (applied from the write's event), the event listed, and a fresh replica that loads the
    organization from its rows all show the same environment and the same resource."""
    name = "Żółw 環境 " + "ñ" * 80
    description = "Ünïcödé — " + "界" * 990
    call = harness.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name=name, slug="turtle", description=description),
        metadata=auth(org.owner_secret),
    )
    created = await call
    created_at = await revision_of(call)
    display_name = "Boîte « reçue » " + "é" * 184
    registration = harness.resources.RegisterResource(
        resource_pb2.RegisterResourceRequest(
            kind=INBOX, resource_id="unicode-inbox", display_name=display_name
        ),
        metadata=auth(org.owner_secret, created.id),
    )
    registered = await registration
    registered_at = await revision_of(registration)
    assert (created.name, created.description, registered.display_name) == (name, description, display_name)

    shown = await harness.environments.GetEnvironment(
        environment_pb2.GetEnvironmentRequest(id=created.id), metadata=auth(org.owner_secret)
    )
    assert shown == created
    got = await harness.resources.GetResource(
        resource_pb2.GetResourceRequest(kind=INBOX, resource_id="unicode-inbox"),
        metadata=auth(org.owner_secret, created.id),
    )
    assert got == registered
    listed = await every_event(event_pb2_grpc.EventServiceStub(harness.channel), auth(org.owner_secret))
    by_revision = {event.revision: event for event in listed}
    assert by_revision[created_at].environment == created
    assert by_revision[registered_at].scoped_resource == registered
    async with serving(backend, cache_refresh_seconds=30.0) as fresh:
        loaded = await fresh.environments.GetEnvironment(
            environment_pb2.GetEnvironmentRequest(id=created.id), metadata=auth(org.owner_secret)
        )
    assert loaded == created


# -- callers that give up --------------------------------------------------------------------


async def test_creates_whose_callers_gave_up_are_whole_or_absent_and_the_view_catches_up(
    harness: Harness, org: Org
) -> None:
    """CreateEnvironment callers with deadlines of a few milliseconds (every eighth a patient
    one). Afterwards: every environment stored has one CREATED event and every CREATED event its
    environment; each acknowledged one is stored; the log is gapless; the next write answers the
    revision after the stored one; and the replica's own view, which answers ListEnvironments,
    comes to equal the database by itself (a write may commit after its caller gave up)."""
    outcomes = await asyncio.gather(
        *(
            outcome(
                create_call(
                    harness,
                    org.owner_secret,
                    f"Hasty {index}",
                    timeout=5.0 if index % 8 == 0 else 0.001 + (index % 20) * 0.003,
                )
            )
            for index in range(60)
        )
    )
    codes = collections.Counter(code for code, _ in outcomes)
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, codes
    assert codes["DEADLINE_EXCEEDED"], "no caller gave up: the deadlines are too long to test this"
    assert codes["OK"]
    acknowledged = {revision for code, revision in outcomes if code == "OK"}

    await asyncio.sleep(0.3)  # writes whose callers gave up may still be committing
    following = create_call(harness, org.owner_secret, "After", timeout=10)
    after = await following
    revision = await revision_of(following)
    assert revision == await stored_revision(harness, org.id)

    events = await stored_events(harness, org.id)
    assert_gapless(events)
    assert events[-1].revision == revision
    created = collections.Counter(
        event.resource_id
        for event in events
        if event.action == "CREATED" and event.resource_type == "ENVIRONMENT"
    )
    stored = await stored_environments(harness, org.id)
    assert set(created) == set(stored) and set(created.values()) == {1}, (created, stored)
    assert after.id in stored
    revisions_of_creates = {event.revision for event in events if event.resource_type == "ENVIRONMENT"}
    assert acknowledged <= revisions_of_creates
    await view_matches_database(harness, org)


async def test_registrations_cancelled_mid_call_are_seen_by_a_watcher_exactly_once(
    harness: Harness, org: Org
) -> None:
    """Registrations whose callers cancel them a moment after sending: each is whole or absent,
    and a WatchEvents stream of the organization (fed by the replica's view) receives every
    revision committed, once each and in order, those of cancelled callers included."""
    watcher = Watcher(harness.channel, org.owner_secret)
    try:
        start = await watcher.live()
        chance = random.Random(11)

        async def cancelled(index: int) -> str:
            call = register_call(harness, org.owner_secret, f"cancel-{index}", timeout=10)
            if index % 6:
                await asyncio.sleep(chance.uniform(0.0, 0.02))
                call.cancel()
            try:
                await call
            except asyncio.CancelledError:
                return "CANCELLED"
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return "OK"

        codes = collections.Counter(await asyncio.gather(*(cancelled(index) for index in range(48))))
        assert set(codes) <= {"OK", "CANCELLED"}, codes
        assert codes["CANCELLED"], "no call was cancelled"
        await asyncio.sleep(0.3)
        final = register_call(harness, org.owner_secret, "final", timeout=10)
        await final
        last = await revision_of(final)
        assert last == await stored_revision(harness, org.id)
        await watcher.reached(last)
        events = await stored_events(harness, org.id)
        assert_gapless(events)
        stored = await stored_resources(harness, org.id)
        logged = [event.resource_id for event in events if event.action == "REGISTERED"]
        assert sorted(logged) == sorted(stored)
        watched = [(event.revision, event.resource_id) for event in watcher.events]
        expected = [(event.revision, event.resource_id) for event in events if event.revision > start]
        assert watched == expected
    finally:
        await watcher.close()


# -- PostgreSQL: sessions ended, a second replica ---------------------------------------------


@pytest.fixture
def cluster(backend: Backend) -> Iterator[PrivatePostgres]:
    """A private PostgreSQL cluster (PostgreSQL runs only), deleted afterwards."""
    if backend.name != "postgres":
        pytest.skip("ends PostgreSQL sessions")
    reason = private_postgres.available()
    if reason is not None:
        pytest.skip(reason)
    with private_postgres.running() as pg:
        yield pg


@pytest.fixture
async def private_harness(cluster: PrivatePostgres) -> AsyncIterator[Harness]:
    """A server in this process on the private cluster (migrated at start)."""
    async with serving(
        Backend("postgres", cluster.url, None), database_timeout_seconds=2.0, cache_refresh_seconds=0.2
    ) as running:
        yield running


async def _end_sessions(pg: PrivatePostgres) -> int:
    """Ends every other session of the private cluster's database; returns how many."""
    connection = await asyncpg.connect(postgres_dsn(pg.url))
    try:
        ended = await connection.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await connection.close()
    return int(ended)


async def test_sessions_ended_under_one_statement_writes_lose_nothing_acknowledged(
    cluster: PrivatePostgres, private_harness: Harness
) -> None:
    """Sessions of the database are ended at random moments while creates and registrations run
    without request ids. Each call succeeds or is UNAVAILABLE DATABASE_UNAVAILABLE; every
    acknowledged one is stored, with its event at the revision it answered; no revision is
    left without its event; the server writes again by itself, and its view equals the
    database."""
    harness = private_harness
    org = await harness.new_org("Ended")
    env = await harness.new_environment(org, "Load", "load")
    chance = random.Random(20261124)
    until = time.monotonic() + 4.0
    seen: collections.Counter[str] = collections.Counter()
    acknowledged: dict[str, int] = {}
    ended: list[int] = []

    async def writes(worker: int) -> None:
        index = 0
        while time.monotonic() < until:
            index += 1
            if (worker + index) % 2:
                call = create_call(harness, org.owner_secret, f"W{worker} {index}", timeout=15)
                name = None
            else:
                name = f"INBOX:w{worker}-{index}"
                call = register_call(harness, org.owner_secret, f"w{worker}-{index}", env.id, timeout=15)
            code, revision = await outcome(call)
            seen[code] += 1
            if revision is not None:
                key = name if name is not None else (await call).id
                acknowledged[key] = revision

    async def ending() -> None:
        while time.monotonic() < until:
            await asyncio.sleep(chance.uniform(0.02, 0.2))
            ended.append(await _end_sessions(cluster))

    await asyncio.gather(*(writes(worker) for worker in range(6)), ending())
    assert set(seen) <= {"OK", "UNAVAILABLE DATABASE_UNAVAILABLE"}, seen
    assert seen["OK"] > 20 and sum(ended) > 0, (seen, ended)

    for _ in range(3):  # the last end may have come just before
        code, _ = await outcome(
            create_call(harness, org.owner_secret, f"After {uuid.uuid4().hex[:6]}", timeout=15)
        )
        if code == "OK":
            break
    assert code == "OK"
    events = await stored_events(harness, org.id)
    assert_gapless(events)
    logged = {event.resource_id: event.revision for event in events}
    lost = {key: revision for key, revision in acknowledged.items() if logged.get(key) != revision}
    assert not lost, lost
    stored = await stored_resources(harness, org.id)
    environments = await stored_environments(harness, org.id)
    assert {key for key in acknowledged if key.startswith("INBOX:")} <= set(stored)
    assert {key for key in acknowledged if not key.startswith("INBOX:")} <= set(environments)
    await view_matches_database(harness, org)


async def test_two_replicas_interleave_one_statement_writes_of_one_organization(
    harness: Harness, backend: Backend, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creates and registrations without request ids on two replicas of one PostgreSQL database
    at once: all succeed with distinct revisions that are exactly the next ones in a row, each
    its event's; each replica's view comes to equal the database by itself. A registration on
    the second replica, whose view still shows active an environment the first has deleted, is
    refused ENVIRONMENT_DELETED and consumes no revision; once the first undeletes it, the same
    registration succeeds with the revision after the undelete."""
    if backend.name != "postgres":
        pytest.skip("replicas on one SQLite file take turns on its one write lock")
    async with serving(backend, cache_refresh_seconds=30.0) as other:
        # The second replica follows the organization before the writes.
        await listed_environments(other, org.owner_secret)
        start = await stored_revision(harness, org.id)

        async def write(index: int) -> tuple[str, int]:
            replica = (harness, other)[index % 2]
            if index % 3:
                call = register_call(replica, org.owner_secret, f"both-{index}")
                await call
                return f"INBOX:both-{index}", await revision_of(call)
            call = create_call(replica, org.owner_secret, f"Both {index}")
            created = await call
            return created.id, await revision_of(call)

        answered = await asyncio.gather(*(write(index) for index in range(40)))
        revisions = sorted(revision for _, revision in answered)
        assert revisions == list(range(start + 1, start + 41)), revisions
        events = await stored_events(harness, org.id)
        by_revision = {event.revision: event.resource_id for event in events}
        assert all(by_revision.get(revision) == key for key, revision in answered)
        assert_gapless(events)
        await view_matches_database(harness, org)
        await view_matches_database(other, org)

        # The second replica stops reading the log: its view keeps the environment active while
        # the first deletes it and undeletes it, so only the registration's statement can tell.
        doomed = await harness.new_environment(org, "Doomed")
        await listed_environments(
            other, org.owner_secret, min_revision=await stored_revision(harness, org.id)
        )

        async def held_back(_organization_id: str) -> None:
            return None

        monkeypatch.setattr(other.app.access, "catch_up", held_back)
        await harness.delete_environment(org.owner_secret, doomed.id)
        assert (await listed_environments(other, org.owner_secret))[doomed.id] == (doomed.name, False)
        before = await stored_revision(harness, org.id)
        await fails(
            register_call(other, org.owner_secret, "late", doomed.id),
            Code.FAILED_PRECONDITION,
            "ENVIRONMENT_DELETED",
        )
        assert await stored_revision(harness, org.id) == before
        assert "INBOX:late" not in await stored_resources(harness, org.id)
        undelete = harness.environments.UndeleteEnvironment(
            environment_pb2.UndeleteEnvironmentRequest(id=doomed.id), metadata=auth(org.owner_secret)
        )
        await undelete
        again = register_call(other, org.owner_secret, "late", doomed.id)
        await again
        assert await revision_of(again) == await revision_of(undelete) + 1
        monkeypatch.undo()
        assert (await stored_resources(harness, org.id))["INBOX:late"] == doomed.id
        logged = [
            event for event in await stored_events(harness, org.id) if event.resource_id == "INBOX:late"
        ]
        assert [event.revision for event in logged] == [await revision_of(again)]
        await view_matches_database(other, org)


async def test_a_replica_busy_with_one_statement_writes_still_hears_another_replicas_revoke(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """A replica that polls only every 30 s is kept busy with registrations of one organization
    (one statement each, always one in flight) while another replica revokes keys of it: each
    revoke is refused there within 3 s (the replica's wait for its own in-flight write does not
    hold back what another replica committed)."""
    if backend.name != "postgres":
        pytest.skip("notifications: PostgreSQL only (SQLite replicas poll)")
    async with serving(backend, cache_refresh_seconds=30.0) as busy:
        stop = asyncio.Event()

        async def keep_busy(worker: int) -> int:
            index = 0
            while not stop.is_set():
                index += 1
                await register_call(busy, org.owner_secret, f"busy-{worker}-{index}", timeout=10)
            return index

        workers = [asyncio.ensure_future(keep_busy(worker)) for worker in range(4)]
        try:
            for _ in range(3):
                key, secret = await harness.new_key(org, ["inboxes:read"])
                assert (await busy.verify(secret)).valid
                await harness.api_keys.RevokeApiKey(
                    api_key_pb2.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
                )
                revoked_at = time.monotonic()
                while (await busy.verify(secret)).valid:
                    assert time.monotonic() - revoked_at < 3.0, "a revoke was not heard within 3 s"
                    await asyncio.sleep(0.005)
        finally:
            stop.set()
            written = await asyncio.gather(*workers)
        assert min(written) > 1, written  # every worker kept writing throughout
        await view_matches_database(busy, org)
