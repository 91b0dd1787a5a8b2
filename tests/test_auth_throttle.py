"""Failed-authentication throttling per peer (SPEC §7), against the real server, and the
throttle's bounded memory."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2, environment_pb2, organization_pb2
from google.rpc import error_details_pb2, status_pb2

from service.application.key_directory import MIN_PASS_GAP_SECONDS
from service.domain import keys
from service.domain.errors import ResourceExhausted, Unauthenticated
from service.domain.models import KeyMode
from service.transport.throttle import AuthFailureThrottle, peer_address
from tests.empty_database import empty_database
from tests.harness import OPERATOR_TOKEN, Failure, Harness, auth, fails
from tests.servers import Backend, start_server
from tests.statements import counted_sql

Code = grpc.StatusCode
LIMIT = 5
LIST = environment_pb2.ListEnvironmentsRequest()


@pytest.fixture
async def throttled(backend: Backend, tmp_path: Path) -> AsyncIterator[Harness]:
    """A server and database of its own that allows 5 refused credentials a minute."""
    async with empty_database(backend, tmp_path) as database:
        app, channel = await start_server(database, auth_failures_per_minute=LIMIT)
        try:
            yield Harness(app, channel, backend.name)
        finally:
            await channel.close()
            await app.stop(grace=0)


def _unknown_secret() -> str:
    """Well formed, with a valid checksum, and no such key: the kind that costs a lookup."""
    return keys.generate(KeyMode.LIVE).secret


def _retry_delay(failure: Failure) -> float:
    status = status_pb2.Status.FromString(failure.trailers["grpc-status-details-bin"])
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo in the status")


async def _exhaust(harness: Harness) -> None:
    """Sends exactly LIMIT refused credentials, each still UNAUTHENTICATED."""
    for _ in range(LIMIT):
        await fails(
            harness.environments.ListEnvironments(LIST, metadata=auth(_unknown_secret())),
            Code.UNAUTHENTICATED,
            "API_KEY_NOT_FOUND",
        )


async def test_past_the_limit_refusals_are_resource_exhausted_with_retry_info(throttled: Harness) -> None:
    org = await throttled.new_org()
    await _exhaust(throttled)
    failure = await fails(
        throttled.environments.ListEnvironments(LIST, metadata=auth(_unknown_secret())),
        Code.RESOURCE_EXHAUSTED,
        "TOO_MANY_AUTH_FAILURES",
    )
    assert 0 < _retry_delay(failure) <= 60
    # Malformed credentials and a missing one count too, and are throttled the same way.
    await fails(
        throttled.environments.ListEnvironments(LIST, metadata=auth("nope")),
        Code.RESOURCE_EXHAUSTED,
        "TOO_MANY_AUTH_FAILURES",
    )
    # A valid key from the same peer is unaffected: one already used, and one just made here.
    listed = await throttled.environments.ListEnvironments(LIST, metadata=auth(org.owner_secret))
    assert [env.slug for env in listed.environments] == ["default"]
    _, fresh_secret = await throttled.new_key(org, ["environments:read"])
    listed = await throttled.environments.ListEnvironments(LIST, metadata=auth(fresh_secret))
    assert [env.slug for env in listed.environments] == ["default"]


async def test_a_known_key_is_looked_up_again_for_a_throttled_peer_after_its_cache_entry_went(
    throttled: Harness,
) -> None:
    org = await throttled.new_org()
    _, secret = await throttled.new_key(org, ["environments:read"])
    assert await throttled.environments.ListEnvironments(LIST, metadata=auth(secret))
    await _exhaust(throttled)
    # A write to the organization drops its keys from the cache; the key must still work.
    await throttled.new_environment(org, "Staging")
    listed = await throttled.environments.ListEnvironments(LIST, metadata=auth(secret))
    assert sorted(env.slug for env in listed.environments) == ["default", "staging"]


async def test_a_throttled_peer_s_unknown_secrets_are_never_looked_up(throttled: Harness) -> None:
    await _exhaust(throttled)
    # The refusal that crosses the limit was looked up; from then on nothing unknown is.
    await fails(
        throttled.environments.ListEnvironments(LIST, metadata=auth(_unknown_secret())),
        Code.RESOURCE_EXHAUSTED,
        "TOO_MANY_AUTH_FAILURES",
    )
    # 40 callers at once: they share the directory's passes (one every 0.1 s at most, each a
    # read of the keys made lately), and no unknown secret is ever looked up.
    with counted_sql(throttled, background=True) as statements:
        started = time.monotonic()
        await asyncio.gather(
            *(
                fails(
                    throttled.environments.ListEnvironments(LIST, metadata=auth(_unknown_secret())),
                    Code.RESOURCE_EXHAUSTED,
                    "TOO_MANY_AUTH_FAILURES",
                )
                for _ in range(40)
            )
        )
        elapsed = time.monotonic() - started
    assert not [statement for statement in statements if "secret_hash =" in statement], statements
    passes = [
        statement
        for statement in statements
        if "FROM api_keys" in statement and "secret_hash =" not in statement
    ]
    assert 1 <= len(passes) <= elapsed / MIN_PASS_GAP_SECONDS + 2, (len(passes), elapsed)


async def test_verify_api_key_denials_are_answers_and_are_not_counted(throttled: Harness) -> None:
    for _ in range(3 * LIMIT):
        answer = await throttled.api_keys.VerifyApiKey(
            api_key_pb2.VerifyApiKeyRequest(secret=_unknown_secret())
        )
        assert not answer.valid
        assert answer.denial_reason == api_key_pb2.VerifyApiKeyResponse.DenialReason.NOT_FOUND
    # The peer has not been throttled: its next refused credential is still UNAUTHENTICATED.
    await fails(
        throttled.environments.ListEnvironments(LIST, metadata=auth(_unknown_secret())),
        Code.UNAUTHENTICATED,
        "API_KEY_NOT_FOUND",
    )


async def test_wrong_operator_tokens_are_throttled(throttled: Harness) -> None:
    request = organization_pb2.CreateOrganizationRequest(
        name="Guess", owner_email="guess@example.com", owner_display_name="G"
    )
    for attempt in range(LIMIT):
        await fails(
            throttled.organizations.CreateOrganization(
                request, metadata=(("authorization", f"Bearer guess-{attempt}"),)
            ),
            Code.UNAUTHENTICATED,
            "OPERATOR_TOKEN_INVALID",
        )
    await fails(
        throttled.organizations.CreateOrganization(request, metadata=(("authorization", "Bearer guess-x"),)),
        Code.RESOURCE_EXHAUSTED,
        "TOO_MANY_AUTH_FAILURES",
    )
    # The right token still works from the throttled peer.
    created = await throttled.organizations.CreateOrganization(
        request, metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),)
    )
    assert created.organization.name == "Guess"


async def test_refusals_are_logged_once_per_peer_and_window_with_the_peer_and_never_the_secret(
    throttled: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="service")
    secrets = [_unknown_secret() for _ in range(3 * LIMIT)]
    for secret in secrets:
        try:
            await throttled.environments.ListEnvironments(LIST, metadata=auth(secret))
        except grpc.aio.AioRpcError as error:
            assert error.code() in (Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED)
    lines = [record.getMessage() for record in caplog.records]
    refused = [line for line in lines if line.startswith("refused credentials from")]
    throttled_lines = [line for line in lines if "throttled for" in line]
    assert refused == [refused[0]] and "127.0.0.1" in refused[0] and "API_KEY_NOT_FOUND" in refused[0]
    assert len(throttled_lines) == 1 and "127.0.0.1" in throttled_lines[0]
    everything = "\n".join(lines)
    assert not any(secret in everything or secret[:20] in everything for secret in secrets)


# -- the throttle alone: windows, addresses and bounded memory ------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _refusal() -> Unauthenticated:
    return Unauthenticated("no such key", reason="API_KEY_NOT_FOUND")


def test_the_window_passes_and_the_peer_is_refused_normally_again() -> None:
    clock = _Clock()
    throttle = AuthFailureThrottle(2, clock=clock)
    assert [type(throttle.refused("10.0.0.1", _refusal())) for _ in range(3)] == [
        Unauthenticated,
        Unauthenticated,
        ResourceExhausted,
    ]
    clock.now += 45
    retry_after = throttle.retry_after("10.0.0.1")
    assert retry_after == pytest.approx(15)
    # Other peers are not affected by this one.
    assert throttle.retry_after("10.0.0.2") is None
    assert isinstance(throttle.refused("10.0.0.2", _refusal()), Unauthenticated)
    clock.now += 15
    assert throttle.retry_after("10.0.0.1") is None
    assert isinstance(throttle.refused("10.0.0.1", _refusal()), Unauthenticated)


def test_memory_stays_bounded_under_refusals_from_many_peers() -> None:
    clock = _Clock()
    throttle = AuthFailureThrottle(2, max_peers=1000, clock=clock)
    for number in range(50_000):
        throttle.refused(f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}", _refusal())
        clock.now += 0.0001
        assert len(throttle) <= 1000
    assert len(throttle) == 1000
    # Expired windows go first: after a minute, a new peer finds the table emptied of them.
    clock.now += 61
    throttle.refused("192.0.2.1", _refusal())
    assert len(throttle) == 1


def test_the_zero_limit_never_throttles() -> None:
    throttle = AuthFailureThrottle(0)
    assert all(isinstance(throttle.refused("10.0.0.1", _refusal()), Unauthenticated) for _ in range(500))
    assert throttle.retry_after("10.0.0.1") is None


def test_peer_addresses_drop_the_port_and_group_ipv6_by_64() -> None:
    assert peer_address("ipv4:127.0.0.1:54321") == peer_address("ipv4:127.0.0.1:1234") == "127.0.0.1"
    assert peer_address("ipv6:[2001:db8:1:2:3:4:5:6]:443") == "2001:db8:1:2::/64"
    assert peer_address("ipv6:[2001:db8:1:2::9]:1") == peer_address("ipv6:[2001:db8:1:2:3:4:5:6]:443")
    assert peer_address("unix:/tmp/socket") == "unix:/tmp/socket"
