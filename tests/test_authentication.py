"""The interceptor: credentials, the operator token, request ids and undecodable requests."""

from __future__ import annotations

import logging
import uuid

import grpc
import pytest
from agentpost.environments.v1 import environment_pb2, organization_pb2

from service.domain import keys, scopes
from service.domain.models import KeyMode
from tests.harness import AS_OPERATOR, Harness, Org, auth, corrupt, fails, failure_of
from tests.servers import Backend, serving

Code = grpc.StatusCode
LIST = environment_pb2.ListEnvironmentsRequest()


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "CREDENTIALS_MISSING"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "CREDENTIALS_MALFORMED"),
        ((("authorization", "Bearer"),), "CREDENTIALS_MALFORMED"),
        ((("authorization", "Bearer not-a-key"),), "API_KEY_MALFORMED"),
        ((("authorization", "Bearer ap_sk_live_"),), "API_KEY_MALFORMED"),
        ((("authorization", "Bearer " + "ap_sk_test_" + "a" * 38),), "API_KEY_MALFORMED"),
    ],
)
async def test_bad_credentials_are_unauthenticated(
    harness: Harness, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    await fails(harness.environments.ListEnvironments(LIST, metadata=metadata), Code.UNAUTHENTICATED, reason)


async def test_checksum_corruption_is_malformed(harness: Harness, org: Org) -> None:
    await fails(
        harness.environments.ListEnvironments(LIST, metadata=auth(corrupt(org.owner_secret, 15))),
        Code.UNAUTHENTICATED,
        "API_KEY_MALFORMED",
    )


async def test_well_formed_unknown_key_is_not_found(harness: Harness) -> None:
    unknown = keys.generate(KeyMode.LIVE).secret
    await fails(
        harness.environments.ListEnvironments(LIST, metadata=auth(unknown)),
        Code.UNAUTHENTICATED,
        "API_KEY_NOT_FOUND",
    )


async def test_scheme_is_case_insensitive(harness: Harness, org: Org) -> None:
    listed = await harness.environments.ListEnvironments(
        LIST, metadata=(("authorization", f"bearer {org.owner_secret}"),)
    )
    assert len(listed.environments) == 1


async def test_request_id_is_echoed_on_success_and_failure(harness: Harness, org: Org) -> None:
    call = harness.environments.ListEnvironments(LIST, metadata=auth(org.owner_secret, request_id="req-123"))
    await call
    assert ("x-request-id", "req-123") in tuple(await call.trailing_metadata())
    failure = await fails(
        harness.environments.ListEnvironments(LIST, metadata=(("x-request-id", "req-456"),)),
        Code.UNAUTHENTICATED,
    )
    assert failure.trailers.get("x-request-id") == "req-456"


async def test_log_lines_carry_the_request_id(
    harness: Harness, org: Org, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    await fails(
        harness.environments.GetEnvironment(
            environment_pb2.GetEnvironmentRequest(id="env_01HZZZZZZZZZZZZZZZZZZZZZZZ"),
            metadata=auth(org.owner_secret, request_id="req-log-1"),
        ),
        Code.NOT_FOUND,
    )
    refused = [record for record in caplog.records if "ENVIRONMENT_NOT_FOUND" in record.getMessage()]
    assert refused and all(getattr(record, "request_id", None) == "req-log-1" for record in refused)


async def test_undecodable_request_is_invalid_argument(harness: Harness, org: Org) -> None:
    call = harness.channel.unary_unary(
        "/agentpost.environments.v1.EnvironmentService/CreateEnvironment",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"\xff\xff\xff\xff", metadata=auth(org.owner_secret))
    failure = failure_of(raised.value)
    assert failure.code == Code.INVALID_ARGUMENT and failure.reason == "MALFORMED_REQUEST"
    assert "request" in failure.violations


async def test_invalid_utf8_in_a_string_field_is_invalid_argument(harness: Harness, org: Org) -> None:
    call = harness.channel.unary_unary(
        "/agentpost.environments.v1.EnvironmentService/CreateEnvironment",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    # field 1 (name), wire type 2, length 2, bytes that are not UTF-8
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"\x0a\x02\xc3\x28", metadata=auth(org.owner_secret))
    assert failure_of(raised.value).code == Code.INVALID_ARGUMENT


async def test_unknown_method_is_unimplemented(harness: Harness, org: Org) -> None:
    call = harness.channel.unary_unary(
        "/agentpost.environments.v1.EnvironmentService/DropEverything",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"", metadata=auth(org.owner_secret))
    assert raised.value.code() == Code.UNIMPLEMENTED


def _create_org_request(**overrides: str) -> organization_pb2.CreateOrganizationRequest:
    fields = {"name": "Acme", "owner_email": "owner@example.com", "owner_display_name": "Owner"}
    fields.update(overrides)
    return organization_pb2.CreateOrganizationRequest(**fields)


async def test_create_organization_makes_everything_at_once(harness: Harness) -> None:
    created = await harness.organizations.CreateOrganization(_create_org_request(), metadata=AS_OPERATOR)
    assert created.organization.id.startswith("org_") and created.organization.name == "Acme"
    env = created.default_environment
    assert (env.name, env.slug, env.is_default, env.organization_id) == (
        "Default",
        "default",
        True,
        created.organization.id,
    )
    assert created.owner.role == created.owner.OWNER and created.owner.email == "owner@example.com"
    key = created.owner_api_key
    assert key.owner_member_id == created.owner.id and list(key.environment_ids) == []
    assert (
        sorted(key.scopes) == sorted(scopes.ALL_SCOPES)
        and "events:read" in key.scopes
        and key.state == key.ACTIVE
    )
    assert created.owner_api_key_secret.startswith(key.prefix) and len(key.prefix) == 12
    got = await harness.whoami(created.owner_api_key_secret)
    assert got == created.organization


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "tab\tname"}, "name"),
        ({"owner_email": ""}, "owner_email"),
        ({"owner_email": "not-an-email"}, "owner_email"),
        ({"owner_display_name": "y" * 101}, "owner_display_name"),
        ({"request_id": "123"}, "request_id"),
    ],
)
async def test_create_organization_rejects_bad_input(
    harness: Harness, overrides: dict[str, str], field: str
) -> None:
    failure = await fails(
        harness.organizations.CreateOrganization(_create_org_request(**overrides), metadata=AS_OPERATOR),
        Code.INVALID_ARGUMENT,
    )
    assert field in failure.violations


