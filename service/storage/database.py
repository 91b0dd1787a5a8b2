"""The engines, connections and units of work. Every write names its organization, whose `revision`
it raises first: that row lock orders concurrent writes of one organization, and listeners
(the access cache) learn after commit which organization changed."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import (
    Integer,
    Select,
    String,
    bindparam,
    cast,
    event,
    func,
    literal,
    select,
    text,
    true,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.sql.base import Executable

from service.domain.calls import committed_revision, current_request_id
from service.domain.clock import utcnow
from service.domain.errors import DomainError, Unavailable
from service.domain.events import Action, Actor, Change, Event
from service.domain.models import Environment, Organization, ScopedResource
from service.storage.environments import environment_row
from service.storage.errors import has_sqlstate, translate
from service.storage.events import event_row, new_events
from service.storage.inline_sqlite import InlineSQLite
from service.storage.notifications import REVISION_CHANNEL, OnConnected, OnRevision, listen_for_revisions
from service.storage.postgres import PostgresStatements
from service.storage.prepared import prepared
from service.storage.resources import active_environment, resource_row
from service.storage.statements import Statements
from service.storage.tables import ENVIRONMENTS, EVENTS, ORGANIZATIONS, RESOURCES, insert_selecting
from service.storage.unit_of_work import UnitOfWork

log = logging.getLogger(__name__)

CommitListener = Callable[[str, int, list[Event]], None]


# Built once: the write path runs it on every write (see tables.table_of).
_RAISE_REVISION = prepared(
    update(ORGANIZATIONS)
    .where(ORGANIZATIONS.c.id == bindparam("organization_id"))
    .values(revision=ORGANIZATIONS.c.revision + 1)
    .returning(ORGANIZATIONS.c.revision)
)

# PostgreSQL: the same UPDATE, and in the same statement the NOTIFY that tells other replicas
# (`organization_id:revision`, delivered at commit, dropped on rollback): one round trip, not two.
_RAISED = _RAISE_REVISION.returning(ORGANIZATIONS.c.id).cte("raised")


def _raised_and_notified() -> Select[tuple[int, Any]]:
    return select(
        _RAISED.c.revision,
        func.pg_notify(
            literal(REVISION_CHANNEL), _RAISED.c.id + literal(":") + cast(_RAISED.c.revision, String)
        ),
    )


_RAISE_REVISION_AND_NOTIFY = prepared(_raised_and_notified())


# PostgreSQL, for a write whose one change is known before it begins (a create): the statement
# that raises the revision also appends that change's event (the values of `events.event_row`),
# so the organization's revision row lock is held for one round trip fewer. The event's values
# are named `event_<column>`; its organization and revision come from the raised row.
_EVENT_WITH_RAISED = insert_selecting(
    EVENTS, {"organization_id": _RAISED.c.id, "revision": _RAISED.c.revision}, "event_"
)
_RAISE_REVISION_APPEND_AND_NOTIFY = prepared(
    _raised_and_notified().add_cte(_EVENT_WITH_RAISED.cte("appended"))
)
# A write whose one change is a created environment or a registered resource, and nothing else (a
# create without a request id), is that statement with the record's row (named `row_<column>`)
# added, committed on its own: no BEGIN, no COMMIT, one round trip (see `Database.write`).
# An environment's insert reads nothing, so wherever it runs within the statement it finds what
# a later one would (a taken slug is refused by the unique index whatever the snapshot).
_ENVIRONMENT_CREATED = prepared(
    _raised_and_notified()
    .add_cte(_EVENT_WITH_RAISED.cte("appended"))
    .add_cte(insert_selecting(ENVIRONMENTS, prefix="row_").cte("created"))
)
# A registration goes in only while its environment is not deleted, read once the revision's row
# lock is held: the environment is joined to the raised row (LATERAL, so it is read after the
# UPDATE has its row) and locked FOR SHARE, which reads its latest committed version, not the
# statement's snapshot: a delete committed while this statement waited for the lock is seen, and
# none can commit before this one does. Every write of an environment holds the revision's lock
# first, so this order takes no lock the other way round. When the row did not go in, the
# statement divides by zero: nothing of it (revision, event, NOTIFY) is committed, and the write
# is made again in a transaction, which says why (see `Database._write_alone`).
_SQLSTATE_DIVISION_BY_ZERO = "22012"
_ACTIVE_ENVIRONMENT = (
    active_environment(_RAISED.c.id, bindparam("row_environment_id"))
    .with_for_update(read=True)
    .lateral("active")
)
_REGISTERED = (
    insert_selecting(
        RESOURCES,
        {"organization_id": _RAISED.c.id, "environment_id": _ACTIVE_ENVIRONMENT.c.id},
        "row_",
        _RAISED.join(_ACTIVE_ENVIRONMENT, true()),
    )
    .returning(RESOURCES.c.resource_id)
    .cte("registered")
)
_RESOURCE_REGISTERED = prepared(
    _raised_and_notified()
    .add_columns(literal(1, Integer) // select(func.count()).select_from(_REGISTERED).scalar_subquery())
    .add_cte(_EVENT_WITH_RAISED.cte("appended"))
    .add_cte(_REGISTERED)
)


@dataclasses.dataclass(frozen=True, slots=True)
class CommitCounts:
    """Write transactions committed by this process, and the writes they held (more than one
    each where SQLite's writers share a commit)."""

    commits: int
    writes: int


@dataclasses.dataclass(frozen=True)
class _Alone:
    """A write made in one statement: the statement and the values of its record's row."""

    statement: Select[Any]
    row: dict[str, Any]


def _alone(change: Change) -> _Alone | None:
    """How a write whose only change is `change` is made in one statement, if it can be."""
    record = change.resource
    if change.action is Action.CREATED and isinstance(record, Environment):
        return _Alone(_ENVIRONMENT_CREATED, environment_row(record))
    if change.action is Action.REGISTERED and isinstance(record, ScopedResource):
        return _Alone(_RESOURCE_REGISTERED, resource_row(record))
    return None


@dataclasses.dataclass
class _Written:
    """What a write raised: its organization, revision and events (None until raised)."""

    organization_id: str | None = None
    revision: int = 0
    events: list[Event] = dataclasses.field(default_factory=list)

    @property
    def raised(self) -> tuple[str, int] | None:
        """(organization, revision) once raised: it counts in `Database._committing` till the end."""
        return None if self.organization_id is None else (self.organization_id, self.revision)


class _Committed:
    """The statements of a write made in one statement, after it: there is nothing left to run
    in it, and running something would write outside it."""

    @property
    def dialect(self) -> Dialect:
        raise RuntimeError("this write was made in one statement")

    async def execute(self, statement: Executable, parameters: Any = None) -> Any:
        raise RuntimeError("this write was made in one statement; its block must not run statements")

    scalar = scalars = execute


def _created_organization(changes: list[Change]) -> str | None:
    """The organization a write without one creates, if it does."""
    return next((change.resource.id for change in changes if isinstance(change.resource, Organization)), None)


# How long connecting to PostgreSQL, or waiting for a pooled connection, may take before the call
# is UNAVAILABLE: long enough for a busy server, short enough that an outage answers well within a
# client's usual deadline instead of hanging.
DEFAULT_TIMEOUT_SECONDS = 5.0


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, busy_timeout_ms: int = 10_000) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    # WAL is a property of the file: switch once. Asking again on every connection races with
    # another process's last connection closing (and removing the WAL), a "disk I/O error".
    cursor.execute("PRAGMA journal_mode")
    if str(cursor.fetchone()[0]).lower() != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # An acknowledged write survives power loss too: a revoke that a crash undid would bring a key
    # back. The sync runs at commit, on a worker thread (see inline_sqlite).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


