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

Writers of this process take turns (`Database.write`), and those that queue while one writes
share its commit (group commit): a writer that ends its work while others wait for their turn
leaves its transaction open, lets the next one in, and waits for the commit. Each later writer
runs in a savepoint of that transaction, so a refusal undoes its own work only. The commit comes
once the writers that were waiting have had their turn. Every commit costs a sync of the WAL
(`synchronous=FULL`), the hand-off to the commit thread and back, and a turn of the loop for the
next writer; a group pays them once (with 32 callers, a RegisterResource took less than half the
server CPU it took with a commit each). No writer is answered before the commit that holds its
work returns, and if that commit fails, every writer of the group fails with it (UNAVAILABLE, or
DATABASE_FULL on a full disk): none was acknowledged.

Reads need none of it: in WAL mode a reader never waits for a writer, and `sqlite3` begins no
transaction for a SELECT, so each reads the last committed state. A read holds the loop for as
long as SQLite takes to answer it, which for the indexed reads the service makes is far less than
the thread hand-offs it saves (a cache miss of VerifyApiKey: about 4x faster).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol

from sqlalchemy import Connection, CursorResult, Engine, ScalarResult, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.pool import QueuePool
from sqlalchemy.sql.base import Executable
from sqlalchemy.util.typing import TupleAny

from service.domain.errors import Unavailable
from service.storage import prepared
from service.storage.statements import Statements

# Sets up a new connection (driver connection, pool record, busy timeout in ms).
Pragmas = Callable[[Any, Any, int], None]

WAIT_SECONDS = 10.0
BUSY_TIMEOUT_MS = 100
_FIRST_PAUSE_SECONDS = 0.001
_LONGEST_PAUSE_SECONDS = 0.02


class _Ending:
    """Something that ends once, told on the loop's thread, which any number of callers wait for
    to the end even if they are cancelled meanwhile: a commit must not be left running on a
    connection handed to the next writer, nor a writer of a group go before the group's commit."""

    __slots__ = ("_waiters", "ended", "error")

    def __init__(self) -> None:
        self.ended = False
        self.error: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def end(self, error: BaseException | None = None) -> None:
        """It ended (with `error`, if it failed); its waiters go on. Only the first end counts."""
        if self.ended:
            return
        self.ended, self.error = True, error
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def waited(self) -> BaseException | None:
        """Returns its error once it has ended. A caller cancelled meanwhile gets the
        cancellation then, but only if it ended without error (its error comes first)."""
        loop = asyncio.get_running_loop()
        cancelled = False
        while not self.ended:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                cancelled = True
        if cancelled and self.error is None:
            raise asyncio.CancelledError
        return self.error


class _Commit:
    """One piece of work for the commit thread, and its ending, which its caller waits for."""

    __slots__ = ("_loop", "ending", "work")

    def __init__(self, work: Callable[[], None]) -> None:
        self.work = work
        self._loop = asyncio.get_running_loop()
        self.ending = _Ending()

    def run(self) -> None:
        """Runs the work (on the commit thread) and tells the caller's loop it ended."""
        error: BaseException | None = None
        try:
            self.work()
        except BaseException as caught:  # handed to the caller, whatever it is
            error = caught
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            self._loop.call_soon_threadsafe(self.ending.end, error)


# Commits run one at a time on one thread of their own (each process has one writer connection;
# its writers queue for it first). A queue and a future per commit: the executor's futures, their
# chaining into asyncio's and a shield cost the loop's thread about as much as the commit's
# statements did.
_COMMITS: queue.SimpleQueue[_Commit] = queue.SimpleQueue()
_commit_thread: threading.Thread | None = None
_commit_thread_lock = threading.Lock()


def _run_commits() -> None:
    while True:
        _COMMITS.get().run()


def _submit(commit: _Commit) -> None:
    global _commit_thread
    if _commit_thread is None:
        with _commit_thread_lock:
            if _commit_thread is None:
                _commit_thread = threading.Thread(target=_run_commits, name="agentpost-commit", daemon=True)
                _commit_thread.start()
    _COMMITS.put(commit)


