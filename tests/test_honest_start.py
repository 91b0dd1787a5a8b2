"""An honest start (SPEC §7): NOT_SERVING until the schema is current and the database answered;
on an unmigrated database the server says how to fix it, refuses calls with a clear reason, and
serves as soon as someone migrates."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2, environment_pb2, organization_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app.server import Application
from service.domain import keys
from service.domain.models import KeyMode
from service.storage import migrate
from service.storage.database import build_engine
from tests.empty_database import empty_database
from tests.harness import OPERATOR_TOKEN, Harness, auth, fails
from tests.servers import Backend

Code = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FIX = "run `migrate` (or serve with `--migrate`)"


@pytest.fixture
async def empty(backend: Backend, tmp_path: Path) -> AsyncIterator[Backend]:
    """A database of the test's own with no schema."""
    async with empty_database(backend, tmp_path) as database:
        yield database


async def _migrate_as_the_operator(database: Backend, revision: str = "head") -> None:
    engine = build_engine(database.url, schema=database.schema)
    try:
        await migrate.upgrade(engine, revision)
    finally:
        await engine.dispose()


async def _health(channel: grpc.aio.Channel) -> int:
    checked = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(checked.status)


async def _until_health(channel: grpc.aio.Channel, status: int) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                if await _health(channel) == status:
                    return
            except grpc.aio.AioRpcError as error:
                assert error.code() == Code.UNAVAILABLE
            await asyncio.sleep(0.05)


async def test_an_unmigrated_database_is_not_serving_until_someone_migrates(
    empty: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    app = Application(empty.settings())
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    harness = Harness(app, channel, empty.name)
    try:
        assert await _health(channel) == NOT_SERVING
        assert any(FIX in record.getMessage() for record in caplog.records)
        failure = await fails(
            harness.api_keys.VerifyApiKey(
                api_key_pb2.VerifyApiKeyRequest(secret=keys.generate(KeyMode.LIVE).secret)
            ),
            Code.UNAVAILABLE,
            "DATABASE_NOT_MIGRATED",
        )
        assert "migrate" in failure.message
        await fails(
            harness.organizations.CreateOrganization(
                organization_pb2.CreateOrganizationRequest(
                    name="Early", owner_email="early@example.com", owner_display_name="E"
                ),
                metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),),
            ),
            Code.UNAVAILABLE,
            "DATABASE_NOT_MIGRATED",
        )
        # Health stays NOT_SERVING while nobody migrates.
        await asyncio.sleep(2 * app.access.refresh_interval)
        assert await _health(channel) == NOT_SERVING

        await _migrate_as_the_operator(empty)
        await _until_health(channel, SERVING)
        assert any("schema is current now" in record.getMessage() for record in caplog.records)
        org = await harness.new_org()
        await harness.new_environment(org, "Staging")
        # Paging works too: the page-token key was loaded once the schema was there.
        first = await harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=1), metadata=auth(org.owner_secret)
        )
        second = await harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=1, page_token=first.next_page_token),
            metadata=auth(org.owner_secret),
        )
        assert len(first.environments) == len(second.environments) == 1
        assert first.environments[0].id != second.environments[0].id
    finally:
        await channel.close()
        await app.stop(grace=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(database: Backend, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPOST_")}
    env["AGENTPOST_DATABASE_URL"] = database.url
    if database.schema is not None:
        env["AGENTPOST_DATABASE_SCHEMA"] = database.schema
    env["AGENTPOST_LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
    env["AGENTPOST_SHUTDOWN_DRAIN_SECONDS"] = "0"
    env["AGENTPOST_SHUTDOWN_GRACE_SECONDS"] = "1"
    return env


async def test_serve_on_an_outdated_schema_says_to_migrate_and_serves_once_migrate_ran(
    empty: Backend,
) -> None:
    await _migrate_as_the_operator(empty, "0001")
    port = _free_port()
    env = _environment(empty, port)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await process.stderr.readline()).decode()
                assert line, "the server exited"
                if FIX in line:
                    break
        assert "revision 0001" in line
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _until_health(channel, NOT_SERVING)
            migrating = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service", "migrate", env=env, stdout=asyncio.subprocess.PIPE
            )
            async with asyncio.timeout(60):
                stdout, _ = await migrating.communicate()
            assert migrating.returncode == 0 and b"newest schema" in stdout
            await _until_health(channel, SERVING)
    finally:
        process.terminate()
        async with asyncio.timeout(30):
            await process.communicate()
