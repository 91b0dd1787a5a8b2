"""Verifier tokens (SPEC §7): with AGENTPOST_VERIFIER_TOKENS set, VerifyApiKey needs one of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2, environment_pb2

from tests.empty_database import empty_database
from tests.harness import OPERATOR_TOKEN, Harness, Org, auth, fails
from tests.servers import Backend, start_server

Code = grpc.StatusCode
TOKENS = ("verifier-token-alpha", "verifier-token-beta")


async def _harness(
    backend: Backend, folder: Path, verifier_tokens: str, **settings: object
) -> AsyncIterator[Harness]:
    # A database of its own: other tests' servers come and go on the shared one.
    async with empty_database(backend, folder) as database:
        app, channel = await start_server(database, verifier_tokens=verifier_tokens, **settings)
        try:
            yield Harness(app, channel, backend.name)
        finally:
            await channel.close()
            await app.stop(grace=0)


@pytest.fixture
async def guarded(backend: Backend, tmp_path: Path) -> AsyncIterator[Harness]:
    """A server of its own whose VerifyApiKey needs one of TOKENS."""
    async for harness in _harness(backend, tmp_path, ",".join(TOKENS)):
        yield harness


def _request(secret: str) -> api_key_pb2.VerifyApiKeyRequest:
    return api_key_pb2.VerifyApiKeyRequest(secret=secret, environment="default")


async def test_verify_needs_one_of_the_configured_tokens(guarded: Harness) -> None:
    org = await guarded.new_org()
    for metadata in (
        (),
        (("authorization", "Bearer verifier-token-gamma"),),
        (("authorization", f"Bearer {TOKENS[0]}x"),),
        (("authorization", f"Bearer {TOKENS[0][:-1]}"),),
        (("authorization", TOKENS[0]),),
        (("authorization", f"Basic {TOKENS[0]}"),),
        # Neither an API key nor the operator token stands in for a verifier token.
        auth(org.owner_secret),
        (("authorization", f"Bearer {OPERATOR_TOKEN}"),),
        # Two authorization entries are refused whatever they hold.
        (("authorization", f"Bearer {TOKENS[0]}"), ("authorization", f"Bearer {TOKENS[1]}")),
    ):
        await fails(
            guarded.api_keys.VerifyApiKey(_request(org.owner_secret), metadata=metadata),
            Code.UNAUTHENTICATED,
            "VERIFIER_TOKEN_REQUIRED",
        )
    for token in TOKENS:
        answer = await guarded.api_keys.VerifyApiKey(
            _request(org.owner_secret), metadata=(("authorization", f"bearer  {token} "),)
        )
        assert answer.valid and answer.principal.organization_id == org.id
    # Other calls still take API keys, not verifier tokens.
    listed = await guarded.environments.ListEnvironments(
        environment_pb2.ListEnvironmentsRequest(), metadata=auth(org.owner_secret)
    )
    assert [env.slug for env in listed.environments] == ["default"]
    await fails(
        guarded.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(), metadata=(("authorization", f"Bearer {TOKENS[0]}"),)
        ),
        Code.UNAUTHENTICATED,
        "API_KEY_MALFORMED",
    )


async def test_tokens_can_come_from_a_file(backend: Backend, tmp_path: Path) -> None:
    token_file = tmp_path / "verifier-tokens"
    token_file.write_text("first-token\n\nsecond-token\n")
    async for harness in _harness(backend, tmp_path, f"@{token_file}"):
        org = await harness.new_org()
        answer = await harness.api_keys.VerifyApiKey(
            _request(org.owner_secret), metadata=(("authorization", "Bearer second-token"),)
        )
        assert answer.valid
        await fails(
            harness.api_keys.VerifyApiKey(
                _request(org.owner_secret), metadata=(("authorization", "Bearer @x"),)
            ),
            Code.UNAUTHENTICATED,
            "VERIFIER_TOKEN_REQUIRED",
        )


async def test_refused_verifier_tokens_are_throttled(backend: Backend, tmp_path: Path) -> None:
    async for harness in _harness(backend, tmp_path, TOKENS[0], auth_failures_per_minute=3):
        org = await harness.new_org()
        for _ in range(3):
            await fails(
                harness.api_keys.VerifyApiKey(_request(org.owner_secret)),
                Code.UNAUTHENTICATED,
                "VERIFIER_TOKEN_REQUIRED",
            )
        await fails(
            harness.api_keys.VerifyApiKey(_request(org.owner_secret)),
            Code.RESOURCE_EXHAUSTED,
            "TOO_MANY_AUTH_FAILURES",
        )
        # The right token still verifies from the throttled peer.
        answer = await harness.api_keys.VerifyApiKey(
            _request(org.owner_secret), metadata=(("authorization", f"Bearer {TOKENS[0]}"),)
        )
        assert answer.valid


async def test_without_tokens_verify_is_open(harness: Harness, org: Org) -> None:
    assert harness.app.settings.verifier_tokens is None
    answer = await harness.api_keys.VerifyApiKey(_request(org.owner_secret))
    assert answer.valid