async def _to_the_end(work: Callable[[], None]) -> None:
    """Runs `work` on the commit thread and waits for it to end even if the caller is cancelled
    meanwhile (see `_Ending`): so a group's committer can tell its writers whether the commit
    was made."""
    commit = _Commit(work)
    _submit(commit)
    error = await commit.ending.waited()
    if error is not None:
        raise error


class InlineStatements:
    """A synchronous Core connection offered as the awaitable `Statements` of a unit of work;
    prepared statements (see `storage.prepared`) run on its `sqlite3` connection directly."""

    __slots__ = ("_connection", "driver")

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        driver = connection.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        self.driver = driver

    @property
    def dialect(self) -> Dialect:
        return self._connection.dialect

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[*TupleAny]:
        if prepared.is_prepared(statement):
            return self._run(statement, parameters).as_cursor_result()
        return self._connection.execute(statement, parameters)

    async def scalar(self, statement: Executable, parameters: Any = None) -> Any:
        if prepared.is_prepared(statement):
            return self._run(statement, parameters).scalar()
        return self._connection.scalar(statement, parameters)

    async def scalars(self, statement: Executable, parameters: Any = None) -> ScalarResult[Any]:
        if prepared.is_prepared(statement):
            return self._run(statement, parameters).as_scalar_result()
        return self._connection.scalars(statement, parameters)

    def _run(self, statement: Executable, parameters: Any) -> prepared.Rows:
        run = prepared.run(statement, self._connection.dialect, parameters)
        if run is None:
            return prepared.Rows([])
        plan = run.plan
        with run.observed(self._connection):
            try:
                if run.many and not plan.returns_rows:
                    self.driver.executemany(plan.sql, run.arguments)
                    return prepared.Rows([])
                fetched: list[Any] = []
                for values in run.arguments:
                    fetched.extend(self.driver.execute(plan.sql, values).fetchall())
                return prepared.Rows(plan.rows(fetched))
            except sqlite3.Error as error:
                raise _wrapped(plan.sql, error) from error


def _wrapped(statement: str, error: sqlite3.Error) -> StatementError:
    """A `sqlite3` error raised outside SQLAlchemy, wrapped as SQLAlchemy would have wrapped it
    (storage.errors reads those)."""
    return DBAPIError.instance(statement, None, error, sqlite3.Error)


@contextmanager
def _as_dbapi_error(statement: str) -> Iterator[None]:
    """Wraps the `sqlite3` errors of the block (see `_wrapped`)."""
    try:
        yield
    except sqlite3.Error as error:
        raise _wrapped(statement, error) from error


class Turn(Protocol):
    """A writer's turn in this process's queue of writers (see `Database.write`)."""

    def let_go(self) -> None:
        """Lets the next writer in."""

    async def after_the_one_before(self) -> None:
        """Returns once the writer before this one has ended."""

    def end(self) -> None:
        """This writer is done."""


class WriterQueue(Protocol):
    """This process's writers, in turn."""

    @property
    def waiting(self) -> int:
        """How many writers wait for their turn."""

    async def take(self) -> Turn:
        """Waits for a turn."""


_SAVEPOINT = "SAVEPOINT agentpost_write"
_RELEASE = "RELEASE agentpost_write"
_ROLLBACK_TO = "ROLLBACK TO agentpost_write"


class _Group:
    """Writers sharing one open transaction and its commit; the first one opened it."""

    __slots__ = ("connection", "ending", "statements")

    def __init__(self, connection: Connection, statements: InlineStatements) -> None:
        self.connection = connection
        self.statements = statements
        self.ending = _Ending()  # the group's transaction committed, or failed

    async def committed(self) -> None:
        """Waits for the group's commit (see `_Ending`); raises what made it fail."""
        error = await self.ending.waited()
        if isinstance(error, sqlite3.Error):
            raise _wrapped("COMMIT", error)
        if error is not None:
            raise Unavailable(
                "the write could not be committed; it was not made", reason="DATABASE_UNAVAILABLE"
            ) from error


