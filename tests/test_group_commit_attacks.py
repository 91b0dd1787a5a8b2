"""SQLite group commit under hostile callers, through the gRPC surface of real servers.

Writers that queue while one writes share its transaction (each later one in a savepoint) and
its commit, made by a committer queued behind them (see service/storage/inline_sqlite.py). These
tests try to break what that must still promise:

- callers whose deadline expires while their write is inside a group: each write is whole or
  absent (its row, its event and its revision agree), the log stays gapless, and the server's
  own view (the access snapshot, asked for the stored revision) matches the database;
- two organizations' writes in the same groups: each organization's revisions are unique and
  gapless, and a WatchEvents stream of each sees every revision once, in order;
- a revoke committed in a group next to other writes: no VerifyApiKey started after the revoke
  was acknowledged answers valid, warm key or cold;
- a second server on the same file writing meanwhile: every call is answered OK (never "database
  is locked", UNKNOWN or INTERNAL), and everything acknowledged is stored and served by both;
- idempotent creates racing with one request id inside a group: one environment, one id for all;
- creates refused (a slug taken) next to the ones that win, round after round: the view served
  from memory shows each winner as it was acknowledged, never a loser's version.
- registrations racing their environment's delete in one group: none acknowledged after it;
- a server stopped with groups in flight: nothing it acknowledged is lost, nothing half-stored.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2, environment_pb2, event_pb2

from tests.harness import Harness, Org, auth, failure_of, stored_events
from tests.servers import Backend, serving, start_server
from tests.watching import Watcher
from tests.writes import (
    REVISION,
    assert_gapless,
    create_call,
    outcome,
    register_call,
    stored_environments,
    stored_resources,
    stored_revision,
)

MIN_REVISION = "x-agentpost-min-revision"
# What a caller whose deadline expired may be told, besides OK.
GAVE_UP = {"DEADLINE_EXCEEDED", "CANCELLED"}
TINY_DEADLINES = (0.0001, 0.0005, 0.001, 0.002, 0.003)
Event = event_pb2.Event


def sqlite_backend(tmp_path: Path) -> Backend:
    return Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'attacked.db'}", None)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """A server of its own on an SQLite file (group commit is SQLite's)."""
    async with serving(sqlite_backend(tmp_path)) as running:
        yield running


@pytest.fixture
async def org(harness: Harness) -> Org:
    return await harness.new_org()


def at_least(secret: str, revision: int) -> tuple[tuple[str, str], ...]:
    """Call metadata for the organization's key, asking for a view of at least `revision`."""
    return (*auth(secret), (MIN_REVISION, str(revision)))


@dataclass
class Created:
    """How a CreateEnvironment call ended: its code (and reason), revision and environment."""

    code: str
    revision: int | None = None
    environment: environment_pb2.Environment | None = None


async def created(call: Any) -> Created:
    try:
        environment: environment_pb2.Environment = await call
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        return Created(f"{failure.code.name} {failure.reason}".strip())
    trailers = dict(await call.trailing_metadata() or ())
    return Created("OK", int(trailers[REVISION]), environment)


async def listed(harness: Harness, secret: str, revision: int) -> dict[str, environment_pb2.Environment]:
    """Every environment the server's view lists (deleted ones too), as of at least `revision`."""
    found: dict[str, environment_pb2.Environment] = {}
    token = ""
    while True:
        page = await harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=100, page_token=token, show_deleted=True),
            metadata=at_least(secret, revision),
        )
        found.update({env.id: env for env in page.environments})
        token = page.next_page_token
        if not token:
            return found


def created_events(events: list[Any]) -> dict[str, int]:
    """Environment id -> revision of each ENVIRONMENT CREATED event stored."""
    return {
        e.resource_id: e.revision
        for e in events
        if e.resource_type == "ENVIRONMENT" and e.action == "CREATED"
    }


async def assert_view_matches_database(harness: Harness, org: Org) -> int:
    """The database's environments, event log and revision agree, and the server's view asked
    for the stored revision lists exactly the stored environments. Returns the stored revision."""
    revision = await stored_revision(harness, org.id)
    events = await stored_events(harness, org.id)
    assert_gapless(events)
    assert events[-1].revision == revision, "the organization's revision is not its log's last"
    stored = await stored_environments(harness, org.id)
    logged = created_events(events)
    assert logged.keys() == stored.keys(), (
        f"rows without events: {stored.keys() - logged.keys()}; events without rows: "
        f"{logged.keys() - stored.keys()}"
    )
    seen = await listed(harness, org.owner_secret, revision)
    assert {env_id: env.name for env_id, env in seen.items()} == {
        env_id: name for env_id, (name, _) in stored.items()
    }
    return revision


