"""SQLite's write path: transactions run on the event loop's own thread.

aiosqlite runs every statement on a thread of its own and hands each result back through the
event loop: a write of seven statements made about twenty such round trips, and SQLite's one
write lock was held across all of them, so writes queued behind the hand-offs, not behind the
work (a few microseconds per statement in WAL mode). This dialect is the standard `sqlite3`
driver marked usable from asyncio: SQLAlchemy's asyncio layer runs it inside its greenlet, and as
the driver never awaits, each statement runs at once, to completion.

It is used only for `Database.write()` on SQLite. Two rules keep it from stalling the loop:

- the transaction starts with `BEGIN IMMEDIATE`, so the write lock is taken first or not at all.
  While another process holds it, the wait is an asyncio sleep (1 ms, doubling to 20 ms) and
  other calls go on; after `WAIT_SECONDS` the write is UNAVAILABLE (the busy database);
- SQLite's own busy handler, which would sleep on the loop's thread, is kept short
  (`BUSY_TIMEOUT_MS`), for the rare lock a statement meets after the write lock is held.

Reads stay on aiosqlite: a long read there does not hold the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

from sqlalchemy import pool
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL
from sqlalchemy.util.concurrency import await_

DRIVER_NAME = "sqlite+agentpost_inline"
WAIT_SECONDS = 10.0
BUSY_TIMEOUT_MS = 100
_FIRST_PAUSE_SECONDS = 0.001
_LONGEST_PAUSE_SECONDS = 0.02


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

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        cparams.setdefault("factory", _Connection)
        return super().connect(*cargs, **cparams)

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


registry.register("sqlite.agentpost_inline", __name__, InlineSQLiteDialect.__name__)
