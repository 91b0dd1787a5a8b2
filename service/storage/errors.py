"""Driver errors become domain errors here, and only here, for aiosqlite and asyncpg alike."""

from __future__ import annotations

import re
from collections.abc import Callable

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.domain.errors import AlreadyExists, DomainError, FailedPrecondition, Unavailable
from service.storage.tables import Base

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


def translate(error: Exception) -> DomainError | None:
    """The domain error a driver error means, or None for a fault of the service itself."""
    if isinstance(error, PoolTimeout):
        return Unavailable("the database connection pool is exhausted; retry")
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
    if isinstance(error, OperationalError) or (
        isinstance(error, DBAPIError) and _sqlstate(error) in _RETRYABLE_SQLSTATES
    ):
        return Unavailable("the database is busy or unreachable; retry")
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return Unavailable("the database connection was lost; retry")
    return None
