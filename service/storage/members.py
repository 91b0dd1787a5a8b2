"""Members and their environment roles in storage."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, delete, func, insert, select, update

from service.domain import validation
from service.domain.models import EnvironmentMembership, EnvRole, Member, OrgRole
from service.storage.statements import Statements
from service.storage.tables import ENVIRONMENT_MEMBERS, MEMBERS, EnvironmentMemberRow, MemberRow


def to_member(row: MemberRow | Row[Any]) -> Member:
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


def to_membership(row: EnvironmentMemberRow | Row[Any]) -> EnvironmentMembership:
    """The domain record of a row."""
    return EnvironmentMembership(
        environment_id=row.environment_id,
        member_id=row.member_id,
        role=EnvRole(row.role),
        create_time=row.create_time,
        update_time=row.update_time,
        version=row.version,
    )


class MemberRepository:
    """Reads and writes members and environment memberships."""

    def __init__(self, connection: Statements) -> None:
        self._connection = connection

    async def insert(self, member: Member) -> None:
        """Stores a new member; a taken email raises AlreadyExists(EMAIL_TAKEN)."""
        await self._connection.execute(
            insert(MEMBERS),
            {
                "id": member.id,
                "organization_id": member.organization_id,
                "email": member.email,
                "email_key": validation.email_key(member.email),
                "display_name": member.display_name,
                "role": member.role.value,
                "create_time": member.create_time,
                "update_time": member.update_time,
                "version": member.version,
            },
        )

    async def get(self, organization_id: str, member_id: str) -> Member | None:
        """One member of the organization, or None."""
        found = await self._connection.execute(
            select(MEMBERS).where(MEMBERS.c.id == member_id, MEMBERS.c.organization_id == organization_id)
        )
        row = found.first()
        return None if row is None else to_member(row)

    async def roles_of(self, organization_id: str) -> dict[str, OrgRole]:
        """Every member's organization role."""
        rows = await self._connection.execute(
            select(MemberRow.id, MemberRow.role).where(MemberRow.organization_id == organization_id)
        )
        return {row.id: OrgRole(row.role) for row in rows}

    async def environment_roles_of(self, organization_id: str) -> dict[str, dict[str, EnvRole]]:
        """member id -> environment id -> role, for the whole organization."""
        rows = await self._connection.execute(
            select(
                EnvironmentMemberRow.member_id, EnvironmentMemberRow.environment_id, EnvironmentMemberRow.role
            ).where(EnvironmentMemberRow.organization_id == organization_id)
        )
        roles: dict[str, dict[str, EnvRole]] = {}
        for row in rows:
            roles.setdefault(row.member_id, {})[row.environment_id] = EnvRole(row.role)
        return roles

    async def page(self, organization_id: str, after: str, limit: int) -> list[Member]:
        """Up to `limit` members of the organization with ids after `after`, ordered by id."""
        rows = await self._connection.execute(
            select(MEMBERS)
            .where(MemberRow.organization_id == organization_id, MemberRow.id > after)
            .order_by(MemberRow.id)
            .limit(limit)
        )
        return [to_member(row) for row in rows]

    async def save(self, member: Member) -> None:
        """Writes the mutable fields of an existing member; the email never changes."""
        await self._connection.execute(
            update(MEMBERS)
            .where(MEMBERS.c.id == member.id, MEMBERS.c.organization_id == member.organization_id)
            .values(
                display_name=member.display_name,
                role=member.role.value,
                update_time=member.update_time,
                version=member.version,
            )
        )

    async def delete(self, organization_id: str, member_id: str) -> list[EnvironmentMembership]:
        """Removes a member and its environment memberships, and returns those memberships. The
        foreign key cascades too; the memberships are deleted explicitly so no backend setting
        can leave them behind."""
        memberships = await self._connection.execute(
            select(ENVIRONMENT_MEMBERS).where(
                EnvironmentMemberRow.organization_id == organization_id,
                EnvironmentMemberRow.member_id == member_id,
            )
        )
        removed = [to_membership(row) for row in memberships]
        await self._connection.execute(
            delete(EnvironmentMemberRow).where(
                EnvironmentMemberRow.organization_id == organization_id,
                EnvironmentMemberRow.member_id == member_id,
            )
        )
        await self._connection.execute(
            delete(MemberRow).where(MemberRow.organization_id == organization_id, MemberRow.id == member_id)
        )
        return removed

    async def count_owners(self, organization_id: str) -> int:
        """How many OWNER members the organization has."""
        count = await self._connection.scalar(
            select(func.count())
            .select_from(MemberRow)
            .where(MemberRow.organization_id == organization_id, MemberRow.role == OrgRole.OWNER.value)
        )
        return int(count or 0)

    async def get_membership(
        self, organization_id: str, environment_id: str, member_id: str
    ) -> EnvironmentMembership | None:
        """A member's access to one environment, or None."""
        found = await self._connection.execute(
            select(ENVIRONMENT_MEMBERS).where(
                ENVIRONMENT_MEMBERS.c.environment_id == environment_id,
                ENVIRONMENT_MEMBERS.c.member_id == member_id,
                ENVIRONMENT_MEMBERS.c.organization_id == organization_id,
            )
        )
        row = found.first()
        return None if row is None else to_membership(row)

    async def insert_membership(self, organization_id: str, membership: EnvironmentMembership) -> None:
        """Stores a new environment membership; an existing pair raises
        AlreadyExists(ENVIRONMENT_MEMBER_EXISTS)."""
        await self._connection.execute(
            insert(ENVIRONMENT_MEMBERS),
            {
                "environment_id": membership.environment_id,
                "member_id": membership.member_id,
                "organization_id": organization_id,
                "role": membership.role.value,
                "create_time": membership.create_time,
                "update_time": membership.update_time,
                "version": membership.version,
            },
        )

    async def save_membership(self, organization_id: str, membership: EnvironmentMembership) -> None:
        """Writes the role of an existing environment membership."""
        await self._connection.execute(
            update(ENVIRONMENT_MEMBERS)
            .where(
                ENVIRONMENT_MEMBERS.c.environment_id == membership.environment_id,
                ENVIRONMENT_MEMBERS.c.member_id == membership.member_id,
                ENVIRONMENT_MEMBERS.c.organization_id == organization_id,
            )
            .values(
                role=membership.role.value, update_time=membership.update_time, version=membership.version
            )
        )

    async def delete_membership(self, organization_id: str, environment_id: str, member_id: str) -> None:
        """Removes a member's access to an environment (read it first: nothing says whether it was
        there)."""
        await self._connection.execute(
            delete(EnvironmentMemberRow).where(
                EnvironmentMemberRow.organization_id == organization_id,
                EnvironmentMemberRow.environment_id == environment_id,
                EnvironmentMemberRow.member_id == member_id,
            )
        )

    async def memberships_page(
        self, organization_id: str, environment_id: str, after: str, limit: int
    ) -> list[EnvironmentMembership]:
        """Up to `limit` memberships of an environment with member ids after `after`, ordered by
        member id."""
        rows = await self._connection.execute(
            select(ENVIRONMENT_MEMBERS)
            .where(
                EnvironmentMemberRow.organization_id == organization_id,
                EnvironmentMemberRow.environment_id == environment_id,
                EnvironmentMemberRow.member_id > after,
            )
            .order_by(EnvironmentMemberRow.member_id)
            .limit(limit)
        )
        return [to_membership(row) for row in rows]
