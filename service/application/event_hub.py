"""This replica's fan-out of committed revisions to its open WatchEvents streams.

The access cache applies every revision of the organizations it follows, in order, whichever
replica committed it (its own commits at once, others' through NOTIFY or polling and the log);
the hub hears each one from the cache and hands it to the streams of that organization. A
stream's buffer is bounded: a stream that falls `capacity` revisions behind is marked overflowed,
its buffer dropped, and it ends (the consumer resumes from the revision it reached). The events
of a revision are shared by every stream, never copied.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from service.domain.events import Event


@dataclass(frozen=True)
class Revision:
    """One applied revision of an organization and its events."""

    number: int
    events: Sequence[Event]


class Subscription:
    """One stream's buffer of revisions not yet delivered."""

    __slots__ = ("_hub", "_items", "_ready", "capacity", "closed", "organization_id", "overflowed")

    def __init__(self, hub: EventHub, organization_id: str, capacity: int) -> None:
        self._hub = hub
        self.organization_id = organization_id
        self.capacity = capacity
        self._items: deque[Revision] = deque()
        self._ready = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, revision: Revision) -> None:
        """Buffers a revision, or marks the stream overflowed when its buffer is full."""
        if self.overflowed or self.closed:
            return
        if len(self._items) >= self.capacity:
            self.overflowed = True
            self._items.clear()
        else:
            self._items.append(revision)
        self._ready.set()

    def close(self) -> None:
        """Ends the stream at its next wait (the server is shutting down)."""
        self.closed = True
        self._ready.set()

    @property
    def ended(self) -> bool:
        """Whether the stream must end: overflowed or closed."""
        return self.overflowed or self.closed

    async def next(self, within: float) -> Revision | None:
        """The next buffered revision, waiting at most `within` seconds; None when none came,
        or when the stream must end (see `ended`)."""
        if not self._items and not self.ended:
            self._ready.clear()
            try:
                async with asyncio.timeout(max(within, 0.0)):
                    await self._ready.wait()
            except TimeoutError:
                return None
        if self.ended or not self._items:
            return None
        return self._items.popleft()

    @property
    def pending(self) -> int:
        """How many revisions wait in the buffer."""
        return len(self._items)

    def cancel(self) -> None:
        """Stops receiving revisions."""
        self._hub.unsubscribe(self)


class EventHub:
    """Subscriptions by organization; fed with every revision the access cache applies."""

    def __init__(self) -> None:
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._closed = False

    def subscribe(self, organization_id: str, capacity: int) -> Subscription:
        """A new stream's buffer for the organization's revisions from now on; already closed
        when the hub is (the server is stopping)."""
        subscription = Subscription(self, organization_id, capacity)
        if self._closed:
            subscription.close()
        else:
            self._subscriptions.setdefault(organization_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forgets a stream's buffer (its stream ended)."""
        subscriptions = self._subscriptions.get(subscription.organization_id)
        if subscriptions is None:
            return
        subscriptions.discard(subscription)
        if not subscriptions:
            del self._subscriptions[subscription.organization_id]

    def publish(self, organization_id: str, revision: int, events: Sequence[Event]) -> None:
        """Hands an applied revision to every stream of the organization (an AccessCache
        listener: synchronous and cheap, it only appends to buffers)."""
        subscriptions = self._subscriptions.get(organization_id)
        if not subscriptions:
            return
        item = Revision(revision, events)
        for subscription in subscriptions:
            subscription.offer(item)

    def close(self) -> None:
        """Ends every stream, open or still to come (the server is shutting down)."""
        self._closed = True
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription.close()

    @property
    def subscribers(self) -> int:
        """How many streams are open on this replica. Metrics read it from their own thread: the
        values are copied first (one step for the interpreter), so a stream opening meanwhile
        cannot break the count."""
        return sum(len(subscriptions) for subscriptions in list(self._subscriptions.values()))
