"""The engine, sessions and units of work. Every write names its organization, whose `revision`
it raises first: that row lock orders concurrent writes of one organization, and listeners
(the access cache) learn after commit which organization changed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from service.domain.errors import DomainError, Unavailable
from service.storage.errors import translate
from service.storage.tables import OrganizationRow
from service.storage.unit_of_work import UnitOfWork

log = logging.getLogger(__name__)

CommitListener = Callable[[str], None]

# How long connecting to PostgreSQL, or waiting for a pooled connection, may take before the call
# is UNAVAILABLE: long enough for a busy server, short enough that an outage answers well within a
# client's usual deadline instead of hanging.
DEFAULT_TIMEOUT_SECONDS = 5.0


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


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
    return create_async_engine(
        parsed,
        pool_size=10,
        max_overflow=10,
        pool_timeout=timeout,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


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


class Database:
    """Sessions for reads and for organization-scoped writes."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._listeners: list[CommitListener] = []
        # (reason, message) while the schema is not known to be the one this code needs (start-up
        # found it behind, or could not tell): every unit of work is refused with it.
        self.closed_because: tuple[str, str] | None = None

    def on_commit(self, listener: CommitListener) -> None:
        """Calls `listener(organization_id)` after each committed write of that organization."""
        self._listeners.append(listener)

    def _require_schema(self) -> None:
        if self.closed_because is not None:
            reason, message = self.closed_because
            raise Unavailable(message, reason=reason)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[UnitOfWork]:
        """A unit of work for reading; nothing it does is committed."""
        self._require_schema()
        async with translated_errors(), self._sessions() as session:
            yield UnitOfWork(session)

    @asynccontextmanager
    async def write(
        self, organization_id: str | None, *, require_schema: bool = True
    ) -> AsyncIterator[UnitOfWork]:
        """One transaction. With an organization, its revision is raised first (taking its row
        lock) and listeners are told after commit; None is for creating an organization.
        `require_schema=False` is for start-up work done once the schema was found current."""
        if require_schema:
            self._require_schema()
        async with translated_errors(), self._sessions() as session, session.begin():
            if organization_id is not None:
                await session.execute(
                    update(OrganizationRow)
                    .where(OrganizationRow.id == organization_id)
                    .values(revision=OrganizationRow.revision + 1)
                )
            yield UnitOfWork(session, organization_id)
        if organization_id is not None:
            for listener in self._listeners:
                listener(organization_id)

    async def ping(self) -> None:
        """One round trip to the database; `Unavailable` when it does not answer."""
        async with translated_errors(), self._sessions() as session:
            await session.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        """Closes every pooled connection."""
        await self.engine.dispose()
