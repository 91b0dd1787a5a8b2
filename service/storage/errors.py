"""Driver errors become domain errors here, and only here, for aiosqlite and asyncpg alike.

A database that cannot be reached is `Unavailable` (DATABASE_UNAVAILABLE) however the failure
shows itself: SQLAlchemy wraps errors raised on a live connection, but a refused or timed-out
connect surfaces as a bare `OSError`/`TimeoutError`, and a server that is starting or shutting
down refuses the connect with asyncpg's own exception, neither wrapped.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterator

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.domain.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
)
from service.storage.tables import Base

log = logging.getLogger(__name__)

# What each unique constraint means to a client.
_UNIQUE_MEANINGS: dict[str, Callable[[], DomainError]] = {
    "uq_environments_organization_id_slug": lambda: AlreadyExists(
        "an environment of this organization already uses that slug (deleted ones included)",
        reason="SLUG_TAKEN",
    ),
    "uq_members_organization_id_email_key": lambda: AlreadyExists(
        "a member of this organization already has that email", reason="EMAIL_TAKEN"
    ),
    "pk_environment_members": lambda: AlreadyExists(
        "the member already has access to that environment", reason="ENVIRONMENT_MEMBER_EXISTS"
    ),
    "pk_resources": lambda: AlreadyExists(
        "a resource of that kind and id is already registered in this organization",
        reason="RESOURCE_EXISTS",
    ),
    "pk_request_ids": lambda: AlreadyExists(
        "a request with that request_id was already made", reason="DUPLICATE_REQUEST"
    ),
}


def _sqlite_column_lists() -> dict[str, str]:
    """SQLite names the columns, not the constraint: map `t.a, t.b` to the constraint's name."""
    names: dict[str, str] = {}
    for table in Base.metadata.tables.values():
        for constraint in table.constraints:
            columns = getattr(constraint, "columns", None)
            if constraint.name and columns is not None and len(columns) > 0:
                key = ", ".join(f"{table.name}.{column.name}" for column in columns)
                names[key] = str(constraint.name)
    return names


_SQLITE_COLUMNS = _sqlite_column_lists()
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: (.+)$")
_SQLSTATE_UNIQUE = "23505"
_SQLSTATE_FOREIGN_KEY = "23503"
_RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03", "57014"}
# Class 08 (connection exception), 53300 (too many connections), 57P01..57P05 (admin shutdown,
# crash shutdown, cannot connect now, database dropped, idle session timeout), 25P03 (a session
# idle in a transaction past idle_in_transaction_session_timeout): the server is not there to
# answer, or has ended the session. asyncpg's own exceptions carry their SQLSTATE too, so those
# raised outside SQLAlchemy's wrapping (while connecting, once a connection died) match as well.
_UNREACHABLE_SQLSTATE_PREFIXES = ("08", "53300", "57P01", "57P02", "57P03", "57P04", "57P05", "25P03")
_CLOSED_CONNECTION = re.compile(r"connection (is|was) closed|connection_lost", re.IGNORECASE)
# A session the server ended while it sat idle in the pool: the server's FATAL error arrived
# outside any operation, so asyncpg's protocol discards input until a sync that never comes
# (state 2, "error consume"), and the next statement is refused before the closed socket is
# noticed. No caller was waiting on it, so it is not two callers on one connection.
_ENDED_WHILE_IDLE = re.compile(r"another operation \(2\) is in progress")


def _constraint_name(error: IntegrityError) -> str | None:
    original = error.orig
    # asyncpg's own exception (with the constraint's name) hides behind SQLAlchemy's adapter.
    for candidate in (original, getattr(original, "__cause__", None)):
        name = getattr(candidate, "constraint_name", None)
        if name:
            return str(name)
    match = _SQLITE_UNIQUE.search(str(original))
    if match:
        return _SQLITE_COLUMNS.get(match.group(1).strip())
    return None


def _sqlstate(error: DBAPIError) -> str | None:
    original = error.orig
    state = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    return str(state) if state else None


_SQLSTATE_DISK_FULL = "53100"
# A full disk is logged at most this often: every write fails while it lasts.
_FULL_LOG_SECONDS = 60.0
_full_logged_at = -_FULL_LOG_SECONDS


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, then the driver errors SQLAlchemy (or a driver) wrapped in it, innermost last."""
    seen: set[int] = set()
    candidate: BaseException | None = error
    while candidate is not None and id(candidate) not in seen:
        seen.add(id(candidate))
        yield candidate
        candidate = getattr(candidate, "orig", None) or candidate.__cause__


def has_sqlstate(error: BaseException, state: str) -> bool:
    """Whether `error`, or a driver error wrapped in it, carries PostgreSQL's SQLSTATE `state`."""
    return any(getattr(candidate, "sqlstate", None) == state for candidate in _causes(error))