async def test_callers_giving_up_inside_groups_leave_whole_writes_or_none(harness: Harness, org: Org) -> None:
    """Each round, forty creates at once, most with a deadline of a few milliseconds: many give
    up while their write waits for its turn, runs in a group's savepoint or waits for the group's
    commit. Whatever they were told, each environment is stored with its event or not at all,
    an acknowledged one under the revision it was answered, and the server's view agrees."""
    outcomes: dict[str, Created] = {}
    for round_number in range(6):
        names = [f"Hasty {round_number}-{n}" for n in range(40)]
        calls = [
            created(
                create_call(
                    harness,
                    org.owner_secret,
                    name,
                    timeout=None if n % 4 == 0 else TINY_DEADLINES[n % len(TINY_DEADLINES)],
                )
            )
            for n, name in enumerate(names)
        ]
        outcomes.update(zip(names, await asyncio.gather(*calls), strict=True))
        await assert_view_matches_database(harness, org)

    codes = collections.Counter(result.code for result in outcomes.values())
    assert set(codes) <= {"OK", *GAVE_UP}, codes
    assert codes["OK"] >= 60 and sum(codes[code] for code in GAVE_UP) >= 20, codes

    stored = {name: env_id for env_id, (name, _) in (await stored_environments(harness, org.id)).items()}
    logged = created_events(await stored_events(harness, org.id))
    for name, result in outcomes.items():
        if result.code == "OK":
            assert result.environment is not None
            assert stored.get(name) == result.environment.id, f"{name} was acknowledged, not stored"
            assert logged[result.environment.id] == result.revision, f"{name} logged under another revision"
    revisions = [result.revision for result in outcomes.values() if result.revision is not None]
    assert len(revisions) == len(set(revisions)), "two writes answered the same revision"

    # A write after all of it is seen by the view at once, and so is everything before it.
    last = await created(create_call(harness, org.owner_secret, "After the hurry"))
    assert last.code == "OK" and last.revision is not None and last.environment is not None
    assert last.revision == await assert_view_matches_database(harness, org)


async def test_two_organizations_in_the_same_groups_keep_their_own_gapless_order(harness: Harness) -> None:
    """Writes of two organizations interleave in shared groups, some of their callers giving up
    on the way: each organization's acknowledged revisions are unique, and a WatchEvents stream
    of each sees every stored revision of its organization exactly once, in order."""
    orgs = [await harness.new_org("Left"), await harness.new_org("Right")]
    envs = [await harness.new_environment(o, "Shared groups") for o in orgs]
    watchers = [Watcher(harness.channel, o.owner_secret) for o in orgs]
    try:
        starts = [await watcher.live() for watcher in watchers]
        answers: list[list[tuple[str, int | None]]] = [[], []]
        for round_number in range(5):
            calls: list[tuple[int, Awaitable[tuple[str, int | None]]]] = []
            for n in range(40):
                side = n % 2
                timeout = TINY_DEADLINES[n % len(TINY_DEADLINES)] if n % 3 == 0 else None
                call = register_call(
                    harness, orgs[side].owner_secret, f"r{round_number}-{n}", envs[side].id, timeout=timeout
                )
                calls.append((side, outcome(call)))
            results = await asyncio.gather(*(awaitable for _, awaitable in calls))
            for (side, _), result in zip(calls, results, strict=True):
                answers[side].append(result)

        for side, o in enumerate(orgs):
            codes = {code for code, _ in answers[side]}
            assert codes <= {"OK", *GAVE_UP}, codes
            revisions = [revision for _, revision in answers[side] if revision is not None]
            assert len(revisions) == len(set(revisions)), f"{o.id}: one revision answered twice"
            events = await stored_events(harness, o.id)
            assert_gapless(events)
            last = await stored_revision(harness, o.id)
            assert set(revisions) <= set(range(starts[side] + 1, last + 1))

            watcher = watchers[side]
            await watcher.reached(last)
            seen = [e.revision for e in watcher.events]
            assert seen == sorted(seen), f"{o.id}: the stream went back in revision order"
            assert sorted(set(seen)) == list(range(starts[side] + 1, last + 1)), (
                f"{o.id}: the stream missed revisions {set(range(starts[side] + 1, last + 1)) - set(seen)}"
            )
            streamed = [e.scoped_resource.resource_id for e in watcher.events if e.action == Event.REGISTERED]
            assert len(streamed) == len(set(streamed)), f"{o.id}: a registration streamed twice"
            stored = await stored_resources(harness, o.id)
            assert {f"INBOX:{name}" for name in streamed} == stored.keys()
            assert not any(e.organization_id != o.id for e in watcher.events)
    finally:
        for watcher in watchers:
            await watcher.close()


