"""The event log in storage: appended in the transaction of the write it records, read back in
(revision, sequence) order by whoever follows it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.domain import ids
from service.domain.events import (
    Action,
    Actor,
    Change,
    Event,
    ResourceType,
    decode,
    encode,
    environment_of,
    resource_id_of,
    resource_type_of,
)
from service.storage.tables import EventRow


def to_event(row: EventRow) -> Event:
    """The domain record of a row."""
    resource_type = ResourceType(row.resource_type)
    return Event(
        id=row.id,
        organization_id=row.organization_id,
        revision=row.revision,
        create_time=row.create_time,
        actor=Actor(row.actor_api_key_id, row.actor_member_id, row.actor_operator),
        request_id=row.request_id,
        action=Action(row.action),
        resource_type=resource_type,
        resource_id=row.resource_id,
        environment_id=row.environment_id,
        changed_fields=tuple(json.loads(row.changed_fields)),
        resource=decode(resource_type, json.loads(row.resource)),
    )


class EventRepository:
    """Appends and reads an organization's events."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def append(
        self,
        organization_id: str,
        revision: int,
        now: datetime,
        actor: Actor,
        request_id: str,
        changes: Sequence[Change],
    ) -> list[Event]:
        """Stores one event per change, numbered `revision`, in one statement; returns them."""
        events = [
            Event(
                id=ids.new_id(ids.EVENT),
                organization_id=organization_id,
                revision=revision,
                create_time=now,
                actor=actor,
                request_id=request_id,
                action=change.action,
                resource_type=resource_type_of(change.resource),
                resource_id=resource_id_of(change.resource),
                environment_id=environment_of(change.resource),
                changed_fields=change.changed_fields,
                resource=change.resource,
            )
            for change in changes
        ]
        await self._session.execute(
            insert(EventRow),
            [
                {
                    "id": event.id,
                    "organization_id": organization_id,
                    "revision": revision,
                    "sequence": sequence,
                    "create_time": now,
                    "actor_api_key_id": actor.api_key_id,
                    "actor_member_id": actor.member_id,
                    "actor_operator": actor.operator,
                    "request_id": request_id,
                    "action": event.action.value,
                    "resource_type": event.resource_type.value,
                    "resource_id": event.resource_id,
                    "environment_id": event.environment_id,
                    "changed_fields": json.dumps(list(event.changed_fields)),
                    "resource": json.dumps(encode(event.resource), separators=(",", ":")),
                }
                for sequence, event in enumerate(events)
            ],
        )
        return events

    async def after(
        self, organization_id: str, revision: int, *, up_to: int, limit: int = 10_000
    ) -> list[Event]:
        """The organization's events with `revision < n <= up_to`, in commit order."""
        rows = await self._session.scalars(
            select(EventRow)
            .where(
                EventRow.organization_id == organization_id,
                EventRow.revision > revision,
                EventRow.revision <= up_to,
            )
            .order_by(EventRow.revision, EventRow.sequence)
            .limit(limit)
        )
        return [to_event(row) for row in rows]
