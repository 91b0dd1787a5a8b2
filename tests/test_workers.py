"""`serve --workers 2` as a real process tree: one port served by both workers, revocations
followed across them, migrations and bootstrap once, ordered shutdown, failures, a taken port.

Which worker answers a connection is read from the log: every worker's lines start with
`worker I/N pid P`, and a refused call logs its `x-request-id`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import statistics
import time
from pathlib import Path

import grpc
from agentpost.environments.v1 import api_key_pb2 as pb
from agentpost.environments.v1 import api_key_pb2_grpc, organization_pb2, organization_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app.workers import AddressUnavailable, check_address_free
from tests.empty_database import empty_database
from tests.harness import OPERATOR_TOKEN, auth
from tests.servers import Backend
from tests.workers import START_SECONDS, Served, process_gone, serve_workers

SECRET = re.compile(r"ap_sk_live_[0-9A-Za-z]{38}")
# The documented bound for another process to honour a revoke is the cache refresh interval
# (PostgreSQL's safety net: 1 s) plus one poll; the loop allows for a loaded machine.
REVOCATION_BOUND_SECONDS = 3.0
REVOCATIONS = 20
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _one_channel_per_worker(served: Served) -> dict[int, grpc.aio.Channel]:
    """New connections until each worker holds one (the kernel picks a worker per connection)."""
    channels: dict[int, grpc.aio.Channel] = {}
    spare: list[grpc.aio.Channel] = []
    for _ in range(64):
        channel = served.channel()
        pid = await served.worker_behind(channel)
        if pid in channels:
            spare.append(channel)
        else:
            channels[pid] = channel
        if len(channels) == 2:
            break
    for channel in spare:
        await channel.close()
    return channels


async def _owner_secret(channel: grpc.aio.Channel) -> str:
    created = await organization_pb2_grpc.OrganizationServiceStub(channel).CreateOrganization(
        organization_pb2.CreateOrganizationRequest(
            name="Workers", owner_email="owner@example.com", owner_display_name="Owner"
        ),
        metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),),
    )
    return str(created.owner_api_key_secret)


async def _revoked_after(revoking: grpc.aio.Channel, watching: grpc.aio.Channel, owner_secret: str) -> float:
    """Creates a key, warms it on both workers, revokes it through `revoking`; returns the seconds
    until `watching` refuses it."""
    keys_a = api_key_pb2_grpc.ApiKeyServiceStub(revoking)
    keys_b = api_key_pb2_grpc.ApiKeyServiceStub(watching)
    created = await keys_a.CreateApiKey(
        pb.CreateApiKeyRequest(name="revoked", scopes=["inboxes:read"]), metadata=auth(owner_secret)
    )
    for stub in (keys_a, keys_b):
        assert (await stub.VerifyApiKey(pb.VerifyApiKeyRequest(secret=created.secret))).valid
    await keys_a.RevokeApiKey(pb.RevokeApiKeyRequest(id=created.api_key.id), metadata=auth(owner_secret))
    revoked_at = time.monotonic()
    refused_here = await keys_a.VerifyApiKey(pb.VerifyApiKeyRequest(secret=created.secret))
    assert refused_here.denial_reason == pb.VerifyApiKeyResponse.REVOKED
    while time.monotonic() - revoked_at < REVOCATION_BOUND_SECONDS:
        answer = await keys_b.VerifyApiKey(pb.VerifyApiKeyRequest(secret=created.secret))
        if not answer.valid:
            assert answer.denial_reason == pb.VerifyApiKeyResponse.REVOKED
            return time.monotonic() - revoked_at
        await asyncio.sleep(0.005)
    raise AssertionError(f"the other worker still accepted a revoked key after {REVOCATION_BOUND_SECONDS} s")


async def _watch(channel: grpc.aio.Channel, first: asyncio.Event) -> list[int]:
    """Every status a health Watch stream shows until it ends; `first` is set on the first."""
    statuses: list[int] = []
    async for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()):
        statuses.append(response.status)
        first.set()
    return statuses


async def test_both_workers_serve_the_port_follow_revocations_and_drain_on_sigterm(
    backend: Backend, tmp_path: Path
) -> None:
    served = await serve_workers(backend, tmp_path, "--migrate", drain=0.5)
    channels: dict[int, grpc.aio.Channel] = {}
    try:
        await served.until_serving()
        workers = served.worker_pids()
        assert len(workers) == 2
        channels = await _one_channel_per_worker(served)
        assert set(channels) == workers, "new connections never reached both workers"
        first, second = (channels[pid] for pid in sorted(channels))

        # A revoke through either worker is honoured by the other, which follows the log.
        owner_secret = await _owner_secret(first)
        delays = [
            await _revoked_after(*((first, second) if n % 2 == 0 else (second, first)), owner_secret)
            for n in range(REVOCATIONS)
        ]
        delays_ms = sorted(delay * 1000 for delay in delays)
        percentiles = statistics.quantiles(delays_ms, n=100, method="inclusive")
        print(
            f"\n[{backend.name}] revoke seen by the other worker, {REVOCATIONS} revocations: "
            f"min {delays_ms[0]:.0f} ms, p50 {percentiles[49]:.0f} ms, p99 {percentiles[98]:.0f} ms, "
            f"max {delays_ms[-1]:.0f} ms"
        )

        # SIGTERM: each worker goes NOT_SERVING (its Watch stream says so), drains, and stops.
        watching = [asyncio.Event(), asyncio.Event()]
        watches = [
            asyncio.ensure_future(_watch(channel, started))
            for channel, started in zip((first, second), watching, strict=True)
        ]
        async with asyncio.timeout(10):
            for started in watching:
                await started.wait()
        assert await served.stop() == 0, served.log()
        async with asyncio.timeout(30):
            seen = await asyncio.gather(*watches)
        for statuses in seen:
            assert statuses[0] == SERVING and statuses[-1] == NOT_SERVING, statuses
        log = served.log()
        for pid in workers:
            assert re.search(rf"^worker \d/2 pid {pid} .* stopped$", log, re.MULTILINE), log
            assert process_gone(pid)
        assert "all 2 workers stopped" in log
    finally:
        for channel in channels.values():
            await channel.close()
        await served.stop(signal.SIGKILL)


async def test_migrations_and_bootstrap_run_once_for_all_workers(backend: Backend, tmp_path: Path) -> None:
    async with empty_database(backend, tmp_path) as fresh:
        served = await serve_workers(fresh, tmp_path, "--migrate", "--bootstrap-if-empty")
        channels: dict[int, grpc.aio.Channel] = {}
        try:
            await served.until_serving()
            # The supervisor prints the owner key right after it logs that every worker serves.
            printed = await served.until_printed(SECRET)
            secrets = SECRET.findall(printed)
            assert len(set(secrets)) == 1, printed
            channels = await _one_channel_per_worker(served)
            assert len(channels) == 2
            for channel in channels.values():
                organization = await organization_pb2_grpc.OrganizationServiceStub(channel).GetOrganization(
                    organization_pb2.GetOrganizationRequest(), metadata=auth(secrets[0])
                )
                assert organization.name == "Local organization"
            log = served.log()
            upgrades = [line for line in log.splitlines() if "Running upgrade" in line]
            assert upgrades, log
            assert all(line.startswith("supervisor pid ") for line in upgrades), upgrades
        finally:
            for channel in channels.values():
                await channel.close()
            assert await served.stop() == 0, served.log()


async def test_a_worker_that_dies_stops_the_others_and_fails_the_supervisor(
    backend: Backend, tmp_path: Path
) -> None:
    served = await serve_workers(backend, tmp_path, "--migrate")
    try:
        await served.until_serving()
        killed, survivor = sorted(served.worker_pids())
        os.kill(killed, signal.SIGKILL)
        async with asyncio.timeout(30):
            status = await served.process.wait()
        assert status == 1
        log = served.log()
        assert re.search(rf"worker \d \(pid {killed}\) exited with status -9; stopping the others", log), log
        assert re.search(rf"^worker \d/2 pid {survivor} .* stopped$", log, re.MULTILINE), log
        assert process_gone(survivor)
    finally:
        await served.stop(signal.SIGKILL)


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(backend: Backend, tmp_path: Path) -> None:
    served = await serve_workers(backend, tmp_path, "--migrate")
    await served.until_serving()
    workers = served.worker_pids()
    await served.stop(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not all(process_gone(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers still running 30 s on:\n{served.log()}"
        await asyncio.sleep(0.1)
    log = served.log()
    for pid in workers:
        assert re.search(
            rf"^worker \d/2 pid {pid} .* the supervisor \(pid \d+\) is gone", log, re.MULTILINE
        ), log
        assert re.search(rf"^worker \d/2 pid {pid} .* stopped$", log, re.MULTILINE), log


async def test_a_port_held_by_another_process_fails_the_start(backend: Backend, tmp_path: Path) -> None:
    for shared in (False, True):
        with socket.socket() as holder:
            if shared:
                # Even a holder that allows sharing: the workers would join it without the check.
                holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = int(holder.getsockname()[1])
            served = await serve_workers(backend, tmp_path, "--migrate", port=port)
            async with asyncio.timeout(START_SECONDS):
                status = await served.process.wait()
            log = served.log()
            assert status == 2, log
            lines = log.strip().splitlines()
            assert len(lines) == 1, log
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in lines[0]


def test_the_address_check_chooses_the_port_for_port_zero_and_refuses_what_cannot_be_shared() -> None:
    chosen = check_address_free("127.0.0.1:0")
    host, port = chosen.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    for address in ("unix:/tmp/agentpost.sock", "127.0.0.1:http"):
        try:
            check_address_free(address)
        except AddressUnavailable as error:
            assert address in str(error)
        else:
            raise AssertionError(f"{address} was accepted")
