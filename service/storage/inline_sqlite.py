"""SQLite runs on the event loop's own thread, through SQLAlchemy's synchronous Core.

aiosqlite runs every statement on a thread of its own and hands each result back through the
event loop: a write of seven statements made about twenty such round trips, and SQLite's one
write lock was held across all of them, so writes queued behind the hand-offs, not behind the
work (a few microseconds per statement in WAL mode). SQLAlchemy's asyncio layer, even over a
driver that never waits, costs a greenlet and its switches for every statement, connect, begin
and commit: more than half of the CPU a write spent on the loop's thread. Here the standard
`sqlite3` driver runs under a plain synchronous `Engine`, and `InlineStatements` hands its Core
to the repositories as the same awaitable calls `AsyncConnection` offers, run at once, to the end.

It serves `Database.write()` and `Database.read()` on SQLite, the revision poll included
(migrations and bulk seeding keep aiosqlite). Three rules keep writes from stalling the loop:

- the transaction starts with `BEGIN IMMEDIATE`, so the write lock is taken first or not at all.
  While another process holds it, the wait is an asyncio sleep (1 ms, doubling to 20 ms) and
  other calls go on; after `WAIT_SECONDS` the write is UNAVAILABLE (the busy database);
- the writer's connection has no busy handler (SQLite's would sleep on the loop's thread, up to
  its timeout on every attempt): it asks for the lock and is told at once. Once the lock is held,
  nothing a write does in WAL mode waits for another connection. Readers keep a short one
  (`BUSY_TIMEOUT_MS`) for the rare moment a WAL restart makes a read wait;
- the commit, where SQLite writes the WAL, syncs it to disk (`synchronous=FULL`) and, every
  thousand pages, checkpoints it into the database file, runs on a worker thread (SQLite
  releases the GIL for all of that), so a slow disk or a checkpoint does not hold up other calls.

Reads need none of it: in WAL mode a reader never waits for a writer, and `sqlite3` begins no
transaction for a SELECT, so each reads the last committed state. A read holds the loop for as
long as SQLite takes to answer it, which for the indexed reads the service makes is far less than
the thread hand-offs it saves (a cache miss of VerifyApiKey: about 4x faster).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, ScalarResult, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool
from sqlalchemy.sql.base import Executable
from sqlalchemy.util.typing import TupleAny

from service.storage.statements import Statements

# Sets up a new connection (driver connection, pool record, busy timeout in ms).
Pragmas = Callable[[Any, Any, int], None]

WAIT_SECONDS = 10.0
BUSY_TIMEOUT_MS = 100
_FIRST_PAUSE_SECONDS = 0.001
_LONGEST_PAUSE_SECONDS = 0.02


async def _to_the_end(work: Callable[[], None]) -> None:
    """Runs `work` on a worker thread and waits for it to end even if the caller is cancelled
    meanwhile (the cancellation is raised once it has ended): a commit must not be left running
    on a connection that is handed to the next writer."""
    # The loop's default executor directly: no task, coroutine or context copy per commit, as
    # `asyncio.to_thread` would make (the work needs no context variables).
    running = asyncio.get_running_loop().run_in_executor(None, work)
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


class InlineStatements:
    """A synchronous Core connection offered as the awaitable `Statements` of a unit of work."""

    __slots__ = ("_connection",)

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    @property
    def dialect(self) -> Dialect:
        return self._connection.dialect

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[*TupleAny]:
        return self._connection.execute(statement, parameters)

    async def scalar(self, statement: Executable, parameters: Any = None) -> Any:
        return self._connection.scalar(statement, parameters)

    async def scalars(self, statement: Executable, parameters: Any = None) -> ScalarResult[Any]:
        return self._connection.scalars(statement, parameters)


@contextmanager
def _as_dbapi_error(statement: str) -> Iterator[None]:
    """A `sqlite3` error raised outside SQLAlchemy, wrapped as SQLAlchemy would have wrapped it
    (storage.errors reads those)."""
    try:
        yield
    except sqlite3.Error as error:
        raise DBAPIError.instance(statement, None, error, sqlite3.Error) from error


class InlineSQLite:
    """The engines reads and writes run on: one connection for this process's writers (they
    queue for SQLite's one write lock anyway) and a pool for readers, which never waits: a read
    that finds every pooled connection in use opens another."""

    def __init__(self, url: URL, pragmas: Pragmas) -> None:
        self.reader = self._engine(url, pragmas, pool_size=4, busy_timeout_ms=BUSY_TIMEOUT_MS)
        self.writer = self._engine(url, pragmas, pool_size=1, busy_timeout_ms=0)

    @staticmethod
    def _engine(url: URL, pragmas: Pragmas, *, pool_size: int, busy_timeout_ms: int) -> Engine:
        engine = create_engine(
            url.set(drivername="sqlite+pysqlite"),
            poolclass=QueuePool,
            pool_size=pool_size,
            max_overflow=-1,
            # Commits run on a worker thread; each connection is used by one call at a time.
            connect_args={"check_same_thread": False},
        )
        event.listen(
            engine, "connect", lambda connection, record: pragmas(connection, record, busy_timeout_ms)
        )
        return engine

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[Statements]:
        """A connection for reads; nothing it does is committed."""
        with self.reader.connect() as connection:
            yield InlineStatements(connection)

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[Statements]:
        """A transaction holding SQLite's write lock, committed on a worker thread when the block
        ends, rolled back if it raises (or is cancelled before the commit)."""
        with self.writer.connect() as connection:
            driver = connection.connection.driver_connection
            assert isinstance(driver, sqlite3.Connection)
            await _begin_immediate(driver)
            try:
                yield InlineStatements(connection)
            except BaseException:
                with _as_dbapi_error("ROLLBACK"):
                    driver.rollback()
                raise
            with _as_dbapi_error("COMMIT"):
                await _to_the_end(driver.commit)
            # SQLAlchemy's own bookkeeping: its transaction ends (the driver's commit is a no-op now).
            connection.commit()

    def dispose(self) -> None:
        """Closes every pooled connection."""
        self.reader.dispose()
        self.writer.dispose()


async def _begin_immediate(driver: sqlite3.Connection) -> None:
    """Takes the write lock, waiting for another process's writer without blocking the loop."""
    deadline = time.monotonic() + WAIT_SECONDS
    pause = _FIRST_PAUSE_SECONDS
    with _as_dbapi_error("BEGIN IMMEDIATE"):
        while True:
            try:
                driver.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as error:
                if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, _LONGEST_PAUSE_SECONDS)
