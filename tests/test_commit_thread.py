"""SQLite commits on a worker thread: a caller cancelled while its commit runs waits for the
commit to end before the cancellation goes on, so the connection is never handed to the next
writer with a commit still running on it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.storage.inline_sqlite import _to_the_end


async def test_a_cancelled_caller_waits_for_the_work_to_end() -> None:
    started, ended = threading.Event(), threading.Event()

    def commit() -> None:
        started.set()
        time.sleep(0.2)
        ended.set()

    waiting = asyncio.ensure_future(_to_the_end(commit))
    await asyncio.to_thread(started.wait, 5)
    waiting.cancel()
    await asyncio.sleep(0.05)
    assert not waiting.done(), "the caller went on while the commit was still running"
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert ended.is_set()


async def test_the_works_own_failure_reaches_the_caller() -> None:
    def commit() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await _to_the_end(commit)


async def test_a_cancelled_caller_learns_the_works_failure_rather_than_its_cancellation() -> None:
    """A group's committer tells its writers whether the commit was made: a CancelledError from
    the wait means it was."""
    started = threading.Event()

    def commit() -> None:
        started.set()
        time.sleep(0.1)
        raise OSError("disk I/O error")

    waiting = asyncio.ensure_future(_to_the_end(commit))
    await asyncio.to_thread(started.wait, 5)
    waiting.cancel()
    with pytest.raises(OSError, match="disk I/O error"):
        await waiting
