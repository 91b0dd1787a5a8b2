"""SQLite: writers that queue while one writes share its commit (group commit).

Each later writer runs in a savepoint of the open transaction, and the commit comes once those
that were waiting have had their turn. Through the gRPC surface of a real server:

- queued writers share commits, and each write is whole: its row, its event and its own
  revision, answered in `x-agentpost-revision`, the revisions gapless;
- a writer refused inside a group undoes its own work only: the others of its group commit,
  and it consumes no revision;
- a group whose commit fails fails every writer of it as UNAVAILABLE: none of them is stored,
  logged or served, and the next writes go through by themselves.

(PostgreSQL orders writes of one organization by its row lock and syncs its own WAL for
concurrent commits; it has no such groups. A full disk under concurrent writers is in
tests/test_database_full.py.)
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import environment_pb2, resource_pb2
from sqlalchemy import text

from service.storage import inline_sqlite
from tests.harness import Harness, Org, auth, fails, stored_events
from tests.servers import Backend, serving
from tests.writes import (
    assert_gapless,
    create_call,
    outcome,
    register_call,
    stored_environments,
    stored_resources,
    stored_revision,
)

WRITERS = 40
INBOX = resource_pb2.ScopedResource.INBOX


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """A server of its own on an SQLite file (group commit is SQLite's)."""
    async with serving(
        Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'agentpost.db'}", None)
    ) as running:
        yield running


@pytest.fixture
async def org(harness: Harness) -> Org:
    return await harness.new_org()


class Commits:
    """Counts the commits SQLite makes, and fails those the test asks to fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made = 0
        self.grouped = 0
        self.fail_next_group = False
        self.failed_groups = 0
        real = inline_sqlite._to_the_end

        async def counted(work: Callable[[], None]) -> None:
            # A group's commit is made by its committer, not by one of its writers.
            grouped = sys._getframe(1).f_code.co_name == "_commit_in_turn"
            if grouped and self.fail_next_group:
                self.fail_next_group = False
                self.failed_groups += 1
                raise sqlite3.OperationalError("disk I/O error")
            await real(work)
            self.made += 1
            self.grouped += grouped

        monkeypatch.setattr(inline_sqlite, "_to_the_end", counted)


async def all_at_once(calls: list[Awaitable[tuple[str, int | None]]]) -> list[tuple[str, int | None]]:
    return list(await asyncio.gather(*calls))


async def test_queued_writers_share_commits_and_each_write_is_whole(
    harness: Harness, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await harness.new_environment(org, "Busy")
    commits = Commits(monkeypatch)
    answers = await all_at_once(
        [outcome(register_call(harness, org.owner_secret, f"queued-{n}", env.id)) for n in range(WRITERS)]
    )
    assert [code for code, _ in answers] == ["OK"] * WRITERS
    revisions = sorted(revision for _, revision in answers if revision is not None)
    assert revisions == list(range(revisions[0], revisions[0] + WRITERS)), revisions
    assert commits.grouped, "no writer waited for another's commit"
    assert commits.made < WRITERS, f"{commits.made} commits for {WRITERS} writes"

    acknowledged = {f"INBOX:queued-{n}": revision for n, (_, revision) in enumerate(answers)}
    events = await stored_events(harness, org.id)
    logged = {e.resource_id: e.revision for e in events if e.resource_id.startswith("INBOX:queued-")}
    assert logged == acknowledged
    assert_gapless(events)
    stored = await stored_resources(harness, org.id)
    assert {name: stored.get(name) for name in acknowledged} == dict.fromkeys(acknowledged, env.id)
    # Served from the replica's view too.
    found = await harness.resources.GetResource(
        resource_pb2.GetResourceRequest(kind=INBOX, resource_id=f"queued-{WRITERS - 1}"),
        metadata=auth(org.owner_secret, env.id),
    )
    assert found.environment_id == env.id


async def test_a_writer_refused_inside_a_group_undoes_only_its_own_work(
    harness: Harness, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four callers race for each of ten slugs: exactly one of each four wins, the others are
    ALREADY_EXISTS SLUG_TAKEN, and the winners' revisions are consecutive (a refusal consumed
    none), their environments and events stored."""
    before = await stored_environments(harness, org.id)
    commits = Commits(monkeypatch)
    names = [f"Contested {n % 10}" for n in range(WRITERS)]
    answers = await all_at_once([outcome(create_call(harness, org.owner_secret, name)) for name in names])
    codes = collections.Counter(code for code, _ in answers)
    assert codes == {"OK": 10, "ALREADY_EXISTS SLUG_TAKEN": WRITERS - 10}, codes
    assert commits.grouped, "no writer waited for another's commit"
    assert commits.made < 10, f"{commits.made} commits for 10 successful writes"
    winners = sorted(revision for code, revision in answers if revision is not None)
    assert winners == list(range(winners[0], winners[0] + 10)), winners

    created = {
        environment_id: name
        for environment_id, (name, _) in (await stored_environments(harness, org.id)).items()
        if environment_id not in before
    }
    assert sorted(created.values()) == sorted({*names})
    events = await stored_events(harness, org.id)
    logged = {
        e.resource_id: e.revision
        for e in events
        if e.resource_type == "ENVIRONMENT" and e.action == "CREATED" and e.resource_id not in before
    }
    assert logged.keys() == created.keys(), "a refused create left its event behind"
    assert sorted(logged.values()) == winners
    assert_gapless(events)


