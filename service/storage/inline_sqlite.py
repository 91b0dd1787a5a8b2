"""SQLite reads and writes run on the event loop's own thread.

aiosqlite runs every statement on a thread of its own and hands each result back through the
event loop: a write of seven statements made about twenty such round trips, and SQLite's one
write lock was held across all of them, so writes queued behind the hand-offs, not behind the
work (a few microseconds per statement in WAL mode). This dialect is the standard `sqlite3`
driver marked usable from asyncio: SQLAlchemy's asyncio layer runs it inside its greenlet, and as
the driver never awaits, each statement runs at once, to completion.

It serves `Database.write()` and `Database.read()` on SQLite, the revision poll included
(migrations and bulk seeding keep aiosqlite). Two rules keep writes from stalling the loop:

- the transaction starts with `BEGIN IMMEDIATE`, so the write lock is taken first or not at all.
  While another process holds it, the wait is an asyncio sleep (1 ms, doubling to 20 ms) and
  other calls go on; after `WAIT_SECONDS` the write is UNAVAILABLE (the busy database);
- SQLite's own busy handler, which would sleep on the loop's thread, is kept short
  (`BUSY_TIMEOUT_MS`), for the rare lock a statement meets after the write lock is held.

The commit itself, where SQLite writes and syncs the log, runs on a worker thread (see
`do_commit`), so a slow disk or a checkpoint does not hold up other calls.

Reads need neither: in WAL mode a reader never waits for a writer. A read holds the loop for as
long as SQLite takes to answer it, which for the indexed reads the service makes is far less than
the thread hand-offs it saves (a cache miss of VerifyApiKey: about 4x faster).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import pool
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL
from sqlalchemy.util.concurrency import await_

DRIVER_NAME = "sqlite+agentpost_inline"
READ_DRIVER_NAME = "sqlite+agentpost_inline_read"
WAIT_SECONDS = 10.0
BUSY_TIMEOUT_MS = 100
_FIRST_PAUSE_SECONDS = 0.001
_LONGEST_PAUSE_SECONDS = 0.02


async def _done() -> None:
    """An awaitable that completes at once."""


async def _to_the_end(work: Callable[[], None]) -> None:
    """Runs `work` on a worker thread and waits for it to end even if the caller is cancelled
    meanwhile (the cancellation is raised once it has ended): a commit must not be left running
    on a connection that is handed to the next writer."""
    running = asyncio.ensure_future(asyncio.to_thread(work))
    cancelled = False
    while not running.done():
        try:
            await asyncio.shield(running)
        except asyncio.CancelledError:
            if running.done():
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    running.result()


class _Cursor(sqlite3.Cursor):
    """A `sqlite3` cursor with the one asyncio hook SQLAlchemy calls on a Core result."""

    async def _async_soft_close(self) -> None:
        """Nothing to release: rows are read from SQLite where they are asked for."""


class _Connection(sqlite3.Connection):
    """A `sqlite3` connection whose cursors are `_Cursor`s."""

    def cursor(self, factory: Any = _Cursor) -> Any:
        return super().cursor(factory)


class InlineSQLiteDialect(SQLiteDialect_pysqlite):
    """pysqlite for `AsyncEngine`: statements run where they are called, never on a thread."""

    driver = "agentpost_inline"
    is_async = True
    supports_statement_cache = True

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        return pool.AsyncAdaptedQueuePool

    # SQLAlchemy's AsyncConnection insists that a statement awaited something (it guards against
    # blocking drivers); an await that is already done satisfies it without leaving the call.
    def do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        await_(_done())
        super().do_execute(cursor, statement, parameters, context)  # type: ignore[no-untyped-call]

    def do_executemany(self, cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        await_(_done())
        super().do_executemany(cursor, statement, parameters, context)  # type: ignore[no-untyped-call]

    def do_execute_no_params(self, cursor: Any, statement: str, context: Any = None) -> None:
        await_(_done())
        super().do_execute_no_params(cursor, statement, context)  # type: ignore[no-untyped-call]

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        cparams.setdefault("factory", _Connection)
        return super().connect(*cargs, **cparams)

    def do_commit(self, dbapi_connection: Any) -> None:
        """Commits on a worker thread: the commit is where SQLite writes the WAL, syncs it to
        disk (`synchronous=FULL`) and, every thousand pages, checkpoints it into the database
        file; SQLite releases the GIL for all of that, so the loop serves calls meanwhile. The
        connection stays this transaction's until the commit has ended, cancelled or not."""
        await_(_to_the_end(dbapi_connection.commit))

    def do_begin(self, dbapi_connection: Any) -> None:
        """Takes the write lock, waiting for another process's writer without blocking the loop."""
        deadline = time.monotonic() + WAIT_SECONDS
        pause = _FIRST_PAUSE_SECONDS
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as error:
                if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            await_(asyncio.sleep(pause))
            pause = min(pause * 2, _LONGEST_PAUSE_SECONDS)


class InlineSQLiteReadDialect(InlineSQLiteDialect):
    """The same for reads: no BEGIN IMMEDIATE (a read takes no lock that a writer waits for in
    WAL mode, nor waits for one); `sqlite3` begins no transaction for a SELECT."""

    driver = "agentpost_inline_read"
    supports_statement_cache = True

    def do_begin(self, dbapi_connection: Any) -> None:
        """Nothing: each SELECT reads the last committed state."""


registry.register("sqlite.agentpost_inline", __name__, InlineSQLiteDialect.__name__)
registry.register("sqlite.agentpost_inline_read", __name__, InlineSQLiteReadDialect.__name__)
