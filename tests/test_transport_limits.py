"""Refusals made by the gRPC runtime before the service sees a call: oversized metadata and
messages, unknown methods. Each always gets the same answer; these are the README's documented
exceptions, the only errors without an ErrorInfo."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from agentpost.environments.v1 import environment_pb2, environment_pb2_grpc

from service.app.server import MAX_MESSAGE_BYTES
from service.transport.interceptor import MAX_METADATA_BYTES
from tests.harness import Failure, Harness, Org, auth, fails, failure_of

ATTEMPTS = 20


async def _refused(call: Any) -> Failure:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return failure_of(error)
    raise AssertionError("the call succeeded")


async def _refused_every_time(make_call: Callable[[], Awaitable[Any]]) -> set[tuple[grpc.StatusCode, str]]:
    """The distinct (code, ErrorInfo reason) answers to ATTEMPTS identical calls, made at once
    (the runtime takes about 0.1 s to answer each of these refusals)."""
    failures = await asyncio.gather(*(_refused(make_call()) for _ in range(ATTEMPTS)))
    return {(failure.code, failure.reason) for failure in failures}


async def test_a_large_authorization_header_always_gets_the_same_answer(harness: Harness) -> None:
    # Under gRPC's default limits these sizes fell between the soft and the hard limit and were
    # refused at random: RESOURCE_EXHAUSTED on some attempts, UNAUTHENTICATED on the others.
    for size in (10_000, 15_000):
        for _ in range(ATTEMPTS):
            await fails(
                harness.environments.ListEnvironments(
                    environment_pb2.ListEnvironmentsRequest(), metadata=auth("x" * size)
                ),
                grpc.StatusCode.UNAUTHENTICATED,
                "API_KEY_MALFORMED",
            )


async def test_a_valid_key_with_large_metadata_is_always_served(harness: Harness, org: Org) -> None:
    padding = ("x-trace-baggage", "b" * 12_000)
    for _ in range(ATTEMPTS):
        listed = await harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(), metadata=(*auth(org.owner_secret), padding)
        )
        assert [environment.slug for environment in listed.environments] == ["default"]


async def test_metadata_over_the_limit_is_always_resource_exhausted(harness: Harness, org: Org) -> None:
    request = environment_pb2.ListEnvironmentsRequest()
    # A channel of its own: the runtime may end a connection that sent oversized metadata
    # (GOAWAY), which must not fail the next test's calls on the shared channel.
    async with grpc.aio.insecure_channel(harness.address) as channel:
        environments = environment_pb2_grpc.EnvironmentServiceStub(channel)
        for metadata in (
            auth("x" * MAX_METADATA_BYTES),
            auth("x" * 20_000),
            (*auth(org.owner_secret), ("x-trace-baggage", "b" * 20_000)),
        ):
            answers = await _refused_every_time(
                functools.partial(environments.ListEnvironments, request, metadata=metadata)
            )
            # Refused by the gRPC runtime before the service sees the call: no ErrorInfo, as the
            # README's documented exceptions say.
            assert answers == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "")}


async def test_a_message_over_4_mib_is_always_resource_exhausted(harness: Harness, org: Org) -> None:
    too_large = environment_pb2.ListEnvironmentsRequest(page_token="t" * MAX_MESSAGE_BYTES)
    assert too_large.ByteSize() > MAX_MESSAGE_BYTES
    async with grpc.aio.insecure_channel(harness.address) as channel:
        environments = environment_pb2_grpc.EnvironmentServiceStub(channel)
        answers = await _refused_every_time(
            lambda: environments.ListEnvironments(too_large, metadata=auth(org.owner_secret))
        )
    assert answers == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "")}
    # Just under the limit the service itself answers, with its own error vocabulary.
    just_under = environment_pb2.ListEnvironmentsRequest(page_token="t" * (MAX_MESSAGE_BYTES - 64))
    assert just_under.ByteSize() <= MAX_MESSAGE_BYTES
    await fails(
        harness.environments.ListEnvironments(just_under, metadata=auth(org.owner_secret)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_an_unknown_method_is_always_unimplemented(harness: Harness, org: Org) -> None:
    for path in (
        "/agentpost.environments.v1.EnvironmentService/NoSuchMethod",
        "/agentpost.environments.v1.NoSuchService/ListEnvironments",
    ):
        method = harness.channel.unary_unary(
            path, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        for metadata in ((), auth(org.owner_secret), auth("not a key")):
            for _ in range(3):
                failure = await _refused(method(b"", metadata=metadata))
                assert failure.code == grpc.StatusCode.UNIMPLEMENTED, failure
                assert failure.reason == ""
