"""SQLite's one write lock held by another program (a second process on the file, a `sqlite3`
shell in a transaction): a write waits for it without holding up the service, so other calls are
answered meanwhile; a lock held past the bounded wait makes the write UNAVAILABLE with its reason,
never UNKNOWN or a hang; and once the lock is free, writes go through again. The write path runs
on the event loop's thread (see service/storage/inline_sqlite.py), so these are the promises that
keep it from stalling the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import environment_pb2

from service.storage import inline_sqlite
from tests.harness import auth, fails
from tests.servers import Backend, serving


@contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection to the file holding SQLite's write lock until the block ends."""
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield holder
        holder.execute("ROLLBACK")
    finally:
        holder.close()


def sqlite_backend(tmp_path: Path) -> tuple[Backend, Path]:
    path = tmp_path / "locked.db"
    return Backend("sqlite", f"sqlite+aiosqlite:///{path}", None), path


async def test_a_write_waits_for_another_writer_while_other_calls_are_answered(tmp_path: Path) -> None:
    backend, path = sqlite_backend(tmp_path)
    async with serving(backend) as harness:
        org = await harness.new_org()
        with write_lock_held(path):
            write = asyncio.ensure_future(harness.new_environment(org, "Staging"))
            # Calls keep being answered, one by one, while the write waits for the lock.
            started = time.monotonic()
            answered = 0
            while time.monotonic() - started < 0.5:
                response = await asyncio.wait_for(harness.verify(org.owner_secret), timeout=1.0)
                assert response.valid
                answered += 1
            assert answered >= 100, f"only {answered} calls answered in 0.5 s while a write waited"
            assert not write.done(), "the write went through while another connection held the lock"
        created = await asyncio.wait_for(write, timeout=5.0)
        assert created.slug == "staging"
        listed = await harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(), metadata=auth(org.owner_secret)
        )
        assert "staging" in {env.slug for env in listed.environments}


async def test_a_lock_held_past_the_wait_is_unavailable_and_writes_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inline_sqlite, "WAIT_SECONDS", 0.5)
    backend, path = sqlite_backend(tmp_path)
    async with serving(backend) as harness:
        org = await harness.new_org()
        with write_lock_held(path):
            started = time.monotonic()
            failure = await fails(
                harness.new_environment(org, "Staging"), grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"
            )
            waited = time.monotonic() - started
            assert "busy" in failure.message
            assert 0.4 <= waited < 5.0, f"gave up after {waited:.2f} s, not after the bounded wait"
            # Nothing of the refused write is visible, and reads still answer.
            assert (await harness.verify(org.owner_secret, "staging")).valid is False
        created = await harness.new_environment(org, "Staging")
        assert created.slug == "staging"
        assert (await harness.verify(org.owner_secret, "staging")).valid
