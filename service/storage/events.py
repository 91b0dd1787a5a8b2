"""The event log in storage: appended in the transaction of the write it records, read back in
(revision, sequence) order by whoever follows it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, bindparam, delete, func, insert, or_, select, tuple_

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
from service.storage.prepared import prepared
from service.storage.statements import Statements
from service.storage.tables import EVENTS, EventRow

_INSERT = prepared(insert(EVENTS))  # built once: every write appends
# Built once too: every replica reads the log after each revision it hears of, and every watch
# stream reads it as it resumes. Both read one organization's log in commit order, up to a
# revision; they differ in where they start.
_IN_ORDER = (EVENTS.c.revision, EVENTS.c.sequence)
_IN_COMMIT_ORDER = (
    select(EVENTS)
    .where(EVENTS.c.organization_id == bindparam("organization_id"), EVENTS.c.revision <= bindparam("up_to"))
    .order_by(*_IN_ORDER)
    .limit(bindparam("limit"))
)
_AFTER = prepared(_IN_COMMIT_ORDER.where(EVENTS.c.revision > bindparam("revision")))
_SINCE = prepared(
    _IN_COMMIT_ORDER.where(tuple_(*_IN_ORDER) > tuple_(bindparam("revision"), bindparam("sequence")))
)


def to_event(row: EventRow | Row[Any]) -> Event:
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
        previous_environment_id=row.previous_environment_id,
    )


@dataclass(frozen=True)
class EventQuery:
    """Which events of an organization a listing wants: the request's filters and, coarsely,
    the caller's audience (`reach` None: every environment; see `service.domain.visibility`)."""

    resource_types: frozenset[ResourceType]
    reach: frozenset[str] | None
    environment_id: str | None = None
    resource_type: ResourceType | None = None
    resource_id: str | None = None
    actor_api_key_id: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        """The WHERE clauses, beyond the organization."""
        types = self.resource_types
        if self.resource_type is not None:
            types = types & {self.resource_type}
        where: list[ColumnElement[bool]] = [EventRow.resource_type.in_(sorted(types))]
        if self.reach is not None:
            reach = sorted(self.reach)
            where.append(
                or_(
                    EventRow.environment_id.in_(reach),
                    EventRow.previous_environment_id.in_(reach),
                    # A key of several environments names none; the caller may reach them all.
                    and_(
                        EventRow.resource_type == ResourceType.API_KEY.value,
                        EventRow.environment_id.is_(None),
                    ),
                )
            )
        if self.environment_id is not None:
            where.append(
                or_(
                    EventRow.environment_id == self.environment_id,
                    EventRow.previous_environment_id == self.environment_id,
                )
            )
        if self.resource_id is not None:
            where.append(EventRow.resource_id == self.resource_id)
        if self.actor_api_key_id is not None:
            where.append(EventRow.actor_api_key_id == self.actor_api_key_id)
        if self.start_time is not None:
            where.append(EventRow.create_time >= self.start_time)
        if self.end_time is not None:
            where.append(EventRow.create_time < self.end_time)
        return where


def new_events(
    organization_id: str,
    revision: int,
    now: datetime,
    actor: Actor,
    request_id: str,
    changes: Sequence[Change],
) -> list[Event]:
    """The events that record `changes` under `revision`, each with a fresh id."""
    return [
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
            previous_environment_id=change.previous_environment_id,
        )
        for change in changes
    ]


def event_row(event: Event, sequence: int) -> dict[str, Any]:
    """The values of an event's row (never a secret: records hold none), by column name."""
    actor = event.actor
    return {
        "id": event.id,
        "organization_id": event.organization_id,
        "revision": event.revision,
        "sequence": sequence,
        "create_time": event.create_time,
        "actor_api_key_id": actor.api_key_id,
        "actor_member_id": actor.member_id,
        "actor_operator": actor.operator,
        "request_id": event.request_id,
        "action": event.action.value,
        "resource_type": event.resource_type.value,
        "resource_id": event.resource_id,
        "environment_id": event.environment_id,
        "changed_fields": json.dumps(list(event.changed_fields)),
        "resource": json.dumps(encode(event.resource), separators=(",", ":")),
        "previous_environment_id": event.previous_environment_id,
    }


class EventRepository:
    """Appends and reads an organization's events."""

    def __init__(self, connection: Statements) -> None:
        self._connection = connection

    async def append(self, events: Sequence[Event], start: int = 0) -> None:
        """Stores events of one revision (see `new_events`) in one statement, their sequence
        numbers within the revision beginning at `start`."""
        await self._connection.execute(
            _INSERT, [event_row(event, start + index) for index, event in enumerate(events)]
        )

    async def after(
        self, organization_id: str, revision: int, *, up_to: int, limit: int = 10_000
    ) -> list[Event]:
        """The organization's events with `revision < n <= up_to`, in commit order."""
        rows = await self._connection.execute(
            _AFTER, {"organization_id": organization_id, "revision": revision, "up_to": up_to, "limit": limit}
        )
        return [to_event(row) for row in rows]

    async def since(
        self, organization_id: str, position: tuple[int, int], *, up_to: int, limit: int
    ) -> list[tuple[Event, int]]:
        """The organization's events after `position` (revision, sequence) and up to revision
        `up_to`, in commit order, each with its sequence within its revision."""
        revision, sequence = position
        rows = await self._connection.execute(
            _SINCE,
            {
                "organization_id": organization_id,
                "revision": revision,
                "sequence": sequence,
                "up_to": up_to,
                "limit": limit,
            },
        )
        return [(to_event(row), row.sequence) for row in rows]

    async def newest_first(
        self, organization_id: str, query: EventQuery, before: tuple[int, int] | None, limit: int
    ) -> list[tuple[Event, int]]:
        """The organization's events matching `query`, newest first (revision, then sequence,
        descending), from just before `before`; each with its sequence within its revision."""
        statement = select(EVENTS).where(EventRow.organization_id == organization_id, *query.conditions())
        if before is not None:
            statement = statement.where(tuple_(EventRow.revision, EventRow.sequence) < tuple_(*before))
        rows = await self._connection.execute(
            statement.order_by(EventRow.revision.desc(), EventRow.sequence.desc()).limit(limit)
        )
        return [(to_event(row), row.sequence) for row in rows]

    async def oldest_revision(self, organization_id: str) -> int | None:
        """The oldest revision the organization's log still holds; None when it holds none."""
        oldest = await self._connection.scalar(
            select(func.min(EventRow.revision)).where(EventRow.organization_id == organization_id)
        )
        return None if oldest is None else int(oldest)

    async def prune(self, cutoff: datetime, batch: int) -> int:
        """Deletes about `batch` events older than `cutoff`, oldest first; returns how many.

        Whole revisions go, and for each organization only a prefix of its log: everything up to
        the newest old revision found. The log of an organization thus always starts at its
        oldest retained revision, which is how a watcher's revision is known to have expired."""
        found = await self._connection.execute(
            select(EventRow.organization_id, EventRow.revision)
            .where(EventRow.create_time < cutoff)
            .order_by(EventRow.create_time)
            .limit(batch)
        )
        newest: dict[str, int] = {}
        for organization_id, revision in found:
            newest[organization_id] = max(revision, newest.get(organization_id, 0))
        deleted = 0
        for organization_id, revision in newest.items():
            result = await self._connection.execute(
                delete(EventRow).where(
                    EventRow.organization_id == organization_id, EventRow.revision <= revision
                )
            )
            deleted += int(getattr(result, "rowcount", 0) or 0)
        return deleted
