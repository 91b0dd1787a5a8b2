"""Environments in storage."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, bindparam, insert, select, update

from service.domain.models import Environment
from service.storage.prepared import prepared
from service.storage.statements import Statements
from service.storage.tables import ENVIRONMENTS, EnvironmentRow

# Built once: every write into an environment re-reads it (see tables.table_of).
_INSERT = prepared(insert(ENVIRONMENTS))
# One environment of one organization. The names differ from the columns': an UPDATE takes
# parameters named after its columns as the values to set.
_THE_ENVIRONMENT = (
    ENVIRONMENTS.c.id == bindparam("environment_id"),
    ENVIRONMENTS.c.organization_id == bindparam("environment_organization_id"),
)
_GET = prepared(select(ENVIRONMENTS).where(*_THE_ENVIRONMENT))
# Only what a write re-checks inside its transaction: whether the environment is deleted.
_DELETE_TIME = prepared(_GET.with_only_columns(ENVIRONMENTS.c.delete_time))
# The mutable fields are the parameters named after their columns (see `save`).
_UPDATE = prepared(update(ENVIRONMENTS).where(*_THE_ENVIRONMENT))


def _the_environment(organization_id: str, environment_id: str) -> dict[str, str]:
    """The parameters naming one environment in `_GET`, `_DELETE_TIME` and `_UPDATE`."""
    return {"environment_id": environment_id, "environment_organization_id": organization_id}


def to_environment(row: EnvironmentRow | Row[Any]) -> Environment:
    """The domain record of a row."""
    return Environment(
        id=row.id,
        organization_id=row.organization_id,
        name=row.name,
        slug=row.slug,
        description=row.description,
        is_default=row.is_default,
        create_time=row.create_time,
        update_time=row.update_time,
        delete_time=row.delete_time,
        version=row.version,
    )


def environment_row(env: Environment) -> dict[str, Any]:
    """The row of a new environment, for Core inserts (one, or many at once in bulk loads)."""
    return {
        "id": env.id,
        "organization_id": env.organization_id,
        "name": env.name,
        "slug": env.slug,
        "description": env.description,
        "is_default": env.is_default,
        "create_time": env.create_time,
        "update_time": env.update_time,
        "delete_time": env.delete_time,
        "version": env.version,
    }


class EnvironmentRepository:
    """Reads and writes environments."""

    def __init__(self, connection: Statements) -> None:
        self._connection = connection

    async def insert(self, env: Environment) -> None:
        """Stores a new environment; a taken slug raises AlreadyExists(SLUG_TAKEN)."""
        await self._connection.execute(_INSERT, environment_row(env))

    async def get(self, organization_id: str, environment_id: str) -> Environment | None:
        """One environment of the organization, deleted or not."""
        found = await self._connection.execute(_GET, _the_environment(organization_id, environment_id))
        row = found.first()
        return None if row is None else to_environment(row)

    async def is_deleted(self, organization_id: str, environment_id: str) -> bool | None:
        """Whether the organization's environment is deleted; None when there is no such one."""
        found = await self._connection.execute(
            _DELETE_TIME, _the_environment(organization_id, environment_id)
        )
        row = found.first()
        return None if row is None else row.delete_time is not None

    async def save(self, env: Environment) -> None:
        """Writes the mutable fields of an existing environment."""
        await self._connection.execute(
            _UPDATE,
            _the_environment(env.organization_id, env.id)
            | {
                "name": env.name,
                "description": env.description,
                "update_time": env.update_time,
                "delete_time": env.delete_time,
                "version": env.version,
            },
        )

    async def all_of(self, organization_id: str) -> list[Environment]:
        """Every environment of the organization, deleted ones included."""
        rows = await self._connection.execute(
            select(ENVIRONMENTS).where(EnvironmentRow.organization_id == organization_id)
        )
        return [to_environment(row) for row in rows]
