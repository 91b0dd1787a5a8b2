"""Two replicas on one database: a revoke on one is honoured by the other within the refresh bound."""

from __future__ import annotations

import asyncio
import time

import grpc
from agentpost.environments.v1 import api_key_pb2 as pb

from tests.harness import Harness, Org, auth
from tests.servers import Backend, serving

POLL_SECONDS = 0.05
BOUND_SECONDS = 3.0


async def usable(server: Harness, secret: str) -> bool:
    """True when the replica `server` accepts the key for an ordinary call."""
    try:
        await server.whoami(secret)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        return False
    return True


async def test_revoke_on_one_replica_reaches_the_other(harness: Harness, backend: Backend, org: Org) -> None:
    async with serving(backend) as replica_b:
        key, secret = await harness.new_key(org, ["inboxes:read"])
        # Warm the key on both replicas.
        assert await usable(harness, secret)
        assert await usable(replica_b, secret)
        assert (await replica_b.verify(secret)).valid

        await harness.api_keys.RevokeApiKey(
            pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
        )
        revoked_at = time.monotonic()
        assert not await usable(harness, secret)

        delay = None
        while time.monotonic() - revoked_at < BOUND_SECONDS:
            if not await usable(replica_b, secret):
                delay = time.monotonic() - revoked_at
                break
            await asyncio.sleep(POLL_SECONDS)
        assert delay is not None, f"replica B still accepted the revoked key after {BOUND_SECONDS} s"
        print(f"\n[{backend.name}] revoke seen by the other replica after {delay * 1000:.0f} ms")
        response = await replica_b.verify(secret)
        assert response.denial_reason == pb.VerifyApiKeyResponse.REVOKED


async def test_roll_on_one_replica_is_usable_on_the_other(
    harness: Harness, backend: Backend, org: Org
) -> None:
    async with serving(backend) as replica_b:
        key, secret = await harness.new_key(org, ["inboxes:read"])
        assert await usable(replica_b, secret)
        rolled = await harness.api_keys.RollApiKey(
            pb.RollApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
        )
        # The new key is unknown to B's cache, so B looks it up at once.
        assert await usable(replica_b, rolled.secret)
        deadline = time.monotonic() + BOUND_SECONDS
        while await usable(replica_b, secret):
            assert time.monotonic() < deadline, "replica B kept accepting the rolled-away key"
            await asyncio.sleep(POLL_SECONDS)
