"""Organizations in storage."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, bindparam, insert, select

from service.domain.models import Organization
from service.storage.statements import Statements
from service.storage.tables import ORGANIZATIONS, OrganizationRow

# Built once: every replica polls it several times a second (see access.AccessCache.refresh).
_REVISIONS = select(ORGANIZATIONS.c.id, ORGANIZATIONS.c.revision).where(
    ORGANIZATIONS.c.id.in_(bindparam("organization_ids", expanding=True))
)


def to_organization(row: OrganizationRow | Row[Any]) -> Organization:
    """The domain record of a row."""
    return Organization(id=row.id, name=row.name, create_time=row.create_time)


class OrganizationRepository:
    """Reads and writes organizations."""

    def __init__(self, connection: Statements) -> None:
        self._connection = connection

    async def insert(self, organization: Organization) -> None:
        """Stores a new organization."""
        await self._connection.execute(
            insert(ORGANIZATIONS),
            {
                "id": organization.id,
                "name": organization.name,
                "revision": 0,
                "create_time": organization.create_time,
            },
        )

    async def get(self, organization_id: str) -> Organization | None:
        """One organization, or None."""
        found = await self._connection.execute(
            select(ORGANIZATIONS).where(ORGANIZATIONS.c.id == organization_id)
        )
        row = found.first()
        return None if row is None else to_organization(row)

    async def any_exists(self) -> bool:
        """True when the database holds at least one organization."""
        return (await self._connection.scalar(select(OrganizationRow.id).limit(1))) is not None

    async def revisions(self, organization_ids: list[str]) -> dict[str, int]:
        """The current revision of each of these organizations."""
        rows = await self._connection.execute(_REVISIONS, {"organization_ids": organization_ids})
        return {row.id: row.revision for row in rows}
