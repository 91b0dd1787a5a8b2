"""The event log's use cases: the audit log (ListEvents) and the change stream (WatchEvents).

Both show an event only as `service.domain.visibility.visible` allows, with the caller's access as
it stands when the event is shown. A watch first sends what the log holds after the revision it
resumes from, then follows this replica's hub, which hears every revision the access cache applies
(this replica's commits and, through NOTIFY or polling, every other replica's). Whenever the
stream finds it missed revisions (the cache reloaded an organization instead of applying its
events) it reads them from the log, so a stream never skips a revision. Before each delivery and
each heartbeat the caller's key is checked again: a key revoked, expired or whose owner left ends
the stream UNAUTHENTICATED, and a key whose reach shrank stops seeing what left it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby

from service.application.dependencies import Dependencies
from service.application.event_hub import EventHub, Subscription
from service.domain import validation
from service.domain.calls import reached_revision
from service.domain.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from service.domain.events import Event, ResourceType
from service.domain.pagination import Page
from service.domain.principal import Principal, unauthenticated
from service.domain.visibility import audience, visible
from service.storage.events import EventQuery

EVENTS_SCOPE = "events:read"
# ListEvents examines at most this many events per page, so a caller who may see few of a large
# log's events gets short pages (with a next token) rather than slow ones.
MAX_EXAMINED_PER_PAGE = 2_000
_EXAMINE_CHUNK = 500
# A watch reads the log in chunks of this many events, and sends at most this many per message.
LOG_CHUNK = 500
MAX_EVENTS_PER_MESSAGE = 500
_MAX_RESOURCE_ID = 300
# A position after every event of a revision (sequences count from 0 within a revision).
_END_OF_REVISION = 2**31 - 1


@dataclass(frozen=True)
class EventFilters:
    """ListEvents' filters, as received (empty: no filter)."""

    environment_id: str = ""
    resource_type: ResourceType | None = None
    resource_id: str = ""
    actor_api_key_id: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


@dataclass(frozen=True)
class WatchBatch:
    """One message of a watch: visible events of one revision (none in a heartbeat), and the
    revision the stream has delivered everything up to."""

    events: list[Event]
    revision: int


class Events:
    """ListEvents and WatchEvents."""

    def __init__(
        self, dependencies: Dependencies, hub: EventHub, *, heartbeat_seconds: float, buffer_revisions: int
    ) -> None:
        self._deps = dependencies
        self._hub = hub
        self._heartbeat_seconds = heartbeat_seconds
        self._buffer_revisions = buffer_revisions

    async def list(
        self, principal: Principal, filters: EventFilters, page_size: int, page_token: str
    ) -> Page[Event]:
        """The organization's events the caller may see, newest first, keyset-paginated by
        (revision, sequence). A page holds fewer events than asked, with a next token, when more
        than MAX_EXAMINED_PER_PAGE events had to be examined to fill it."""
        environment_id = None
        if filters.environment_id:
            environment_id = principal.visible_environment(
                validation.required_id("environment_id", filters.environment_id)
            ).id
        resource_id = _optional_text("resource_id", filters.resource_id, _MAX_RESOURCE_ID)
        actor = (
            validation.required_id("actor_api_key_id", filters.actor_api_key_id)
            if filters.actor_api_key_id
            else None
        )
        if filters.start_time and filters.end_time and filters.end_time <= filters.start_time:
            raise InvalidArgument.field("end_time", "must be after start_time")
        request = self._deps.pager.request(
            page_size,
            page_token,
            (
                "ListEvents",
                principal.key.id,
                environment_id or "",
                filters.resource_type.value if filters.resource_type else "",
                resource_id or "",
                actor or "",
                filters.start_time.isoformat() if filters.start_time else "",
                filters.end_time.isoformat() if filters.end_time else "",
            ),
        )
        shown = audience(principal)
        query = EventQuery(
            resource_types=shown.resource_types,
            reach=shown.environment_ids,
            environment_id=environment_id,
            resource_type=filters.resource_type,
            resource_id=resource_id,
            actor_api_key_id=actor,
            start_time=filters.start_time,
            end_time=filters.end_time,
        )
        position = _position(request.after)
        found: list[tuple[Event, tuple[int, int]]] = []
        examined = 0
        exhausted = False
        async with self._deps.database.read() as uow:
            while len(found) <= request.size and examined < MAX_EXAMINED_PER_PAGE:
                chunk = await uow.events.newest_first(
                    principal.organization_id, query, position, _EXAMINE_CHUNK
                )
                for event, sequence in chunk:
                    examined += 1
                    position = (event.revision, sequence)
                    seen = visible(principal, event)
                    if seen is not None:
                        found.append((seen, position))
                        if len(found) > request.size:
                            break
                if len(chunk) < _EXAMINE_CHUNK and len(found) <= request.size:
                    exhausted = True
                    break
        if len(found) > request.size:
            found = found[: request.size]
            return self._deps.pager.cut(request, [event for event, _ in found], _token_key(found[-1][1]))
        resume = None if exhausted or position is None else _token_key(position)
        return self._deps.pager.cut(request, [event for event, _ in found], resume)

    def watch(
        self,
        principal: Principal,
        secret: str,
        after_revision: int,
        resource_types: Sequence[ResourceType],
    ) -> AsyncGenerator[WatchBatch, None]:
        """The stream of the caller's visible events after `after_revision` (0: from now): first
        what the log holds, then a message with no events (the stream is live from there), then
        each revision as it is applied here, with a heartbeat whenever no message was sent for
        the heartbeat interval. Ends only with an error (see the module docstring)."""
        watch = _Watch(
            self._deps,
            principal,
            secret,
            frozenset(resource_types) or None,
            heartbeat_seconds=self._heartbeat_seconds,
        )
        subscription = self._hub.subscribe(principal.organization_id, self._buffer_revisions)
        return watch.run(subscription, after_revision)


