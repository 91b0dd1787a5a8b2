"""Organizations in storage."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.domain.models import Organization
from service.storage.tables import OrganizationRow


def to_organization(row: OrganizationRow) -> Organization:
    """The domain record of a row."""
    return Organization(id=row.id, name=row.name, create_time=row.create_time)


class OrganizationRepository:
    """Reads and writes organizations."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def insert(self, organization: Organization) -> None:
        """Stores a new organization."""
        self._session.add(
            OrganizationRow(
                id=organization.id, name=organization.name, revision=0, create_time=organization.create_time
            )
        )
        await self._session.flush()

    async def get(self, organization_id: str) -> Organization | None:
        """One organization, or None."""
        row = await self._session.get(OrganizationRow, organization_id)
        return None if row is None else to_organization(row)

    async def any_exists(self) -> bool:
        """True when the database holds at least one organization."""
        return (await self._session.scalar(select(OrganizationRow.id).limit(1))) is not None

    async def revisions(self, organization_ids: list[str]) -> dict[str, int]:
        """The current revision of each of these organizations."""
        rows = await self._session.execute(
            select(OrganizationRow.id, OrganizationRow.revision).where(
                OrganizationRow.id.in_(organization_ids)
            )
        )
        return {row.id: row.revision for row in rows}