async def test_a_failed_group_commit_fails_each_of_its_writers_and_keeps_none(
    harness: Harness, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await harness.new_environment(org, "Shaky disk")
    commits = Commits(monkeypatch)
    commits.fail_next_group = True
    answers = await all_at_once(
        [outcome(register_call(harness, org.owner_secret, f"shaky-{n}", env.id)) for n in range(WRITERS)]
    )
    assert commits.failed_groups == 1
    codes = collections.Counter(code for code, _ in answers)
    assert set(codes) == {"OK", "UNAVAILABLE DATABASE_UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE DATABASE_UNAVAILABLE"] >= 2, "the failed commit held one writer only"

    failed = {f"INBOX:shaky-{n}" for n, (code, _) in enumerate(answers) if code != "OK"}
    acknowledged = {
        f"INBOX:shaky-{n}": revision for n, (code, revision) in enumerate(answers) if code == "OK"
    }
    stored = await stored_resources(harness, org.id)
    assert not failed & stored.keys(), "a write of the failed group was stored"
    assert acknowledged.keys() <= stored.keys()
    events = await stored_events(harness, org.id)
    logged = {e.resource_id: e.revision for e in events if e.resource_id.startswith("INBOX:shaky-")}
    assert logged == acknowledged
    assert_gapless(events)
    for name in sorted(failed)[:3]:
        await fails(
            harness.resources.GetResource(
                resource_pb2.GetResourceRequest(kind=INBOX, resource_id=name.split(":", 1)[1]),
                metadata=auth(org.owner_secret, env.id),
            ),
            grpc.StatusCode.NOT_FOUND,
        )

    # The writer connection is whole again: the failed writes can be made now.
    again = await all_at_once(
        [outcome(register_call(harness, org.owner_secret, name.split(":", 1)[1], env.id)) for name in failed]
    )
    assert {code for code, _ in again} == {"OK"}
    created = await harness.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name="After the failure"), metadata=auth(org.owner_secret)
    )
    assert created.state == environment_pb2.Environment.State.ACTIVE
    assert_gapless(await stored_events(harness, org.id))


async def test_a_writer_whose_work_cannot_be_undone_alone_fails_its_whole_group(
    harness: Harness, org: Org
) -> None:
    """A refused writer's work is undone by rolling back to its savepoint. Where that fails (here
    the writer released its savepoint itself), its work cannot be told from the others', so
    nothing of the group may commit: every writer of it fails, and the revision stays."""
    database = harness.app.database
    before = await stored_revision(harness, org.id)
    holding, go_on = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with database.write(org.id):
            holding.set()
            await go_on.wait()

    async def second() -> None:
        async with database.write(org.id):
            pass

    async def saboteur() -> None:
        async with database.write(org.id) as uow:
            await uow.statements.execute(text("RELEASE agentpost_write"))
            raise RuntimeError("refused after its savepoint was gone")

    writers = [asyncio.ensure_future(first())]
    await holding.wait()
    writers += [asyncio.ensure_future(second()), asyncio.ensure_future(saboteur())]
    await asyncio.sleep(0.05)  # both reach the queue, behind the first
    assert database._sqlite_writers is not None
    assert database._sqlite_writers.waiting == 2
    go_on.set()
    outcomes = await asyncio.gather(*writers, return_exceptions=True)
    assert [type(outcome).__name__ for outcome in outcomes] == ["Unavailable", "Unavailable", "RuntimeError"]
    assert await stored_revision(harness, org.id) == before
    assert_gapless(await stored_events(harness, org.id))
    # The writer connection is whole again.
    code, revision = await outcome(register_call(harness, org.owner_secret, "after-the-sabotage"))
    assert (code, revision) == ("OK", before + 1)