class _Watch:
    """One WatchEvents stream's progress."""

    def __init__(
        self,
        dependencies: Dependencies,
        principal: Principal,
        secret: str,
        resource_types: frozenset[ResourceType] | None,
        *,
        heartbeat_seconds: float,
    ) -> None:
        self._deps = dependencies
        self._principal = principal
        self._secret = secret
        self._types = resource_types
        self._heartbeat = heartbeat_seconds
        self._organization_id = principal.organization_id
        self.reached = 0

    async def run(self, subscription: Subscription, after_revision: int) -> AsyncGenerator[WatchBatch, None]:
        """See `Events.watch`. The subscription was made before the log is read, so no revision
        committed meanwhile is missed."""
        try:
            latest = await self._starting_point(after_revision)
            self._advance(after_revision or latest)
            async for batch in self._from_log(latest):
                yield batch
            yield WatchBatch([], self.reached)
            last_sent = time.monotonic()
            while True:
                revision = await subscription.next(last_sent + self._heartbeat - time.monotonic())
                self._require_open(subscription)
                if revision is None:
                    if time.monotonic() < last_sent + self._heartbeat:
                        continue
                    async for batch in self._heartbeat_batches(subscription):
                        yield batch
                    last_sent = time.monotonic()
                    continue
                if revision.number <= self.reached:
                    continue
                if revision.number > self.reached + 1:
                    batches = self._from_log(revision.number)
                else:
                    batches = self._deliver(revision.number, revision.events)
                async for batch in batches:
                    yield batch
                    last_sent = time.monotonic()
        finally:
            subscription.cancel()

    async def _starting_point(self, after_revision: int) -> int:
        """The organization's current revision, once `after_revision` is known to be valid and
        still retained."""
        if after_revision < 0:
            raise InvalidArgument.field("after_revision", "must not be negative", reason="INVALID_REVISION")
        async with self._deps.database.read() as uow:
            latest = (await uow.organizations.revisions([self._organization_id])).get(
                self._organization_id, 0
            )
            if after_revision > latest:
                raise InvalidArgument.field(
                    "after_revision",
                    f"is beyond the organization's current revision {latest}",
                    reason="INVALID_REVISION",
                )
            if 0 < after_revision < latest:
                oldest = await uow.events.oldest_revision(self._organization_id)
                # The log starts at its oldest retained revision: anything before it was pruned.
                first_retained = latest + 1 if oldest is None else oldest
                if after_revision < first_retained - 1:
                    raise FailedPrecondition(
                        f"revision {after_revision} is older than the retained event log, which starts"
                        f" after revision {first_retained - 1}; read the current state and watch from 0",
                        reason="REVISION_EXPIRED",
                        metadata={"oldestRevision": str(first_retained - 1)},
                    )
        return latest

    def _advance(self, revision: int) -> None:
        if revision > self.reached:
            self.reached = revision
            reached_revision.set(revision)

    def _require_open(self, subscription: Subscription) -> None:
        if subscription.closed:
            raise Unavailable(
                f"the server is shutting down; watch again from revision {self.reached}",
                reason="SERVER_SHUTTING_DOWN",
                metadata={"revision": str(self.reached)},
            )
        if subscription.overflowed:
            raise ResourceExhausted(
                f"the stream fell more than {subscription.capacity} revisions behind; watch again"
                f" from revision {self.reached}",
                reason="WATCH_BUFFER_OVERFLOW",
                metadata={"revision": str(self.reached)},
            )

    async def _recheck(self) -> Principal:
        """The caller as it stands now; the stream ends when its key may no longer be used."""
        outcome = await self._deps.access.authenticate(self._secret)
        if outcome.principal is None:
            assert outcome.denial is not None
            raise unauthenticated(outcome.denial)
        outcome.principal.require_scope(EVENTS_SCOPE)
        self._principal = outcome.principal
        return outcome.principal

    async def _heartbeat_batches(self, subscription: Subscription) -> AsyncIterator[WatchBatch]:
        """A heartbeat, after reading from the log any revision the cache applied without
        telling the hub (it reloaded the organization instead)."""
        await self._recheck()
        applied = self._deps.access.revision(self._organization_id) or 0
        if applied > self.reached and subscription.pending == 0:
            async for batch in self._from_log(applied):
                yield batch
        yield WatchBatch([], self.reached)

    async def _from_log(self, up_to: int) -> AsyncIterator[WatchBatch]:
        """Every revision after the one reached up to `up_to` (committed), read from the log in
        chunks. A revision that fills a whole chunk is sent in parts (see `_deliver`)."""
        position = (self.reached, _END_OF_REVISION)
        while True:
            async with self._deps.database.read() as uow:
                rows = await uow.events.since(self._organization_id, position, up_to=up_to, limit=LOG_CHUNK)
            full = len(rows) == LOG_CHUNK
            groups = [
                (revision, list(group)) for revision, group in groupby(rows, key=lambda row: row[0].revision)
            ]
            # In a full chunk the last revision may go on in the next one: read it whole from
            # there, unless it is the only one (a revision larger than a chunk goes in parts).
            complete = not full or len(groups) > 1
            if full and len(groups) > 1:
                groups.pop()
            for revision, group in groups:
                async for batch in self._deliver(revision, [event for event, _ in group], complete=complete):
                    yield batch
                position = (revision, _END_OF_REVISION if complete else group[-1][1])
            if not full:
                break
        self._advance(up_to)

    async def _deliver(
        self, revision: int, events: Sequence[Event], *, complete: bool = True
    ) -> AsyncIterator[WatchBatch]:
        """The caller's visible events of one revision (or of part of it, when not `complete`),
        in messages of at most MAX_EVENTS_PER_MESSAGE. Only the message completing the revision
        carries it; the others carry the revision reached before."""
        if events:
            principal = await self._recheck()
            shown = [
                seen
                for event in events
                if (self._types is None or event.resource_type in self._types)
                and (seen := visible(principal, event)) is not None
            ]
        else:
            shown = []
        for start in range(0, len(shown), MAX_EVENTS_PER_MESSAGE):
            part = shown[start : start + MAX_EVENTS_PER_MESSAGE]
            last = start + MAX_EVENTS_PER_MESSAGE >= len(shown)
            if last and complete:
                self._advance(revision)
            yield WatchBatch(part, self.reached)
        if complete:
            self._advance(revision)


def _position(after: tuple[str, ...] | None) -> tuple[int, int] | None:
    """The (revision, sequence) a signed page token continues after."""
    if after is None:
        return None
    if len(after) != 2 or not all(part.isdigit() for part in after):  # pragma: no cover - signed
        raise InvalidArgument.field("page_token", "is invalid", reason="INVALID_PAGE_TOKEN")
    return int(after[0]), int(after[1])


def _token_key(position: tuple[int, int]) -> tuple[str, str]:
    return str(position[0]), str(position[1])


def _optional_text(field: str, value: str, max_length: int) -> str | None:
    """An optional exact-match filter: printable, bounded; empty means no filter."""
    if not value:
        return None
    if len(value) > max_length or not validation.printable(value):
        raise InvalidArgument.field(field, f"must be at most {max_length} printable characters")
    return value
