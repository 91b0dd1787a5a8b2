"""Registered resources in storage: which environment each (kind, resource id) of an organization
belongs to."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Select, and_, bindparam, delete, insert, or_, select, tuple_, update
from sqlalchemy.sql.elements import ColumnElement

from service.domain.models import ResourceKind, ScopedResource
from service.storage.prepared import prepared
from service.storage.statements import Statements
from service.storage.tables import ENVIRONMENTS, RESOURCES, ResourceRow, insert_selecting

ResourceKey = tuple[ResourceKind, str]


def to_resource(row: ResourceRow | Row[Any]) -> ScopedResource:
    """The domain record of a row."""
    return ScopedResource(
        kind=ResourceKind(row.kind),
        resource_id=row.resource_id,
        organization_id=row.organization_id,
        environment_id=row.environment_id,
        display_name=row.display_name,
        create_time=row.create_time,
        update_time=row.update_time,
    )


# Built once: registering is the write other services make most, and GetResource reads the
# database on every call (see tables.table_of).
_INSERT = prepared(insert(RESOURCES))


def active_environment(
    organization_id: ColumnElement[str], environment_id: ColumnElement[str]
) -> Select[Any]:
    """The environment a registration may go into: the organization's, and not deleted."""
    return select(ENVIRONMENTS.c.id).where(
        ENVIRONMENTS.c.organization_id == organization_id,
        ENVIRONMENTS.c.id == environment_id,
        ENVIRONMENTS.c.delete_time.is_(None),
    )


# A registration made only while its environment is not deleted, in one statement (one round
# trip inside the organization's write, not two): it names what it inserted, nothing if the
# environment was deleted or is gone.
_INSERT_INTO_ACTIVE = prepared(
    insert_selecting(
        RESOURCES,
        where=active_environment(bindparam("organization_id"), bindparam("environment_id")).exists(),
    ).returning(RESOURCES.c.resource_id)
)
# One registration: (kind, resource id) is unique in an organization.
_THE_RESOURCE = (
    RESOURCES.c.organization_id == bindparam("organization_id"),
    RESOURCES.c.kind == bindparam("kind"),
    RESOURCES.c.resource_id == bindparam("resource_id"),
)
_GET = prepared(select(RESOURCES).where(*_THE_RESOURCE))
_DELETE = prepared(
    delete(RESOURCES)
    .where(*_THE_RESOURCE, RESOURCES.c.environment_id == bindparam("environment_id"))
    .returning(*RESOURCES.c)
)


def _after(after: tuple[str, str] | None) -> ColumnElement[bool]:
    """Rows strictly after the (kind, resource_id) cursor, spelled out so every backend can use
    the (environment_id, kind, resource_id) index."""
    if after is None:
        return and_(True)
    kind, resource_id = after
    return or_(ResourceRow.kind > kind, and_(ResourceRow.kind == kind, ResourceRow.resource_id > resource_id))


def resource_row(resource: ScopedResource) -> dict[str, Any]:
    """The row of a registration, for Core inserts."""
    return {
        "organization_id": resource.organization_id,
        "kind": resource.kind.value,
        "resource_id": resource.resource_id,
        "environment_id": resource.environment_id,
        "display_name": resource.display_name,
        "create_time": resource.create_time,
        "update_time": resource.update_time,
    }


class ResourceRepository:
    """Reads and writes registered resources."""

    def __init__(self, connection: Statements) -> None:
        self._connection = connection

    async def insert(self, resource: ScopedResource) -> None:
        """Stores a new registration; one already registered under the same organization, kind and
        id (in any environment) raises AlreadyExists(RESOURCE_EXISTS)."""
        await self._connection.execute(_INSERT, resource_row(resource))

    async def insert_if_active(self, resource: ScopedResource) -> bool:
        """`insert`, made only if the resource's environment exists and is not deleted (read in
        the same statement); False when it was not made."""
        inserted = await self._connection.execute(_INSERT_INTO_ACTIVE, resource_row(resource))
        return inserted.first() is not None

    async def get(self, organization_id: str, kind: ResourceKind, resource_id: str) -> ScopedResource | None:
        """One registration of the organization, in whichever environment holds it."""
        found = await self._connection.execute(
            _GET, {"organization_id": organization_id, "kind": kind.value, "resource_id": resource_id}
        )
        row = found.first()
        return None if row is None else to_resource(row)

    async def delete(
        self, organization_id: str, environment_id: str, kind: ResourceKind, resource_id: str
    ) -> ScopedResource | None:
        """Removes a registration if it belongs to the environment and returns it; None when
        there was none."""
        rows = await self._connection.execute(
            _DELETE,
            {
                "organization_id": organization_id,
                "kind": kind.value,
                "resource_id": resource_id,
                "environment_id": environment_id,
            },
        )
        removed = rows.first()
        return None if removed is None else to_resource(removed)

    async def page_of(
        self,
        organization_id: str,
        environment_id: str,
        kinds: Collection[ResourceKind],
        after: tuple[str, str] | None,
        limit: int,
    ) -> list[ScopedResource]:
        """Up to `limit` resources of the environment of the given kinds, ordered by (kind,
        resource_id) and continuing after the cursor."""
        rows = await self._connection.execute(
            select(RESOURCES)
            .where(
                ResourceRow.organization_id == organization_id,
                ResourceRow.environment_id == environment_id,
                ResourceRow.kind.in_([kind.value for kind in kinds]),
                _after(after),
            )
            .order_by(ResourceRow.kind, ResourceRow.resource_id)
            .limit(limit)
        )
        return [to_resource(row) for row in rows]

    async def present_in(
        self, organization_id: str, environment_id: str, keys: Collection[ResourceKey]
    ) -> set[ResourceKey]:
        """Which of the named resources currently belong to the environment."""
        rows = await self._connection.execute(
            select(ResourceRow.kind, ResourceRow.resource_id).where(
                ResourceRow.organization_id == organization_id,
                ResourceRow.environment_id == environment_id,
                tuple_(ResourceRow.kind, ResourceRow.resource_id).in_(
                    [(kind.value, resource_id) for kind, resource_id in keys]
                ),
            )
        )
        return {(ResourceKind(kind), resource_id) for kind, resource_id in rows}

    async def move(
        self,
        organization_id: str,
        from_environment_id: str,
        to_environment_id: str,
        keys: Collection[ResourceKey] | None,
        now: datetime,
    ) -> list[ScopedResource]:
        """Moves the named resources (all when `keys` is None) of one environment to another;
        returns them as they are now."""
        statement = (
            update(ResourceRow)
            .where(
                ResourceRow.organization_id == organization_id,
                ResourceRow.environment_id == from_environment_id,
            )
            .values(environment_id=to_environment_id, update_time=now)
        )
        if keys is not None:
            statement = statement.where(
                tuple_(ResourceRow.kind, ResourceRow.resource_id).in_(
                    [(kind.value, resource_id) for kind, resource_id in keys]
                )
            )
        rows = await self._connection.execute(statement.returning(*RESOURCES.c))
        return [to_resource(row) for row in rows]