@dataclass
class Verified:
    started: float
    valid: bool
    denial: int


async def test_no_verify_started_after_a_revoke_was_acknowledged_accepts_the_key(
    harness: Harness, org: Org
) -> None:
    """Eight keys (half warm in the cache, half never used) are revoked at once among a stream of
    other writes, so the revokes commit in groups; VerifyApiKey calls hammer every key all along.
    Once a revoke is acknowledged, every verify of its key that starts afterwards is REVOKED."""
    env = await harness.new_environment(org, "Revokes")
    keys = [await harness.new_key(org, ["inboxes:read"], name=f"doomed {n}") for n in range(8)]
    for _, secret in keys[:4]:
        assert (await harness.verify(secret)).valid
    acknowledged: dict[str, float] = {}
    verified: dict[str, list[Verified]] = collections.defaultdict(list)
    stop = asyncio.Event()

    async def hammer(key_id: str, secret: str) -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = await harness.verify(secret)
            verified[key_id].append(Verified(started, response.valid, response.denial_reason))

    async def other_writes() -> None:
        n = 0
        while not stop.is_set():
            await asyncio.gather(
                *(
                    outcome(register_call(harness, org.owner_secret, f"noise-{n}-{m}", env.id))
                    for m in range(8)
                )
            )
            n += 1

    async def revoke(key: api_key_pb2.ApiKey) -> None:
        await asyncio.sleep(0.05)
        await harness.api_keys.RevokeApiKey(
            api_key_pb2.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
        )
        acknowledged[key.id] = time.monotonic()

    background = [asyncio.ensure_future(hammer(key.id, secret)) for key, secret in keys for _ in range(3)]
    background.append(asyncio.ensure_future(other_writes()))
    try:
        await asyncio.gather(*(revoke(key) for key, _ in keys))
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*background)

    for key, _ in keys:
        after = [v for v in verified[key.id] if v.started > acknowledged[key.id]]
        assert after, f"no verify of {key.id} started after its revoke"
        accepted = [v for v in after if v.valid]
        assert not accepted, (
            f"{key.id}: {len(accepted)} of {len(after)} verifies after the revoke accepted it"
        )
        assert {v.denial for v in after} == {api_key_pb2.VerifyApiKeyResponse.REVOKED}
    revoked = [e for e in await stored_events(harness, org.id) if e.action == "REVOKED"]
    assert {e.resource_id for e in revoked} == {key.id for key, _ in keys}
    assert_gapless(await stored_events(harness, org.id))


async def test_a_second_server_on_the_file_never_makes_a_write_fail(tmp_path: Path) -> None:
    """Two servers on one SQLite file (two replicas) take creates of one organization at once,
    round after round, each forming groups that hold the file's write lock while the other
    waits for it, some callers giving up on the way: every other call is answered OK, revisions are never answered twice, everything
    acknowledged is stored with its event, and each server's view, asked for the stored
    revision, lists exactly what is stored."""
    backend = sqlite_backend(tmp_path)
    async with serving(backend) as first, serving(backend) as second:
        org = await first.new_org()
        servers = (first, second)
        results: list[Created] = []
        for round_number in range(5):
            calls = [
                created(
                    create_call(
                        servers[n % 2],
                        org.owner_secret,
                        f"Replica {n % 2} {round_number}-{n}",
                        timeout=TINY_DEADLINES[n % len(TINY_DEADLINES)] if n % 5 == 4 else None,
                    )
                )
                for n in range(40)
            ]
            results += await asyncio.gather(*calls)
        codes = collections.Counter(result.code for result in results)
        assert set(codes) <= {"OK", *GAVE_UP}, codes
        assert codes["OK"] >= 160, codes
        results = [result for result in results if result.code == "OK"]
        revisions = [result.revision for result in results]
        assert len(revisions) == len(set(revisions)), "two writes answered the same revision"

        stored = await stored_environments(first, org.id)
        made = {result.environment.id for result in results if result.environment is not None}
        assert made <= stored.keys()
        events = await stored_events(first, org.id)
        logged = created_events(events)
        for result in results:
            assert result.environment is not None
            assert logged[result.environment.id] == result.revision
        revision = await assert_view_matches_database(first, org)
        in_second = await listed(second, org.owner_secret, revision)
        assert in_second.keys() == stored.keys()