def _storage_full(error: BaseException) -> bool:
    """True when the database has no space left to write: SQLite's SQLITE_FULL (the disk, or
    the file's page limit) or PostgreSQL's disk_full."""
    return has_sqlstate(error, _SQLSTATE_DISK_FULL) or any(
        getattr(candidate, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL for candidate in _causes(error)
    )


def database_full(error: BaseException) -> ResourceExhausted:
    """What a write meets while the database's storage is full (gRPC's own meaning of
    RESOURCE_EXHAUSTED): nothing of it was written; reads go on. Logged for the operator."""
    global _full_logged_at
    now = time.monotonic()
    if now - _full_logged_at >= _FULL_LOG_SECONDS:
        _full_logged_at = now
        # The driver's own error only: SQLAlchemy's would carry the statement.
        driver = list(_causes(error))[-1]
        log.error("the database has no space left: writes are refused until space is freed (%r)", driver)
    return ResourceExhausted(
        "the database has no space left; nothing was written: retry once space is freed",
        reason="DATABASE_FULL",
    )


def unreachable(error: BaseException) -> bool:
    """True when `error` (or the driver error SQLAlchemy wrapped in it) says the database is gone."""
    for candidate in _causes(error):
        # A refused or reset connection, or asyncio's time-out on connect (TimeoutError is an OSError).
        if isinstance(candidate, OSError):
            return True
        if isinstance(candidate, asyncpg.InterfaceError) and _CLOSED_CONNECTION.search(str(candidate)):
            return True
        if isinstance(candidate, asyncpg.exceptions.InternalClientError) and _ENDED_WHILE_IDLE.search(
            str(candidate)
        ):
            return True
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str) and state.startswith(_UNREACHABLE_SQLSTATE_PREFIXES):
            return True
    return False


def database_unavailable(what: str = "the database is unreachable") -> Unavailable:
    """The one error every caller sees while the database cannot be reached."""
    return Unavailable(f"{what}; retry later", reason="DATABASE_UNAVAILABLE")


# What the database URL or schema setting names does not exist on the PostgreSQL server: no retry
# helps, the operator must fix the setting (or create what it names).
_SQLSTATE_NOT_THERE = {
    "3D000": "the database the database URL names does not exist",
    "3F000": "the schema the database schema setting names does not exist",
}


def _not_there(error: BaseException) -> Unavailable | None:
    for candidate in _causes(error):
        what = _SQLSTATE_NOT_THERE.get(getattr(candidate, "sqlstate", None) or "")
        if what is not None:
            return Unavailable(f"{what}: create it or fix the setting", reason="DATABASE_UNAVAILABLE")
    return None


def translate(error: BaseException) -> DomainError | None:
    """The domain error a driver error means, or None for a fault of the service itself."""
    if isinstance(error, DomainError):
        return error
    if isinstance(error, PoolTimeout):
        return database_unavailable("no database connection became free in time")
    if isinstance(error, IntegrityError):
        meaning = _UNIQUE_MEANINGS.get(_constraint_name(error) or "")
        if meaning is not None:
            return meaning()
        text = str(error.orig)
        if _sqlstate(error) == _SQLSTATE_FOREIGN_KEY or "FOREIGN KEY" in text:
            return FailedPrecondition(
                "a referenced record was removed concurrently; retry", reason="CONCURRENT_CHANGE"
            )
        if _sqlstate(error) == _SQLSTATE_UNIQUE or "UNIQUE" in text:
            return AlreadyExists("the record already exists")
        return None
    if _storage_full(error):
        return database_full(error)
    missing = _not_there(error)
    if missing is not None:
        return missing
    if unreachable(error):
        return database_unavailable()
    # A retryable SQLSTATE, wrapped by SQLAlchemy or not: a BEGIN cancelled in SQLAlchemy's
    # asyncpg adapter surfaces as the adapter's own error.
    if isinstance(error, OperationalError) or any(
        getattr(candidate, "sqlstate", None) in _RETRYABLE_SQLSTATES for candidate in _causes(error)
    ):
        return database_unavailable("the database is busy or unreachable")
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return database_unavailable("the database connection was lost")
    return None
