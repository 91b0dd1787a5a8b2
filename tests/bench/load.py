"""The benchmark's load client: the same code drives the bare echo and every scenario.

Requests are serialized once before the run and responses are read as bytes, so the client does
the same work per call whatever the target; a response is checked by comparing its bytes with
the answer a probe call got before the run (a mismatch counts as an error).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from tests.bench.processes import ServerProcess

CALL_TIMEOUT_SECONDS = 5.0
MISMATCH = "UNEXPECTED_RESPONSE"
# Every channel gets a TCP connection of its own instead of sharing grpc's global subchannel.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(frozen=True)
class Load:
    """How hard and how long to push: workers, channels, warm-up and measured seconds."""

    concurrency: int
    channels: int
    warmup: float
    duration: float


@dataclass
class Scenario:
    """One unary call to repeat: where it goes, what it sends and what must come back."""

    name: str
    server: ServerProcess
    method: str
    request: Callable[[], bytes]
    metadata: tuple[tuple[str, str], ...] = ()
    expected: bytes | None = None  # None: any successful answer counts (writes)


@dataclass
class Result:
    """What one scenario measured."""

    name: str
    calls: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    server_cpu_seconds: float | None = None
    # The server's event-loop thread alone: the resource every call of one process shares.
    loop_cpu_seconds: float | None = None
    client_cpu_seconds: float = 0.0
    skipped: str | None = None
    channels: int = 1

    @property
    def calls_per_second(self) -> float:
        """Completed calls per measured second."""
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile_ms(self, fraction: float) -> float:
        """A latency percentile in milliseconds (nearest rank), 0 with no calls."""
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @property
    def server_cpu_us_per_call(self) -> float | None:
        """Server CPU microseconds per completed call, when the platform tells us."""
        if self.server_cpu_seconds is None or not self.calls:
            return None
        return self.server_cpu_seconds / self.calls * 1e6

    @property
    def loop_cpu_share(self) -> float | None:
        """How busy the server's event-loop thread was, as a fraction of one core."""
        if self.loop_cpu_seconds is None or not self.seconds:
            return None
        return self.loop_cpu_seconds / self.seconds

    @property
    def client_cpu_share(self) -> float:
        """The load client's CPU use as a fraction of one core during the measured window."""
        return self.client_cpu_seconds / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        """Failed or unexpected calls in the measured window."""
        return sum(self.errors.values())

    @classmethod
    def combined(cls, parts: Sequence[Result]) -> Result:
        """Several runs of one scenario as one: calls, seconds and CPU added up."""
        first = parts[0]
        skipped = next((part.skipped for part in parts if part.skipped), None)
        if skipped:
            return cls(first.name, skipped=skipped, channels=first.channels)
        cpu = [part.server_cpu_seconds for part in parts]
        loop_cpu = [part.loop_cpu_seconds for part in parts]
        combined = cls(
            first.name,
            calls=sum(part.calls for part in parts),
            seconds=sum(part.seconds for part in parts),
            server_cpu_seconds=None if None in cpu else sum(c for c in cpu if c is not None),
            loop_cpu_seconds=None if None in loop_cpu else sum(c for c in loop_cpu if c is not None),
            client_cpu_seconds=sum(part.client_cpu_seconds for part in parts),
            channels=first.channels,
        )
        for part in parts:
            combined.latencies_ms.extend(part.latencies_ms)
            combined.errors.update(part.errors)
        return combined

    def as_json(self) -> dict[str, object]:
        """A JSON-ready summary (no raw latencies)."""
        return {
            "name": self.name,
            "skipped": self.skipped,
            "channels": self.channels,
            "calls": self.calls,
            "seconds": round(self.seconds, 3),
            "calls_per_second": round(self.calls_per_second, 1),
            "p50_ms": round(self.percentile_ms(0.50), 3),
            "p99_ms": round(self.percentile_ms(0.99), 3),
            "errors": dict(self.errors),
            "server_cpu_us_per_call": (
                None if self.server_cpu_us_per_call is None else round(self.server_cpu_us_per_call, 1)
            ),
            "loop_cpu_share": None if self.loop_cpu_share is None else round(self.loop_cpu_share, 3),
            "client_cpu_share": round(self.client_cpu_share, 3),
        }


async def _worker(
    call: grpc.aio.UnaryUnaryMultiCallable,
    scenario: Scenario,
    window: tuple[float, float],
    result: Result,
) -> None:
    measure_from, measure_until = window
    request, metadata, expected = scenario.request, scenario.metadata or None, scenario.expected
    latencies, errors = result.latencies_ms, result.errors
    while True:
        started = time.perf_counter()
        if started >= measure_until:
            return
        try:
            response = await call(request(), metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
            outcome = None if expected is None or response == expected else MISMATCH
        except grpc.aio.AioRpcError as error:
            outcome = error.code().name
        finished = time.perf_counter()
        # Only calls that started and ended inside the window count, the same rule for every target.
        if started >= measure_from and finished <= measure_until:
            if outcome is None:
                result.calls += 1
                latencies.append((finished - started) * 1000.0)
            else:
                errors[outcome] += 1


async def _sample_cpu(server: ServerProcess, window: tuple[float, float], result: Result) -> None:
    measure_from, measure_until = window
    await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
    server_before, client_before = server.cpu_seconds(), time.process_time()
    loop_before = server.loop_cpu_seconds()
    await asyncio.sleep(max(0.0, measure_until - time.perf_counter()))
    server_after, client_after = server.cpu_seconds(), time.process_time()
    loop_after = server.loop_cpu_seconds()
    if server_before is not None and server_after is not None:
        result.server_cpu_seconds = server_after - server_before
    if loop_before is not None and loop_after is not None:
        result.loop_cpu_seconds = loop_after - loop_before
    result.client_cpu_seconds = client_after - client_before


async def run_load(scenario: Scenario, load: Load) -> Result:
    """Runs `load.concurrency` workers spread over `load.channels` channels; measures after warm-up."""
    result = Result(scenario.name, seconds=load.duration, channels=load.channels)
    channels: Sequence[grpc.aio.Channel] = [
        scenario.server.channel(options=CHANNEL_OPTIONS) for _ in range(load.channels)
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=10.0)
        calls = [channel.unary_unary(scenario.method) for channel in channels]
        start = time.perf_counter()
        window = (start + load.warmup, start + load.warmup + load.duration)
        await asyncio.gather(
            _sample_cpu(scenario.server, window, result),
            *(
                _worker(calls[index % len(calls)], scenario, window, result)
                for index in range(load.concurrency)
            ),
        )
    finally:
        for channel in channels:
            await channel.close()
    return result