async def test_idempotent_creates_racing_in_a_group_make_one_environment(harness: Harness, org: Org) -> None:
    """Ten callers each send the same create under four request ids, among creates without one,
    all at once: each request id makes one environment and every one of its callers is answered
    with it; replays are not logged as creates."""
    before = set(await stored_environments(harness, org.id))
    request_ids = [str(uuid.uuid4()) for _ in range(4)]
    calls: list[tuple[str, Awaitable[Created]]] = []
    for n in range(40):
        request_id = request_ids[n % 4]
        calls.append(
            (
                request_id,
                created(create_call(harness, org.owner_secret, f"Once {request_id}", request_id=request_id)),
            )
        )
        if n % 4 == 0:
            calls.append(("", created(create_call(harness, org.owner_secret, f"Plain {n}"))))
    results = await asyncio.gather(*(awaitable for _, awaitable in calls))
    by_request: dict[str, set[str]] = collections.defaultdict(set)
    for (request_id, _), result in zip(calls, results, strict=True):
        assert result.code == "OK", (request_id, result.code)
        assert result.environment is not None
        if request_id:
            by_request[request_id].add(result.environment.id)
    assert {request_id: len(ids) for request_id, ids in by_request.items()} == dict.fromkeys(request_ids, 1)
    revisions = [result.revision for result in results]
    assert len(revisions) == len(set(revisions)), "two writes answered the same revision"

    stored = await stored_environments(harness, org.id)
    new = {env_id: name for env_id, (name, _) in stored.items() if env_id not in before}
    assert collections.Counter(new.values()) == dict.fromkeys(
        [*(f"Once {r}" for r in request_ids), *(f"Plain {n}" for n in range(0, 40, 4))], 1
    )
    for request_id, ids in by_request.items():
        assert new[next(iter(ids))] == f"Once {request_id}"
    logged = created_events(await stored_events(harness, org.id))
    assert new.keys() <= logged.keys()
    seen = await listed(harness, org.owner_secret, await stored_revision(harness, org.id))
    assert new.keys() <= seen.keys()


async def test_the_view_shows_each_winner_as_acknowledged_never_a_refused_one(
    harness: Harness, org: Org
) -> None:
    """Round after round, four callers race for each of eight new names, each with a description
    of its own: one wins each name, the others are ALREADY_EXISTS SLUG_TAKEN after raising a
    revision inside the group. Right after the answers, without asking for a revision, the view
    served from memory lists every winner with the winner's description, and the database agrees."""
    for round_number in range(6):
        contenders = [(f"Contested {round_number}-{n % 8}", f"caller {n}") for n in range(32)]
        results = await asyncio.gather(
            *(
                created(create_call(harness, org.owner_secret, name, description=said))
                for name, said in contenders
            )
        )
        codes = collections.Counter(result.code for result in results)
        assert codes == {"OK": 8, "ALREADY_EXISTS SLUG_TAKEN": 24}, codes
        winners = {
            result.environment.id: (name, said)
            for (name, said), result in zip(contenders, results, strict=True)
            if result.environment is not None
        }
        revisions = sorted(result.revision for result in results if result.revision is not None)
        assert revisions == list(range(revisions[0], revisions[0] + 8)), revisions

        page = await harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=100), metadata=auth(org.owner_secret)
        )
        shown = {env.id: (env.name, env.description) for env in page.environments}
        assert {env_id: shown.get(env_id) for env_id in winners} == winners
        assert len({name for name, _ in shown.values()}) == len(shown), "a name listed twice"
        stored = await stored_environments(harness, org.id)
        assert {env_id: stored[env_id][0] for env_id in winners} == {k: v[0] for k, v in winners.items()}
    await assert_view_matches_database(harness, org)