# A pooled PostgreSQL connection idle for longer than this is pinged before use. One in steady
# use is not: SQLAlchemy's pre-ping costs three round trips (BEGIN, a statement, ROLLBACK) on
# every checkout, a third of a write's. A connection that died while in use (a restart) fails
# its call with UNAVAILABLE, and that disconnect retires every connection pooled before it.
PING_AFTER_IDLE_SECONDS = 1.0
_CHECKED_IN = "agentpost_checked_in"


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info[_CHECKED_IN] = time.monotonic()


def _check_on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Replaces (the pool retries) a connection that came back to the pool still inside a
    transaction, or pings one that sat in the pool and replaces it if dead.

    A BEGIN the server cancelled midway (pg_cancel_backend, statement_timeout) can leave the
    server in a failed transaction block while SQLAlchemy's adapter tracks no transaction, so its
    rollback on return does nothing; or leave asyncpg's own bookkeeping holding a transaction that
    never began, so that its next BEGIN becomes a SAVEPOINT. Either way every later statement on
    the connection would fail. Checked without a round trip: the server's transaction status from
    its last message, and asyncpg's `_top_xact` (a private attribute; asyncpg is pinned)."""
    driver = record.driver_connection
    if driver is not None and (driver.is_in_transaction() or getattr(driver, "_top_xact", None) is not None):
        raise DisconnectionError("pooled connection was left inside a transaction")
    checked_in = record.info.get(_CHECKED_IN)
    if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE_SECONDS:
        return  # just connected, or in use moments ago
    try:
        dbapi_connection.ping()
    except Exception as error:
        raise DisconnectionError(f"pooled connection did not answer: {error}") from error


