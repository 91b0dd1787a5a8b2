"""Event delivery delay: from a write's commit to a WatchEvents consumer receiving its event.

Watchers on replica A (where the writes are made) and on replica B (which hears them through
NOTIFY on PostgreSQL, by polling on SQLite) each receive every write. The delay of one event is
its receipt time minus its `create_time` (stamped in the write's transaction just before commit;
server and client share this machine's clock), so it covers commit, fan-out and the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field

import grpc
from agentpost.environments.v1 import event_pb2, event_pb2_grpc, resource_pb2, resource_pb2_grpc

from tests.bench.processes import ServerProcess

DELIVERY_TIMEOUT_SECONDS = 30.0
# Writes are spaced at random so each is delivered on its own, as in a quiet organization.
MAX_SPACING_SECONDS = 0.01


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


@dataclass
class Delivery:
    """Milliseconds from commit to receipt, per watcher replica."""

    same_replica_ms: list[float] = field(default_factory=list)
    other_replica_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None

    @staticmethod
    def _summary(delays: list[float]) -> dict[str, float]:
        if not delays:
            return {}
        return {
            "count": len(delays),
            "p50_ms": round(_percentile(delays, 0.5), 2),
            "p99_ms": round(_percentile(delays, 0.99), 2),
            "max_ms": round(max(delays), 2),
        }

    def as_json(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {
            "skipped": self.skipped,
            "same_replica": self._summary(self.same_replica_ms),
            "other_replica": self._summary(self.other_replica_ms),
            "problems": self.problems,
        }

    def lines(self) -> list[str]:
        """The printed summary."""
        if self.skipped:
            return [f"  skipped: {self.skipped}"]
        lines = []
        for name, delays in (
            ("watcher on A (the writer)", self.same_replica_ms),
            ("watcher on B", self.other_replica_ms),
        ):
            if delays:
                lines.append(
                    f"  {name:<26} {len(delays)} events: p50 {_percentile(delays, 0.5):.1f} ms,"
                    f" p99 {_percentile(delays, 0.99):.1f} ms, max {max(delays):.1f} ms"
                )
        return lines + [f"  ! {problem}" for problem in self.problems]


class _Receiver:
    """Reads one watch stream, noting when each registered resource's event arrived."""

    def __init__(self, channel: grpc.aio.Channel, secret: str) -> None:
        self.call = event_pb2_grpc.EventServiceStub(channel).WatchEvents(
            event_pb2.WatchEventsRequest(resource_types=[event_pb2.Event.SCOPED_RESOURCE]),
            metadata=(("authorization", f"Bearer {secret}"),),
        )
        self.delays_ms: dict[str, float] = {}
        self.live = asyncio.Event()
        self.expected = 0
        self.complete = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.call:
            received = time.time()
            if not message.events:
                self.live.set()
            for event in message.events:
                committed = event.create_time.seconds + event.create_time.nanos / 1e9
                self.delays_ms[event.scoped_resource.resource_id] = (received - committed) * 1000.0
            if self.expected and len(self.delays_ms) >= self.expected:
                self.complete.set()

    async def stop(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def measure_delivery(
    replica_a: ServerProcess, replica_b: ServerProcess, owner_secret: str, environment: str, rounds: int
) -> Delivery:
    """Registers `rounds` resources through A, one at a time, with both watchers listening."""
    outcome = Delivery()
    run = uuid.uuid4().hex[:6]
    names = [f"delivery-{run}-{index}" for index in range(rounds)]
    async with (
        grpc.aio.insecure_channel(replica_a.address) as channel_a,
        grpc.aio.insecure_channel(replica_b.address) as channel_b,
    ):
        receivers = [_Receiver(channel_a, owner_secret), _Receiver(channel_b, owner_secret)]
        try:
            await asyncio.wait_for(asyncio.gather(*(r.live.wait() for r in receivers)), timeout=10.0)
            for receiver in receivers:
                receiver.expected = rounds
            resources = resource_pb2_grpc.ResourceServiceStub(channel_a)
            for name in names:
                await resources.RegisterResource(
                    resource_pb2.RegisterResourceRequest(
                        kind=resource_pb2.ScopedResource.INBOX, resource_id=name
                    ),
                    metadata=(
                        ("authorization", f"Bearer {owner_secret}"),
                        ("x-agentpost-environment", environment),
                    ),
                )
                await asyncio.sleep(random.uniform(0.0, MAX_SPACING_SECONDS))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(r.complete.wait() for r in receivers)), timeout=DELIVERY_TIMEOUT_SECONDS
                )
        finally:
            for receiver in receivers:
                await receiver.stop()
    for receiver, delays in zip(receivers, (outcome.same_replica_ms, outcome.other_replica_ms), strict=True):
        missing = [name for name in names if name not in receiver.delays_ms]
        if missing:
            outcome.problems.append(f"{len(missing)} events never arrived (first: {missing[0]})")
        delays += [receiver.delays_ms[name] for name in names if name in receiver.delays_ms]
    return outcome
