"""Two replicas on one database: a revoke on one is honoured by the other within the refresh bound."""

from __future__ import annotations

import asyncio
import time

import grpc
from agentpost.environments.v1 import api_key_pb2 as pb
from agentpost.environments.v1 import api_key_pb2_grpc, organization_pb2, organization_pb2_grpc

from tests.conftest import Backend, start_server
from tests.harness import Harness, Org, auth

POLL_SECONDS = 0.05
BOUND_SECONDS = 3.0


async def usable(channel: grpc.aio.Channel, secret: str) -> bool:
    """True when the replica behind `channel` accepts the key for an ordinary call."""
    stub = organization_pb2_grpc.OrganizationServiceStub(channel)
    try:
        await stub.GetOrganization(organization_pb2.GetOrganizationRequest(), metadata=auth(secret))
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        return False
    return True


async def test_revoke_on_one_replica_reaches_the_other(harness: Harness, backend: Backend, org: Org) -> None:
    app_b, channel_b = await start_server(backend)
    try:
        key, secret = await harness.new_key(org, ["inboxes:read"])
        verify_b = api_key_pb2_grpc.ApiKeyServiceStub(channel_b)
        # Warm the key on both replicas.
        assert await usable(harness.channel, secret)
        assert await usable(channel_b, secret)
        assert (await verify_b.VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret))).valid

        await harness.api_keys.RevokeApiKey(
            pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
        )
        revoked_at = time.monotonic()
        assert not await usable(harness.channel, secret)

        delay = None
        while time.monotonic() - revoked_at < BOUND_SECONDS:
            if not await usable(channel_b, secret):
                delay = time.monotonic() - revoked_at
                break
            await asyncio.sleep(POLL_SECONDS)
        assert delay is not None, f"replica B still accepted the revoked key after {BOUND_SECONDS} s"
        print(f"\n[{backend.name}] revoke seen by the other replica after {delay * 1000:.0f} ms")
        response = await verify_b.VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret))
        assert response.denial_reason == pb.VerifyApiKeyResponse.REVOKED
    finally:
        await channel_b.close()
        await app_b.stop(grace=0)


async def test_roll_on_one_replica_is_usable_on_the_other(
    harness: Harness, backend: Backend, org: Org
) -> None:
    app_b, channel_b = await start_server(backend)
    try:
        key, secret = await harness.new_key(org, ["inboxes:read"])
        assert await usable(channel_b, secret)
        rolled = await harness.api_keys.RollApiKey(
            pb.RollApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
        )
        # The new key is unknown to B's cache, so B looks it up at once.
        assert await usable(channel_b, rolled.secret)
        deadline = time.monotonic() + BOUND_SECONDS
        while await usable(channel_b, secret):
            assert time.monotonic() < deadline, "replica B kept accepting the rolled-away key"
            await asyncio.sleep(POLL_SECONDS)
    finally:
        await channel_b.close()
        await app_b.stop(grace=0)