def build_engine(
    url: str | URL, *, schema: str | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> AsyncEngine:
    """An async engine for `sqlite+aiosqlite://` or `postgresql+asyncpg://` URLs.

    `schema` puts every table of a PostgreSQL database in that schema (used to isolate test runs).
    `timeout` bounds a PostgreSQL connect and the wait for a pooled connection.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(parsed, pool_pre_ping=False)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {"timeout": timeout}
    if schema:
        connect_args["server_settings"] = {"search_path": schema}
    engine = create_async_engine(
        parsed,
        pool_size=10,
        max_overflow=10,
        pool_timeout=timeout,
        connect_args=connect_args,
    )
    event.listen(engine.sync_engine.pool, "checkin", _note_checkin)
    event.listen(engine.sync_engine.pool, "checkout", _check_on_checkout)
    return engine


@asynccontextmanager
async def _connected(engine: AsyncEngine) -> AsyncIterator[Statements]:
    """A pooled connection for reads (PostgreSQL)."""
    async with engine.connect() as connection:
        yield PostgresStatements(connection)


@asynccontextmanager
async def _in_transaction(engine: AsyncEngine, ending: Callable[[], None]) -> AsyncIterator[Statements]:
    """A pooled connection in a transaction, committed when the block ends (PostgreSQL);
    `ending()` is called once the block is done, just before the commit or rollback."""
    async with engine.connect() as connection, connection.begin():
        try:
            yield PostgresStatements(connection)
        finally:
            ending()


@asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """Re-raises driver errors as the domain errors they mean, including those raised while
    connecting (refused, timed out, server starting or shutting down), which no SQLAlchemy
    wrapper covers. Anything else, a fault of the service itself, goes on unchanged."""
    try:
        yield
    except DomainError:
        raise
    except Exception as error:
        meaning = translate(error)
        if meaning is None:
            raise
        log.debug("storage error translated: %s: %s", type(error).__name__, error)
        raise meaning from error


def _nothing() -> None:
    """A transaction's end that lets no writer go (it was let go before, or none waits)."""


class _WriteQueue:
    """One organization's writers in this process (on SQLite, every writer), in turn.

    A writer holds its turn from before it takes a connection until its work is done. On SQLite
    it lets go after the commit (SQLite's one write lock is held until then). On PostgreSQL it
    lets go as the COMMIT is sent, if the pool has a connection to spare: the next writer takes
    it and begins meanwhile, then waits in its first statement for the revision row lock, which
    that commit releases. So its revision still follows the committed one, and only the work
    around the lock overlaps.

    Listeners hear each organization's writes in revision order: a writer whose commit came
    back tells them once the one before it has.
    """

    __slots__ = ("__weakref__", "_last", "_lock", "waiting")

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._last: asyncio.Future[None] | None = None
        self.waiting = 0  # writers waiting for their turn (on SQLite, they share a commit)

    async def take(self) -> _Turn:
        """Waits for this writer's turn."""
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        before, self._last = self._last, asyncio.get_running_loop().create_future()
        return _Turn(self, before, self._last)


class _Turn:
    """One writer's turn in its `_WriteQueue` (which it keeps alive while it lasts)."""

    __slots__ = ("_before", "_holding", "_queue", "_told")

    def __init__(
        self, queue: _WriteQueue, before: asyncio.Future[None] | None, told: asyncio.Future[None]
    ) -> None:
        self._queue = queue
        self._holding = True
        self._before = before
        self._told = told

    def let_go(self) -> None:
        """Lets the next writer in (once; later calls do nothing)."""
        if self._holding:
            self._holding = False
            self._queue._lock.release()

    async def after_the_one_before(self) -> None:
        """Returns once the writer before this one has ended (told its listeners, or failed)."""
        if self._before is not None and not self._before.done():
            # Not `await`: a cancelled wait would cancel the future that the next writer awaits.
            await asyncio.wait((self._before,))

    def end(self) -> None:
        """This writer is done: lets the next one in if it has not, and tells the one after."""
        self.let_go()
        if not self._told.done():
            self._told.set_result(None)


class Database:
    """Sessions for reads and for organization-scoped writes."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        sqlite = engine.dialect.name == "sqlite"
        self._inline = InlineSQLite(engine.url, _sqlite_pragmas) if sqlite else None
        self._listeners: list[CommitListener] = []
        self._notify = engine.dialect.name == "postgresql"
        # Where this process's writers queue (see _write_queue): SQLite's one lock for all, or
        # one per organization on PostgreSQL, dropped with the last writer waiting on it.
        self._sqlite_writers = _WriteQueue() if sqlite else None
        self._organization_writers: weakref.WeakValueDictionary[str, _WriteQueue] = (
            weakref.WeakValueDictionary()
        )
        # (organization, revision) of each write in progress here that raised a revision, until
        # its listeners have run (see `committing`). Counted: a writer let in while the one
        # before it commits raises the same revision again if that commit fails, and the failed
        # one's end must not strike it off.
        self._committing: collections.Counter[tuple[str, int]] = collections.Counter()
        # Organizations with a write in one statement in flight here, its revision not known
        # yet (see `_write_alone`): at most one each, as it holds the organization's turn.
        self._alone_in_flight: set[str] = set()
        self._committed_writes = 0
        # (reason, message) while the schema is not known to be the one this code needs (start-up
        # found it behind, or could not tell): every unit of work is refused with it.
        self.closed_because: tuple[str, str] | None = None

    @property
    def read_pool(self) -> Pool:
        """The connection pool reads (and on PostgreSQL, writes) take their connections from."""
        return self._inline.reader.pool if self._inline else self.engine.sync_engine.pool

    @property
    def engines(self) -> tuple[Engine, ...]:
        """Every engine statements run on (the synchronous side of the async one): on SQLite
        also those of reads and writes."""
        if self._inline is None:
            return (self.engine.sync_engine,)
        return (self.engine.sync_engine, self._inline.reader, self._inline.writer)

    def _reading(self) -> contextlib.AbstractAsyncContextManager[Statements]:
        return self._inline.reading() if self._inline else _connected(self.engine)

    def _writing(self, turn: _Turn | None) -> contextlib.AbstractAsyncContextManager[Statements]:
        """A write transaction of the writer holding `turn` (see `write`)."""
        if self._inline is not None and self._sqlite_writers is not None and turn is not None:
            return self._inline.writing(self._sqlite_writers, turn)
        return _in_transaction(self.engine, self._ending(turn))

    def _write_queue(self, organization_id: str | None) -> _WriteQueue | None:
        """Where a writer waits its turn in this process, before taking a connection.

        SQLite lets one transaction write at a time, and a writer that finds the file locked
        sleeps in growing steps (up to 100 ms): under concurrent writes that, not the work, made
        the latency; one queue hands the lock over at once. On PostgreSQL, writers of one
        organization would wait for its revision row lock anyway; waiting in the database held a
        pooled connection each and handed the lock over through PostgreSQL's lock queue; only the
        next writer does, while the one before it commits (see `_WriteQueue`). Writes of
        different organizations (and creating one) run in parallel there."""
        if self._sqlite_writers is not None:
            return self._sqlite_writers
        if organization_id is None:
            return None
        queue = self._organization_writers.get(organization_id)
        if queue is None:
            queue = self._organization_writers[organization_id] = _WriteQueue()
        return queue

    def _ending(self, turn: _Turn | None) -> Callable[[], None]:
        """What a PostgreSQL write calls as its COMMIT is sent: lets the organization's next
        writer begin meanwhile, if the pool has a connection to spare for it. Otherwise the next
        writer goes after the commit (as on SQLite), so that a busy pool's connections serve
        other organizations rather than wait for a row lock."""
        pool = self.engine.sync_engine.pool
        if turn is None or not isinstance(pool, QueuePool):
            return _nothing

        def ending() -> None:
            if pool.checkedout() < pool.size():
                turn.let_go()

        return ending

    def commit_counts(self) -> CommitCounts:
        """How many write transactions this process committed, and the writes they held."""
        writes = self._committed_writes
        return CommitCounts(self._inline.commits if self._inline is not None else writes, writes)

    def on_commit(self, listener: CommitListener) -> None:
        """Calls `listener(organization_id, revision, events)` after each committed write."""
        self._listeners.append(listener)

    def _require_schema(self) -> None:
        if self.closed_because is not None:
            reason, message = self.closed_because
            raise Unavailable(message, reason=reason)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[UnitOfWork]:
        """A unit of work for reading; nothing it does is committed."""
        self._require_schema()
        async with translated_errors(), self._reading() as connection:
            yield UnitOfWork(connection)

    @asynccontextmanager
    async def write(
        self,
        organization_id: str | None,
        actor: Actor | None = None,
        *,
        require_schema: bool = True,
        announced: Sequence[Change] = (),
    ) -> AsyncIterator[UnitOfWork]:
        """One transaction of one organization's writes, by `actor`.

        The organization's revision is raised first: that row lock orders the organization's
        writes, so revisions are gapless and in commit order. What the use case recorded in the
        unit of work is appended to the event log under that revision, in the same transaction;
        on PostgreSQL a NOTIFY (delivered at commit) tells other replicas. After commit the
        revision is set in `committed_revision` for the call's answer and listeners (this
        replica's cache) get the events. `None` is for creating an organization: its revision
        is raised once its row exists. `require_schema=False` is for start-up work done once
        the schema was found current.

        `announced` are changes known before the write begins (a create's record): their
        events are appended with the revision, before the block runs (on PostgreSQL in the same
        statement); the block records only the others. On PostgreSQL a write whose one announced
        change is a created environment or a registered resource is made whole, record included,
        in one statement before the block runs (see `_write_alone`): the record is then in
        `uow.stored_with_revision`, and the block must not run statements.
        """
        if require_schema:
            self._require_schema()
        actor = actor or Actor()
        queue = self._write_queue(organization_id)
        turn = await queue.take() if queue is not None else None
        written = _Written()
        try:
            alone = _alone(announced[0]) if self._notify and len(announced) == 1 else None
            if (
                organization_id is not None
                and alone is not None
                and await self._write_alone(organization_id, actor, announced[0], alone, written)
            ):
                uow = UnitOfWork(_Committed(), organization_id)
                uow.stored_with_revision.append(announced[0].resource)
                yield uow
                if uow.changes:
                    raise RuntimeError("a write made in one statement recorded more changes")
            else:
                async with self._transaction(organization_id, actor, announced, turn, written) as uow:
                    yield uow
            self._committed_writes += 1
            if turn is not None:
                turn.let_go()
                # Even a write that tells no listener: the next writer's wait for it covers those
                # before it (on SQLite, writers of a group wake together).
                await turn.after_the_one_before()
            if written.organization_id is None:
                return
            committed_revision.set(written.revision)
            for listener in self._listeners:
                listener(written.organization_id, written.revision, written.events)
        finally:
            if turn is not None:
                turn.end()
            raised = written.raised
            if raised is not None:
                self._committing[raised] -= 1
                if self._committing[raised] <= 0:
                    del self._committing[raised]

    def _raised(self, written: _Written, organization_id: str, revision: int, events: list[Event]) -> None:
        """Notes the revision a write raised the organization to: it is committing (see
        `committing`) until its listeners have run."""
        written.organization_id, written.revision, written.events = organization_id, revision, events
        self._committing[organization_id, revision] += 1

    @asynccontextmanager
    async def _transaction(
        self,
        organization_id: str | None,
        actor: Actor,
        announced: Sequence[Change],
        turn: _Turn | None,
        written: _Written,
    ) -> AsyncIterator[UnitOfWork]:
        """The write's transaction (see `write`), committed when the block ends; fills `written`."""
        async with translated_errors(), self._writing(turn) as connection:
            uow = UnitOfWork(connection, organization_id)
            if organization_id is not None:
                self._raised(
                    written,
                    organization_id,
                    *await self._raise_announcing(uow, organization_id, announced, actor),
                )
            else:
                uow.changes.extend(announced)
            yield uow
            owner = organization_id or _created_organization(uow.changes)
            if owner is None:
                return
            if organization_id is None:
                self._raised(written, owner, await self._raise_revision(connection, owner), [])
            if uow.changes:
                recorded = new_events(
                    owner, written.revision, utcnow(), actor, current_request_id.get(), uow.changes
                )
                await uow.events.append(recorded, start=len(written.events))
                written.events += recorded

    async def _write_alone(
        self, organization_id: str, actor: Actor, change: Change, alone: _Alone, written: _Written
    ) -> bool:
        """Makes the write of `change` in one statement, committed on its own (PostgreSQL): the
        revision, its event, the record's row and the NOTIFY. The organization's turn then lasts
        one round trip. False when it stored nothing because the resource's environment is no
        longer active; the write is then made in a transaction, which says so."""
        (event,) = new_events(organization_id, 0, utcnow(), actor, current_request_id.get(), [change])
        values = self._announcing(organization_id, event)
        values.update({f"row_{name}": value for name, value in alone.row.items()})
        self._alone_in_flight.add(organization_id)
        try:
            async with translated_errors(), _connected(self.engine) as connection:
                revision = int(await connection.scalar(alone.statement, values) or 0)
            self._raised(written, organization_id, revision, [dataclasses.replace(event, revision=revision)])
            return True
        except Exception as error:
            if has_sqlstate(error, _SQLSTATE_DIVISION_BY_ZERO):
                return False
            raise
        finally:
            self._alone_in_flight.discard(organization_id)

    def committing(self, organization_id: str, revision: int) -> bool:
        """Whether a write in progress in this process raised the organization to `revision`:
        it commits, then tells the listeners (after the write before it, if that one has not
        yet). A write in one statement commits before it knows its revision: while one is in
        flight, any revision of its organization may be its own."""
        return (organization_id, revision) in self._committing or organization_id in self._alone_in_flight

    async def _raise_revision(self, connection: Statements, organization_id: str) -> int:
        """Raises the organization's revision (taking its row lock) and, on PostgreSQL, queues
        the NOTIFY of the new revision in the same statement."""
        statement = _RAISE_REVISION_AND_NOTIFY if self._notify else _RAISE_REVISION
        raised = await connection.scalar(statement, {"organization_id": organization_id})
        return int(raised or 0)

    @staticmethod
    def _announcing(organization_id: str, event: Event) -> dict[str, Any]:
        """The values of a statement that raises the organization's revision and appends
        `event` under it (its revision is the raised one)."""
        # Prefixed: the names of the organization's own columns must not name the event's values.
        values = {f"event_{name}": value for name, value in event_row(event, 0).items()}
        values["organization_id"] = organization_id
        return values

    async def _raise_announcing(
        self, uow: UnitOfWork, organization_id: str, announced: Sequence[Change], actor: Actor
    ) -> tuple[int, list[Event]]:
        """`_raise_revision`, then the events of the `announced` changes; on PostgreSQL the event
        of one change goes in the same statement. Returns the revision and those events."""
        if not announced:
            return await self._raise_revision(uow.statements, organization_id), []
        now, request_id = utcnow(), current_request_id.get()
        if not self._notify or len(announced) > 1:
            revision = await self._raise_revision(uow.statements, organization_id)
            events = new_events(organization_id, revision, now, actor, request_id, announced)
            await uow.events.append(events)
            return revision, events
        (event,) = new_events(organization_id, 0, now, actor, request_id, announced)
        statement = _RAISE_REVISION_APPEND_AND_NOTIFY
        revision = int(await uow.statements.scalar(statement, self._announcing(organization_id, event)) or 0)
        return revision, [dataclasses.replace(event, revision=revision)]

    async def ping(self) -> None:
        """One round trip to the database; `Unavailable` when it does not answer."""
        async with translated_errors(), self._reading() as connection:
            await connection.execute(text("SELECT 1"))

    @property
    def notifies(self) -> bool:
        """Whether commits are announced to other replicas (PostgreSQL); else they poll."""
        return self._notify

    async def follow_commits(
        self, on_revision: OnRevision, on_connected: OnConnected, connect_seconds: float
    ) -> None:
        """Hears every replica's commits until cancelled (PostgreSQL only; see notifications)."""
        await listen_for_revisions(
            self.engine.url, on_revision, on_connected, connect_seconds=connect_seconds
        )

    async def dispose(self) -> None:
        """Closes every pooled connection."""
        if self._inline is not None:
            self._inline.dispose()
        await self.engine.dispose()
