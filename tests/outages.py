"""Database outages under real server processes: a private PostgreSQL cluster (never the shared
one) that a test stops and starts, and server processes on it. `cluster` and `replicas` are
fixtures of every test (tests/conftest.py loads this module as a plugin)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import (
    api_key_pb2,
    api_key_pb2_grpc,
    environment_pb2_grpc,
    organization_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import private_postgres
from tests.bench.processes import ServerProcess, health_serving
from tests.harness import OPERATOR_TOKEN
from tests.private_postgres import PrivatePostgres
from tests.servers import PROJECT_ROOT, Backend, free_port

REFRESH_SECONDS = 0.2
DATABASE_TIMEOUT_SECONDS = 2.0
# Every call carries a deadline well above the database time-out: an outage must answer, not hang.
CALL_TIMEOUT = 15.0
POLL_SECONDS = 0.05


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[PrivatePostgres]:
    """A running private PostgreSQL cluster with the schema migrated, deleted afterwards."""
    reason = private_postgres.available()
    if reason is not None:
        pytest.skip(reason)
    with private_postgres.running() as pg:
        completed = subprocess.run(
            [sys.executable, "-m", "service", "migrate"],
            cwd=PROJECT_ROOT,
            env=_environment(pg, {}),
            capture_output=True,
            text=True,
            check=False,
        )
        assert completed.returncode == 0, completed.stdout + completed.stderr
        yield pg


def _environment(pg: PrivatePostgres, settings: dict[str, str]) -> dict[str, str]:
    """The environment of a server process on the private cluster, with the given settings."""
    return Backend("postgres", pg.url, None).environment(settings)


@dataclass
class Replica:
    """A server process and stubs on a channel to it."""

    process: ServerProcess
    channel: grpc.aio.Channel

    @property
    def organizations(self) -> organization_pb2_grpc.OrganizationServiceStub:
        """OrganizationService on this replica."""
        return organization_pb2_grpc.OrganizationServiceStub(self.channel)

    @property
    def environments(self) -> environment_pb2_grpc.EnvironmentServiceStub:
        """EnvironmentService on this replica."""
        return environment_pb2_grpc.EnvironmentServiceStub(self.channel)

    @property
    def api_keys(self) -> api_key_pb2_grpc.ApiKeyServiceStub:
        """ApiKeyService on this replica."""
        return api_key_pb2_grpc.ApiKeyServiceStub(self.channel)

    async def health(self) -> int:
        """The server's overall health status."""
        response = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
        )
        return int(response.status)

    async def verify(self, secret: str) -> api_key_pb2.VerifyApiKeyResponse:
        """VerifyApiKey for the secret, in any environment it may use."""
        response: api_key_pb2.VerifyApiKeyResponse = await self.api_keys.VerifyApiKey(
            api_key_pb2.VerifyApiKeyRequest(secret=secret), timeout=CALL_TIMEOUT
        )
        return response


@pytest.fixture
async def replicas(
    cluster: PrivatePostgres, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    """Starts server processes on the private cluster; all are stopped at the end."""
    started: list[Replica] = []

    async def start(name: str, **settings: str) -> Replica:
        port = free_port()
        values = {
            "AGENTPOST_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "AGENTPOST_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "AGENTPOST_CACHE_REFRESH_SECONDS": str(REFRESH_SECONDS),
            "AGENTPOST_DATABASE_TIMEOUT_SECONDS": str(DATABASE_TIMEOUT_SECONDS),
            "AGENTPOST_SHUTDOWN_GRACE_SECONDS": "1",
            **settings,
        }
        log_path = tmp_path / f"{name}.log"
        with log_path.open("wb") as log:
            process = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, "-m", "service", "serve"],
                cwd=PROJECT_ROOT,
                env=_environment(cluster, values),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = ServerProcess(name, process, port, log_path)
        replica = Replica(server, grpc.aio.insecure_channel(server.address))
        started.append(replica)
        await server.wait_ready(health_serving)
        return replica

    try:
        yield start
    finally:
        for replica in started:
            await replica.channel.close()
            replica.process.stop()


async def stop_database(pg: PrivatePostgres, mode: str = "immediate") -> float:
    """Stops the cluster, by default as a crash would (every connection dropped at once; `fast`
    terminates sessions with AdminShutdown first); returns when the stop began: the server may
    refuse connections before `pg_ctl` returns."""
    began = time.monotonic()
    await asyncio.to_thread(pg.stop, mode)
    return began


async def start_database(pg: PrivatePostgres) -> float:
    """Starts the cluster again; returns when it accepts connections."""
    await asyncio.to_thread(pg.start)
    return time.monotonic()


async def until(condition: Callable[[], Awaitable[bool]], bound: float, what: str) -> float:
    """Waits until `condition()` holds, at most `bound` seconds; returns how long it took."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < bound, f"{what}: not within {bound:.0f} s"
        await asyncio.sleep(POLL_SECONDS)
    return time.monotonic() - started
