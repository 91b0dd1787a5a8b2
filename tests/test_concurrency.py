"""Correct under concurrency across processes: two real server processes on one database
(PostgreSQL, and one SQLite file), hammered at once.

- 50 concurrent CreateEnvironment of one slug across both: exactly one succeeds, the others are
  ALREADY_EXISTS SLUG_TAKEN.
- RevokeApiKey racing VerifyApiKey on one replica: once the revoke is acknowledged, no answer
  accepts the key.
- Writes of two organizations interleaved across both replicas, whatever their commit order:
  each replica ends up showing every one of them.
- No "database is locked", serialization failure or deadlock reaches a client: every refusal in
  these runs is one of the expected codes with a reason.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import (
    api_key_pb2,
    api_key_pb2_grpc,
    environment_pb2,
    environment_pb2_grpc,
    organization_pb2,
    organization_pb2_grpc,
)

from tests.bench.processes import ServerProcess, health_serving, start_server
from tests.conftest import Backend
from tests.harness import OPERATOR_TOKEN, auth, failure_of


async def _replica(backend: Backend, name: str, log_dir: Path) -> ServerProcess:
    settings = {
        "AGENTPOST_DATABASE_URL": backend.url,
        "AGENTPOST_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "AGENTPOST_SHUTDOWN_DRAIN_SECONDS": "0",
        "AGENTPOST_LOG_LEVEL": "WARNING",
    }
    if backend.schema:
        settings["AGENTPOST_DATABASE_SCHEMA"] = backend.schema
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        return await start_server(
            name,
            lambda port: ["-m", "service", "serve", "--listen-address", f"127.0.0.1:{port}"],
            health_serving,
            log_dir,
        )
    finally:
        for variable, value in previous.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


@pytest.fixture
async def replicas(
    backend: Backend, harness: object, tmp_path: Path
) -> AsyncIterator[list[grpc.aio.Channel]]:
    """Two server processes on the backend's (already migrated) database, and a channel to each."""
    del harness  # the session server migrated the database
    servers = [await _replica(backend, f"replica-{letter}", tmp_path) for letter in "ab"]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") for server in servers]
    try:
        yield channels
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            server.stop()


async def _new_org(channel: grpc.aio.Channel, name: str) -> organization_pb2.CreateOrganizationResponse:
    response: organization_pb2.CreateOrganizationResponse = (
        await organization_pb2_grpc.OrganizationServiceStub(channel).CreateOrganization(
            organization_pb2.CreateOrganizationRequest(name=name, owner_email=f"{name.lower()}@example.com"),
            metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),),
        )
    )
    return response


async def test_one_slug_created_fifty_times_across_two_processes_wins_once(
    replicas: list[grpc.aio.Channel],
) -> None:
    org = await _new_org(replicas[0], "Race")
    stubs = [environment_pb2_grpc.EnvironmentServiceStub(channel) for channel in replicas]

    async def create(index: int) -> str:
        try:
            await stubs[index % 2].CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name=f"Staging {index}", slug="staging"),
                metadata=auth(org.owner_api_key_secret),
                timeout=30,
            )
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            return f"{failure.code.name} {failure.reason}"
        return "OK"

    outcomes = Counter(await asyncio.gather(*(create(index) for index in range(50))))
    assert outcomes == Counter({"OK": 1, "ALREADY_EXISTS SLUG_TAKEN": 49}), outcomes


async def _race_one_revoke(keys: api_key_pb2_grpc.ApiKeyServiceStub, owner_secret: str) -> int:
    """Revokes a fresh key while 8 callers verify it; how many verifications that started after
    the revoke was acknowledged still accepted the key."""
    created = await keys.CreateApiKey(
        api_key_pb2.CreateApiKeyRequest(name="raced", scopes=["inboxes:read"]), metadata=auth(owner_secret)
    )
    request = api_key_pb2.VerifyApiKeyRequest(secret=created.secret)
    acknowledged = asyncio.Event()
    accepted_after_ack = 0

    async def verify_until_refused() -> None:
        nonlocal accepted_after_ack
        for _ in range(400):
            started_after_ack = acknowledged.is_set()
            answer = await keys.VerifyApiKey(request)
            if started_after_ack and answer.valid:
                accepted_after_ack += 1
            if started_after_ack and not answer.valid:
                return

    async def revoke() -> None:
        await asyncio.sleep(0.01)
        await keys.RevokeApiKey(
            api_key_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=auth(owner_secret)
        )
        acknowledged.set()

    await asyncio.gather(revoke(), *(verify_until_refused() for _ in range(8)))
    return accepted_after_ack


async def test_a_revoke_races_verifications_and_wins_from_its_acknowledgement(
    replicas: list[grpc.aio.Channel],
) -> None:
    org = await _new_org(replicas[0], "Revoke")
    keys = api_key_pb2_grpc.ApiKeyServiceStub(replicas[0])
    for _ in range(5):
        assert await _race_one_revoke(keys, org.owner_api_key_secret) == 0


async def test_interleaved_writes_of_two_organizations_are_all_seen_by_both(
    replicas: list[grpc.aio.Channel],
) -> None:
    orgs = [await _new_org(replicas[0], name) for name in ("Left", "Right")]
    stubs = [environment_pb2_grpc.EnvironmentServiceStub(channel) for channel in replicas]
    refusals: Counter[str] = Counter()

    async def write(index: int) -> str | None:
        org = orgs[index % 2]
        try:
            created = await stubs[(index // 2) % 2].CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name=f"Env {index}"),
                metadata=auth(org.owner_api_key_secret),
                timeout=30,
            )
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            refusals[f"{failure.code.name} {failure.reason}"] += 1
            return None
        return str(created.id)

    created = [env_id for env_id in await asyncio.gather(*(write(index) for index in range(40))) if env_id]
    assert not refusals, f"writes were refused under contention: {refusals}"
    assert len(created) == 40
    for org in orgs:
        for channel in replicas:
            listed: set[str] = set()
            for _ in range(100):
                response = await environment_pb2_grpc.EnvironmentServiceStub(channel).ListEnvironments(
                    environment_pb2.ListEnvironmentsRequest(page_size=500),
                    metadata=auth(org.owner_api_key_secret),
                )
                listed = {environment.id for environment in response.environments}
                if len(listed) == 21:  # the default environment and its 20 writes
                    break
                await asyncio.sleep(0.05)
            assert len(listed) == 21, f"a replica shows {len(listed)} of 21 environments"