class InlineSQLite:
    """The engines reads and writes run on: one connection for this process's writers (they
    queue for SQLite's one write lock anyway) and a pool for readers, which never waits: a read
    that finds every pooled connection in use opens another."""

    def __init__(self, url: URL, pragmas: Pragmas) -> None:
        self.reader = self._engine(url, pragmas, pool_size=4, busy_timeout_ms=BUSY_TIMEOUT_MS)
        self.writer = self._engine(url, pragmas, pool_size=1, busy_timeout_ms=0)
        # The transaction that writers waiting for their turn join, until its commit is made.
        self._open: _Group | None = None
        self._committers: set[asyncio.Task[None]] = set()
        self.commits = 0  # made, each holding one writer's work or a group's

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
    async def writing(self, queue: WriterQueue, turn: Turn) -> AsyncIterator[Statements]:
        """A transaction holding SQLite's write lock, for the writer holding `turn` in `queue`.

        Committed on a worker thread when the block ends, or rolled back if it raises (or is
        cancelled before the commit). While other writers wait in the queue, the commit is left
        to them (see the module's docstring): this writer lets the next one in and waits for it."""
        group = self._open
        if group is not None:
            async with self._joining(group, turn) as statements:
                yield statements
            return
        connection: Connection | None = self.writer.connect()
        assert connection is not None
        try:
            statements = InlineStatements(connection)
            driver = statements.driver
            await _begin_immediate(driver)
            try:
                yield statements
            except BaseException:
                with _as_dbapi_error("ROLLBACK"):
                    driver.rollback()
                raise
            if queue.waiting:
                group = self._open = _Group(connection, statements)
                connection = None  # the group's now: its commit closes it
                self._commit_after_those_waiting(group, queue)
                turn.let_go()
                await group.committed()
                return
            with _as_dbapi_error("COMMIT"):
                await _to_the_end(driver.commit)
            self.commits += 1
            # SQLAlchemy's own bookkeeping: its transaction ends (the driver's commit is a no-op now).
            connection.commit()
        finally:
            if connection is not None:
                connection.close()

    @asynccontextmanager
    async def _joining(self, group: _Group, turn: Turn) -> AsyncIterator[Statements]:
        """The block in a savepoint of the group's open transaction; then waits for its commit."""
        driver = group.statements.driver
        try:
            with _as_dbapi_error(_SAVEPOINT):
                driver.execute(_SAVEPOINT)
            try:
                yield group.statements
            except BaseException:
                try:
                    driver.execute(_ROLLBACK_TO)
                    driver.execute(_RELEASE)
                except sqlite3.Error as undoing:  # its work could not be undone alone: none commits
                    self._end(group, undoing)
                raise
            with _as_dbapi_error(_RELEASE):
                driver.execute(_RELEASE)
        except BaseException as error:
            if not driver.in_transaction:  # SQLite undid the whole transaction (a full disk, ...)
                self._end(group, error)
            raise
        turn.let_go()
        await group.committed()

    def _end(self, group: _Group, error: BaseException | None) -> None:
        """Closes the group's transaction (rolled back unless committed) and lets its writers go."""
        if group.ending.ended:
            return
        if self._open is group:
            self._open = None
        group.connection.close()
        group.ending.end(error)

    def _commit_after_those_waiting(self, group: _Group, queue: WriterQueue) -> None:
        """Queues the group's commit behind the writers waiting now: each joins the group first."""
        task = asyncio.ensure_future(self._commit_in_turn(group, queue))
        self._committers.add(task)
        task.add_done_callback(self._committers.discard)

    async def _commit_in_turn(self, group: _Group, queue: WriterQueue) -> None:
        try:
            turn = await queue.take()
        except BaseException as error:  # cancelled while waiting: the server is stopping
            self._end(group, error)
            raise
        try:
            if group.ending.ended:  # failed meanwhile
                return
            self._open = None
            try:
                await _to_the_end(group.statements.driver.commit)
            except asyncio.CancelledError:  # raised once the commit ended, and it succeeded
                self.commits += 1
                self._end(group, None)
                raise
            except Exception as error:  # its writers raise it (this task has no caller)
                self._end(group, error)
                return
            self.commits += 1
            group.connection.commit()
            self._end(group, None)
            turn.let_go()
            # Listeners hear writes in turn: the next writer's wait for this turn covers the group's.
            await turn.after_the_one_before()
        finally:
            turn.end()

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
