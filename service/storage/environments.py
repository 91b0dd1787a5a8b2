"""Environments in storage."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.domain.models import Environment
from service.storage.tables import EnvironmentRow


def to_environment(row: EnvironmentRow) -> Environment:
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


class EnvironmentRepository:
    """Reads and writes environments."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def insert(self, env: Environment) -> None:
        """Stores a new environment; a taken slug raises AlreadyExists(SLUG_TAKEN)."""
        self._session.add(
            EnvironmentRow(
                id=env.id,
                organization_id=env.organization_id,
                name=env.name,
                slug=env.slug,
                description=env.description,
                is_default=env.is_default,
                create_time=env.create_time,
                update_time=env.update_time,
                delete_time=env.delete_time,
                version=env.version,
            )
        )
        await self._session.flush()

    async def get(self, organization_id: str, environment_id: str) -> Environment | None:
        """One environment of the organization, deleted or not."""
        row = await self._session.get(EnvironmentRow, environment_id)
        if row is None or row.organization_id != organization_id:
            return None
        return to_environment(row)

    async def save(self, env: Environment) -> None:
        """Writes the mutable fields of an existing environment."""
        row = await self._session.get(EnvironmentRow, env.id)
        assert row is not None and row.organization_id == env.organization_id
        row.name = env.name
        row.description = env.description
        row.update_time = env.update_time
        row.delete_time = env.delete_time
        row.version = env.version
        await self._session.flush()

    async def all_of(self, organization_id: str) -> list[Environment]:
        """Every environment of the organization, deleted ones included."""
        rows = await self._session.scalars(
            select(EnvironmentRow).where(EnvironmentRow.organization_id == organization_id)
        )
        return [to_environment(row) for row in rows]
