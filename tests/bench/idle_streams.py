"""What idle WatchEvents streams cost the server: its resident memory with N streams open.

Starts this service (SQLite, or `--postgres URL`) in a subprocess, opens N idle streams from one
client process on a few channels, and reads the server's RSS from /proc before and after, and
again once they are closed; then checks that one write still reaches every stream.

Run: `python -m tests.bench.idle_streams [--streams N] [--channels C] [--postgres URL]`.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

import grpc
from agentpost.environments.v1 import (
    environment_pb2,
    environment_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    organization_pb2,
    organization_pb2_grpc,
)

from tests.bench.__main__ import bench_schema, service_arguments
from tests.bench.processes import health_serving, start_server


def rss_kib(pid: int) -> int:
    """The process's resident set size in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def settled_rss(pid: int) -> int:
    """The RSS once it stops moving (allocator and gRPC buffers settle after a burst)."""
    previous = -1
    current = rss_kib(pid)
    for _ in range(20):
        if abs(current - previous) < 64:
            break
        await asyncio.sleep(0.5)
        previous, current = current, rss_kib(pid)
    return current


async def run(streams: int, channel_count: int, postgres: str | None) -> int:
    operator = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="agentpost-idle-") as scratch:
        directory = Path(scratch)
        url = postgres or f"sqlite+aiosqlite:///{directory / 'idle.db'}"
        async with bench_schema(postgres) as schema:
            server = await start_server(
                "service", service_arguments(url, schema, operator, True), health_serving, directory
            )
            try:
                channels = [grpc.aio.insecure_channel(server.address) for _ in range(channel_count)]
                created = await organization_pb2_grpc.OrganizationServiceStub(channels[0]).CreateOrganization(
                    organization_pb2.CreateOrganizationRequest(name="Idle", owner_email="o@idle.example"),
                    metadata=(("authorization", f"Bearer {operator}"),),
                )
                metadata = (("authorization", f"Bearer {created.owner_api_key_secret}"),)
                pid = server.process.pid
                before = await settled_rss(pid)
                calls = []
                firsts = []
                for index in range(streams):
                    stub = event_pb2_grpc.EventServiceStub(channels[index % channel_count])
                    call = stub.WatchEvents(event_pb2.WatchEventsRequest(), metadata=metadata)
                    calls.append(call)
                    firsts.append(asyncio.ensure_future(call.read()))
                await asyncio.gather(*firsts)  # every stream is live
                with_streams = await settled_rss(pid)
                started = time.monotonic()
                await environment_pb2_grpc.EnvironmentServiceStub(channels[0]).CreateEnvironment(
                    environment_pb2.CreateEnvironmentRequest(name="Wake"), metadata=metadata
                )
                woken = await asyncio.gather(*(call.read() for call in calls))
                fan_out = time.monotonic() - started
                assert all(len(message.events) == 1 for message in woken)
                for call in calls:
                    call.cancel()
                await asyncio.sleep(1.0)
                after = await settled_rss(pid)
                for channel in channels:
                    await channel.close()
            finally:
                server.stop()
    per_stream = (with_streams - before) / streams
    print(
        f"backend {'postgresql' if postgres else 'sqlite'}, {streams} idle streams on {channel_count} channels"
    )
    print(f"  server RSS before {before / 1024:.1f} MiB, with streams {with_streams / 1024:.1f} MiB,")
    print(f"  after closing them {after / 1024:.1f} MiB: {per_stream:.1f} KiB per idle stream")
    print(f"  one write reached all {streams} streams in {fan_out * 1000:.0f} ms")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.idle_streams", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--postgres", metavar="URL")
    arguments = parser.parse_args()
    return asyncio.run(run(arguments.streams, arguments.channels, arguments.postgres))


if __name__ == "__main__":
    sys.exit(main())
