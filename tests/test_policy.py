"""The policy table fails closed: every RPC has a rule, and a method without one is refused."""

from __future__ import annotations

from typing import Any

import grpc
from agentpost.environments.v1 import (
    api_key_pb2,
    environment_pb2,
    event_pb2,
    member_pb2,
    organization_pb2,
    resource_pb2,
)
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from service.app.server import Application
from service.domain.policy import POLICY, Level
from tests.harness import Harness, Org, auth, fails
from tests.servers import Backend

CONTRACT_FILES = (organization_pb2, environment_pb2, member_pb2, api_key_pb2, resource_pb2, event_pb2)


def _methods(*files: object) -> set[str]:
    names: set[str] = set()
    for module in files:
        descriptor = module.DESCRIPTOR  # type: ignore[attr-defined]
        for service in descriptor.services_by_name.values():
            names.update(f"/{service.full_name}/{method.name}" for method in service.methods)
    return names


def test_every_rpc_of_every_service_has_a_rule() -> None:
    served = _methods(*CONTRACT_FILES, health_pb2, reflection_pb2)
    missing = sorted(name for name in served if name not in POLICY)
    assert missing == []


def test_every_rule_names_a_real_method() -> None:
    served = _methods(*CONTRACT_FILES, health_pb2, reflection_pb2) | {
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.health.v1.Health/List",
    }
    assert sorted(set(POLICY) - served) == []


def test_only_standard_services_are_public_and_verification_has_its_own_level() -> None:
    public = sorted(name for name, rule in POLICY.items() if rule.level is Level.PUBLIC)
    assert all(name.startswith("/grpc.") for name in public)
    verifier = [name for name, rule in POLICY.items() if rule.level is Level.VERIFIER]
    assert verifier == ["/agentpost.environments.v1.ApiKeyService/VerifyApiKey"]
    operator = [name for name, rule in POLICY.items() if rule.level is Level.OPERATOR]
    assert operator == ["/agentpost.environments.v1.OrganizationService/CreateOrganization"]


def test_every_contract_rpc_but_public_ones_needs_a_scope_or_is_harmless() -> None:
    no_scope = sorted(
        name
        for name in _methods(*CONTRACT_FILES)
        if POLICY[name].level not in (Level.PUBLIC, Level.VERIFIER, Level.OPERATOR)
        and POLICY[name].scope is None
        and POLICY[name].resource_access is None
    )
    # GetOrganization only returns the caller's own organization's id, name and creation time.
    assert no_scope == ["/agentpost.environments.v1.OrganizationService/GetOrganization"]


async def test_a_method_without_a_rule_is_refused(backend: Backend, harness: Harness, org: Org) -> None:
    calls: list[bytes] = []

    async def unlisted(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        calls.append(request)
        return request

    app = Application(backend.settings())  # the shared server already migrated this database
    app.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "agentpost.environments.v1.Unlisted",
                {"Call": grpc.unary_unary_rpc_method_handler(unlisted)},
            ),
        )
    )
    await app.start()
    other = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        method = other.unary_unary(
            "/agentpost.environments.v1.Unlisted/Call",
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )
        await fails(
            method(b"x", metadata=auth(org.owner_secret)),
            grpc.StatusCode.PERMISSION_DENIED,
            "METHOD_NOT_ALLOWED",
        )
        assert calls == []
    finally:
        await other.close()
        await app.stop(grace=0)


async def test_a_streaming_method_without_a_rule_is_refused(
    backend: Backend, harness: Harness, org: Org
) -> None:
    calls: list[bytes] = []

    async def unlisted(request: bytes, _context: grpc.aio.ServicerContext) -> Any:
        calls.append(request)
        yield request

    app = Application(backend.settings())
    app.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "agentpost.environments.v1.Unlisted",
                {"Stream": grpc.unary_stream_rpc_method_handler(unlisted)},
            ),
        )
    )
    await app.start()
    other = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        method = other.unary_stream(
            "/agentpost.environments.v1.Unlisted/Stream",
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )

        async def first() -> Any:
            async for response in method(b"x", metadata=auth(org.owner_secret)):
                return response
            return None

        failure = await fails(first(), grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")
        assert failure.trailers.get("x-request-id")
        assert calls == []
    finally:
        await other.close()
        await app.stop(grace=0)