def register_ten(
    harness: Harness,
    secret: str,
    environment_id: str,
    prefix: str,
    names: list[str],
    calls: list[asyncio.Future[tuple[str, int | None]]],
) -> None:
    """Sends ten registrations named `prefix-<n>`, noting their names and outcomes. Each call is
    sent as it is made: these reach the server before any call made after them."""
    for n in range(10):
        names.append(f"{prefix}-{n}")
        call = register_call(harness, secret, names[-1], environment_id)
        calls.append(asyncio.ensure_future(outcome(call)))


async def test_registrations_racing_their_environments_delete_in_a_group(harness: Harness, org: Org) -> None:
    """Round after round, registrations into a new environment keep coming, ten at a time, while
    it is deleted, so that they share groups with the delete: each later member sees the earlier
    ones' work in the open transaction. Every registration acknowledged came before the delete
    (a lower revision), every one after it was refused, and what is stored, logged and listed
    agrees."""
    everything: collections.Counter[str] = collections.Counter()
    for round_number in range(5):
        env = await harness.new_environment(org, f"Doomed {round_number}")
        names: list[str] = []
        calls: list[asyncio.Future[tuple[str, int | None]]] = []

        register_ten(harness, org.owner_secret, env.id, f"d{round_number}-0", names, calls)
        delete = asyncio.ensure_future(
            outcome(
                harness.environments.DeleteEnvironment(
                    environment_pb2.DeleteEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
                )
            )
        )
        register_ten(harness, org.owner_secret, env.id, f"d{round_number}-1", names, calls)
        for wave in range(2, 200):
            await asyncio.sleep(0.001)
            finished = delete.done()
            register_ten(harness, org.owner_secret, env.id, f"d{round_number}-{wave}", names, calls)
            if finished:
                break
        deleted_code, deleted_at = await delete
        assert deleted_code == "OK" and deleted_at is not None
        results = await asyncio.gather(*calls)
        codes = collections.Counter(code for code, _ in results)
        assert set(codes) <= {"OK", "FAILED_PRECONDITION ENVIRONMENT_DELETED"}, codes
        everything.update(codes)
        acknowledged = {
            f"INBOX:{name}": revision
            for name, (code, revision) in zip(names, results, strict=True)
            if code == "OK" and revision is not None
        }
        assert all(revision < deleted_at for revision in acknowledged.values()), (
            f"registered into {env.id} after its delete at {deleted_at}: {acknowledged}"
        )
        events = await stored_events(harness, org.id)
        assert_gapless(events)
        logged = {e.resource_id: e.revision for e in events if e.action == "REGISTERED"}
        assert {name: logged.get(name) for name in acknowledged} == acknowledged
        stored = {
            name for name, env_id in (await stored_resources(harness, org.id)).items() if env_id == env.id
        }
        assert stored == acknowledged.keys()
        assert {name for name in logged if name.startswith(f"INBOX:d{round_number}-")} == stored
    assert everything["OK"] and everything["FAILED_PRECONDITION ENVIRONMENT_DELETED"], everything
    await assert_view_matches_database(harness, org)


async def test_a_server_stopped_with_groups_in_flight_loses_nothing_it_acknowledged(tmp_path: Path) -> None:
    """A server is stopped while two hundred creates are queued, in groups and committing. Whatever
    each caller was told (never UNKNOWN or INTERNAL), the next server on the file finds every
    acknowledged environment under its revision, each stored one with its event, the log
    gapless, and serves exactly what is stored."""
    backend = sqlite_backend(tmp_path)
    app, channel = await start_server(backend)
    try:
        first = Harness(app, channel, backend.name)
        org = await first.new_org()
        calls = [
            asyncio.ensure_future(created(create_call(first, org.owner_secret, f"Cut {n}")))
            for n in range(200)
        ]
        # Stopped once some are answered: the others are queued, in a group or committing.
        while sum(call.done() for call in calls) < 10:
            await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        await app.stop(grace=0)
        results = await asyncio.gather(*calls)
    finally:
        await channel.close()
    codes = collections.Counter(result.code.split()[0] for result in results)
    assert not {"UNKNOWN", "INTERNAL"} & codes.keys(), codes

    async with serving(backend) as second:
        stored = await stored_environments(second, org.id)
        logged = created_events(await stored_events(second, org.id))
        for result in results:
            if result.code == "OK":
                assert result.environment is not None
                assert result.environment.id in stored, f"{result.environment.name} acknowledged, then lost"
                assert logged[result.environment.id] == result.revision
        await assert_view_matches_database(second, org)