async def test_create_organization_retry_is_a_duplicate_request(harness: Harness) -> None:
    request = _create_org_request(request_id=str(uuid.uuid4()))
    first = await harness.organizations.CreateOrganization(request, metadata=AS_OPERATOR)
    failure = await fails(
        harness.organizations.CreateOrganization(request, metadata=AS_OPERATOR),
        Code.ALREADY_EXISTS,
        "DUPLICATE_REQUEST",
    )
    assert failure.metadata == {"organizationId": first.organization.id}


async def test_create_organization_needs_the_operator_token(harness: Harness, org: Org) -> None:
    await fails(
        harness.organizations.CreateOrganization(
            _create_org_request(), metadata=(("authorization", "Bearer wrong"),)
        ),
        Code.UNAUTHENTICATED,
        "OPERATOR_TOKEN_INVALID",
    )
    await fails(
        harness.organizations.CreateOrganization(_create_org_request(), metadata=auth(org.owner_secret)),
        Code.UNAUTHENTICATED,
        "OPERATOR_TOKEN_INVALID",
    )
    await fails(
        harness.organizations.CreateOrganization(_create_org_request()),
        Code.UNAUTHENTICATED,
        "CREDENTIALS_MISSING",
    )


async def test_operator_token_does_not_work_as_an_api_key(harness: Harness) -> None:
    await fails(
        harness.environments.ListEnvironments(LIST, metadata=AS_OPERATOR),
        Code.UNAUTHENTICATED,
        "API_KEY_MALFORMED",
    )


async def test_without_an_operator_token_create_organization_is_refused(backend: Backend) -> None:
    async with serving(backend, operator_token=None) as server:
        await fails(
            server.organizations.CreateOrganization(
                _create_org_request(), metadata=(("authorization", "Bearer anything"),)
            ),
            Code.PERMISSION_DENIED,
            "OPERATOR_TOKEN_NOT_CONFIGURED",
        )
