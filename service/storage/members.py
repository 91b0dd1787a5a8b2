"""Members and their environment roles in storage."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.domain.models import EnvironmentMembership, EnvRole, Member, OrgRole
from service.storage.tables import EnvironmentMemberRow, MemberRow


def to_member(row: MemberRow) -> Member:
    """The domain record of a row."""
    return Member(
        id=row.id,
        organization_id=row.organization_id,
        email=row.email,
        display_name=row.display_name,
        role=OrgRole(row.role),
        create_time=row.create_time,
        update_time=row.update_time,
        version=row.version,
    )


def to_membership(row: EnvironmentMemberRow) -> EnvironmentMembership:
    """The domain record of a row."""
    return EnvironmentMembership(
        environment_id=row.environment_id,
        member_id=row.member_id,
        role=EnvRole(row.role),
        create_time=row.create_time,
        update_time=row.update_time,
    )


class MemberRepository:
    """Reads and writes members and environment memberships."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def insert(self, member: Member) -> None:
        """Stores a new member; a taken email raises AlreadyExists(EMAIL_TAKEN)."""
        self._session.add(
            MemberRow(
                id=member.id,
                organization_id=member.organization_id,
                email=member.email,
                email_key=member.email.lower(),
                display_name=member.display_name,
                role=member.role.value,
                create_time=member.create_time,
                update_time=member.update_time,
                version=member.version,
            )
        )
        await self._session.flush()

    async def get(self, organization_id: str, member_id: str) -> Member | None:
        """One member of the organization, or None."""
        row = await self._session.get(MemberRow, member_id)
        if row is None or row.organization_id != organization_id:
            return None
        return to_member(row)

    async def roles_of(self, organization_id: str) -> dict[str, OrgRole]:
        """Every member's organization role."""
        rows = await self._session.execute(
            select(MemberRow.id, MemberRow.role).where(MemberRow.organization_id == organization_id)
        )
        return {row.id: OrgRole(row.role) for row in rows}

    async def environment_roles_of(self, organization_id: str) -> dict[str, dict[str, EnvRole]]:
        """member id -> environment id -> role, for the whole organization."""
        rows = await self._session.execute(
            select(
                EnvironmentMemberRow.member_id, EnvironmentMemberRow.environment_id, EnvironmentMemberRow.role
            ).where(EnvironmentMemberRow.organization_id == organization_id)
        )
        roles: dict[str, dict[str, EnvRole]] = {}
        for row in rows:
            roles.setdefault(row.member_id, {})[row.environment_id] = EnvRole(row.role)
        return roles
