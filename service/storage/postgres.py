"""PostgreSQL's statements: SQLAlchemy's `AsyncConnection`, with prepared statements (see
`storage.prepared`) run on its asyncpg connection directly.

Both run on the same pooled connection and in the same transaction. SQLAlchemy's asyncpg adapter
begins a transaction lazily, at its first statement; before a prepared statement runs inside a
unit of work that is in a transaction, it is begun the same way, so that SQLAlchemy's commit or
rollback at the end of the block ends it, whichever kind of statement came first. Reads outside a
transaction run on their own, as single statements do in PostgreSQL (READ COMMITTED gives each
statement its own snapshot inside a transaction too), which saves a read its BEGIN and ROLLBACK.

This touches two private parts of SQLAlchemy's asyncpg adapter (`_transaction`,
`_start_transaction`) and of its pool (`_invalidate`, what SQLAlchemy itself calls on a
disconnect): SQLAlchemy is pinned to one release, and the suite runs every unit of work on
PostgreSQL, a disconnect in steady use included (test_outage).
"""

from __future__ import annotations

from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import CursorResult, ScalarResult
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.base import Executable
from sqlalchemy.util.typing import TupleAny

from service.storage import prepared
from service.storage.errors import unreachable

_INTEGRITY_CLASS = "23"  # SQLSTATE class of integrity constraint violations


def _wrapped(sql: str, arguments: tuple[Any, ...], error: asyncpg.PostgresError) -> DBAPIError:
    """The server's error, wrapped as SQLAlchemy wraps it (storage.errors reads those)."""
    kind = IntegrityError if str(getattr(error, "sqlstate", "")).startswith(_INTEGRITY_CLASS) else DBAPIError
    # The values stay out of the message (a digest, an email): the statement says enough.
    return kind(sql, arguments, error, hide_parameters=True)


class PostgresStatements:
    """A unit of work's connection on PostgreSQL (see the module)."""

    __slots__ = ("_adapted", "_connection", "_driver", "_pooled")

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection
        self._pooled: PoolProxiedConnection | None = None
        self._adapted: Any = None
        self._driver: Any = None

    @property
    def dialect(self) -> Dialect:
        return self._connection.dialect

    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[*TupleAny]:
        if not prepared.is_prepared(statement):
            return await self._connection.execute(statement, parameters)
        return (await self._run(statement, parameters)).as_cursor_result()

    async def scalar(self, statement: Executable, parameters: Any = None) -> Any:
        if not prepared.is_prepared(statement):
            return await self._connection.scalar(statement, parameters)
        return (await self._run(statement, parameters)).scalar()

    async def scalars(self, statement: Executable, parameters: Any = None) -> ScalarResult[Any]:
        if not prepared.is_prepared(statement):
            return await self._connection.scalars(statement, parameters)
        return (await self._run(statement, parameters)).as_scalar_result()

    async def _ready(self) -> Any:
        """The asyncpg connection, in the unit of work's transaction if it has one."""
        if self._driver is None:
            self._pooled = await self._connection.get_raw_connection()
            self._adapted = self._pooled.dbapi_connection
            self._driver = self._pooled.driver_connection
        if self._adapted._transaction is None and self._connection.in_transaction():
            await self._adapted._start_transaction()
        return self._driver

    async def _run(self, statement: Executable, parameters: Any) -> prepared.Rows:
        run = prepared.run(statement, self._connection.dialect, parameters)
        if run is None:
            return prepared.Rows([])
        plan = run.plan
        connection = self._connection.sync_connection
        assert connection is not None  # set once connected
        try:
            driver = await self._ready()
            with run.observed(connection):
                if run.many and not plan.returns_rows:
                    await driver.executemany(plan.sql, run.arguments)
                    return prepared.Rows([])
                fetched: list[Any] = []
                for values in run.arguments:
                    fetched.extend(await driver.fetch(plan.sql, *values))
                return prepared.Rows(plan.rows(fetched))
        except Exception as error:
            if unreachable(error):
                await self._retire(error, everywhere=True)
            if isinstance(error, asyncpg.PostgresError):
                raise _wrapped(plan.sql, run.arguments[0], error) from error
            raise
        except BaseException:
            # Cancelled (the caller gave up) mid-statement: what the connection is in the middle
            # of is unknown, so it is dropped, as SQLAlchemy drops it. Were it pooled again, a
            # transaction left open on it would be committed by the next write that took it.
            await self._retire(None, everywhere=False)
            raise

    async def _retire(self, error: Exception | None, *, everywhere: bool) -> None:
        """Drops this connection; `everywhere`, as SQLAlchemy does on a disconnect, also every
        one pooled before it, replaced at its next checkout (they went the same way, as in a
        restart)."""
        if everywhere and self._pooled is not None:
            self._connection.sync_engine.pool._invalidate(self._pooled, error, _checkin=False)
        if not self._connection.invalidated:
            await self._connection.invalidate(error)
