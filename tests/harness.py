"""What the tests use to talk to a real server over gRPC: stubs, metadata, error inspection, and
the calls many tests make on the way to what they check."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from agentpost.environments.v1 import (
    api_key_pb2,
    api_key_pb2_grpc,
    environment_pb2,
    environment_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    member_pb2,
    member_pb2_grpc,
    organization_pb2,
    organization_pb2_grpc,
    resource_pb2_grpc,
)
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import select

from service.storage.tables import EventRow

T = TypeVar("T")

if TYPE_CHECKING:
    from service.app.server import Application

OPERATOR_TOKEN = "test-operator-token"
AS_OPERATOR = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)
ERROR_DOMAIN = "environments.agentpost.dev"


def auth(
    secret: str, environment: str | None = None, request_id: str | None = None
) -> tuple[tuple[str, str], ...]:
    """Call metadata for a key, optionally with an environment context and a request id."""
    metadata = [("authorization", f"Bearer {secret}")]
    if environment is not None:
        metadata.append(("x-agentpost-environment", environment))
    if request_id is not None:
        metadata.append(("x-request-id", request_id))
    return tuple(metadata)


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    """An update mask of `paths`."""
    return field_mask_pb2.FieldMask(paths=list(paths))


def stamp(when: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of `when`."""
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(when)
    return value


def corrupt(secret: str, position: int) -> str:
    """The secret with the character at `position` (negative counts from the end) changed: the
    same shape, but the checksum no longer matches."""
    index = position % len(secret)
    replacement = "A" if secret[index] != "A" else "B"
    return secret[:index] + replacement + secret[index + 1 :]


def body_of(secret: str) -> str:
    """The 32 random characters of a secret, without its mode and checksum."""
    return secret.rsplit("_", 1)[1][:32]


@dataclass
class Failure:
    """A failed call: code, ErrorInfo and field violations."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    violations: dict[str, str]
    trailers: dict[str, Any]


def failure_of(error: grpc.aio.AioRpcError) -> Failure:
    """Decodes the google.rpc.Status details of a failed call."""
    status = rpc_status.from_call(error)
    reason, domain, metadata, violations = "", "", {}, {}
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = {v.field: v.description for v in bad.field_violations}
    trailers = {key: value for key, value in (error.trailing_metadata() or ())}
    return Failure(error.code(), error.details() or "", reason, domain, metadata, violations, trailers)


async def fails(call: Awaitable[Any], code: grpc.StatusCode, reason: str | None = None) -> Failure:
    """Awaits a call that must fail with `code` (and `reason`); returns the decoded failure."""
    try:
        result = await call
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        assert failure.code == code, (
            f"expected {code}, got {failure.code}: {failure.reason} {failure.message}"
        )
        assert failure.domain == ERROR_DOMAIN or code == grpc.StatusCode.UNIMPLEMENTED
        if reason is not None:
            assert failure.reason == reason, (
                f"expected reason {reason}, got {failure.reason}: {failure.message}"
            )
        return failure
    raise AssertionError(f"expected {code} {reason or ''}, but the call succeeded: {result}")


async def every_page(fetch: Callable[[str], Awaitable[Any]], items: Callable[[Any], Iterable[T]]) -> list[T]:
    """What `items` takes from every page `fetch(page_token)` answers, in order, with repeats if
    any."""
    found: list[T] = []
    token = ""
    while True:
        page = await fetch(token)
        found.extend(items(page))
        token = page.next_page_token
        if not token:
            return found


async def every_event(
    stub: event_pb2_grpc.EventServiceStub,
    metadata: tuple[tuple[str, str], ...],
    page_size: int = 500,
    *,
    deadline: float | None = None,
    filters: dict[str, object] | None = None,
) -> list[event_pb2.Event]:
    """Every event the caller may list, page by page, newest first (each page within `deadline`
    seconds, if given)."""
    return await every_page(
        lambda token: stub.ListEvents(
            event_pb2.ListEventsRequest(page_size=page_size, page_token=token, **(filters or {})),  # type: ignore[arg-type]
            metadata=metadata,
            timeout=deadline,
        ),
        lambda page: page.events,
    )


async def create_organization(
    organizations: organization_pb2_grpc.OrganizationServiceStub,
    name: str = "Acme",
    call_timeout: float | None = None,
) -> organization_pb2.CreateOrganizationResponse:
    """CreateOrganization as the operator, with an owner whose email no other test uses."""
    response: organization_pb2.CreateOrganizationResponse = await organizations.CreateOrganization(
        organization_pb2.CreateOrganizationRequest(
            name=name, owner_email=f"owner-{uuid.uuid4().hex[:8]}@example.com", owner_display_name="Owner"
        ),
        metadata=AS_OPERATOR,
        timeout=call_timeout,
    )
    return response


@dataclass
class Org:
    """A fresh organization made through CreateOrganization, as the operator."""

    id: str
    owner_secret: str
    owner_member_id: str
    owner_key_id: str
    default_environment: environment_pb2.Environment


class Harness:
    """A running server and stubs on one channel."""

    def __init__(self, app: Application, channel: grpc.aio.Channel, backend: str) -> None:
        self.app = app
        self.channel = channel
        self.backend = backend
        self.organizations = organization_pb2_grpc.OrganizationServiceStub(channel)
        self.environments = environment_pb2_grpc.EnvironmentServiceStub(channel)
        self.members = member_pb2_grpc.MembershipServiceStub(channel)
        self.api_keys = api_key_pb2_grpc.ApiKeyServiceStub(channel)
        self.resources = resource_pb2_grpc.ResourceServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    @property
    def address(self) -> str:
        """host:port of the server."""
        return f"127.0.0.1:{self.app.port}"

    async def new_org(self, name: str = "Acme") -> Org:
        """Creates an organization and returns its owner's key and default environment."""
        response = await create_organization(self.organizations, name)
        return Org(
            id=response.organization.id,
            owner_secret=response.owner_api_key_secret,
            owner_member_id=response.owner.id,
            owner_key_id=response.owner_api_key.id,
            default_environment=response.default_environment,
        )

    async def new_environment(self, org: Org, name: str, slug: str = "") -> environment_pb2.Environment:
        """Creates an environment with the org owner's key."""
        env: environment_pb2.Environment = await self.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name=name, slug=slug), metadata=auth(org.owner_secret)
        )
        return env

    async def new_member(self, org: Org, role: str, email: str | None = None) -> member_pb2.Member:
        """Creates a member with the org owner's key (needs MembershipService)."""
        member: member_pb2.Member = await self.members.CreateMember(
            member_pb2.CreateMemberRequest(
                email=email or f"{role.lower()}-{uuid.uuid4().hex[:8]}@example.com",
                display_name=role.title(),
                role=role,
            ),
            metadata=auth(org.owner_secret),
        )
        return member

    async def new_key(
        self,
        org: Org,
        scopes: list[str],
        environment_ids: list[str] | None = None,
        owner_member_id: str = "",
        *,
        as_secret: str | None = None,
        name: str = "test key",
    ) -> tuple[api_key_pb2.ApiKey, str]:
        """Creates a key (with the org owner's key unless `as_secret`); returns it and its secret."""
        response = await self.api_keys.CreateApiKey(
            api_key_pb2.CreateApiKeyRequest(
                name=name,
                scopes=scopes,
                environment_ids=environment_ids or [],
                owner_member_id=owner_member_id,
            ),
            metadata=auth(as_secret or org.owner_secret),
        )
        return response.api_key, response.secret

    # The calls below are made as the key `secret`; each returns what the RPC returns.

    async def whoami(self, secret: str) -> organization_pb2.Organization:
        """GetOrganization: a call any usable key may make."""
        organization: organization_pb2.Organization = await self.organizations.GetOrganization(
            organization_pb2.GetOrganizationRequest(), metadata=auth(secret)
        )
        return organization

    async def verify(
        self, secret: str, environment: str = "", *required_scopes: str
    ) -> api_key_pb2.VerifyApiKeyResponse:
        """VerifyApiKey of `secret` in `environment` with `required_scopes`."""
        response: api_key_pb2.VerifyApiKeyResponse = await self.api_keys.VerifyApiKey(
            api_key_pb2.VerifyApiKeyRequest(
                secret=secret, environment=environment, required_scopes=list(required_scopes)
            )
        )
        return response

    async def delete_environment(
        self, secret: str, environment_id: str, etag: str = ""
    ) -> environment_pb2.Environment:
        """DeleteEnvironment as `secret`."""
        deleted: environment_pb2.Environment = await self.environments.DeleteEnvironment(
            environment_pb2.DeleteEnvironmentRequest(id=environment_id, etag=etag), metadata=auth(secret)
        )
        return deleted

    async def add_environment_member(
        self,
        secret: str,
        environment_id: str,
        member_id: str,
        role: member_pb2.EnvironmentMember.Role | str = member_pb2.EnvironmentMember.MEMBER,
    ) -> member_pb2.EnvironmentMember:
        """AddEnvironmentMember as `secret`, by default with the MEMBER role (an enum value or its name)."""
        added: member_pb2.EnvironmentMember = await self.members.AddEnvironmentMember(
            member_pb2.AddEnvironmentMemberRequest(
                environment_id=environment_id, member_id=member_id, role=role
            ),
            metadata=auth(secret),
        )
        return added

    async def update_member(self, secret: str, member: member_pb2.Member, *paths: str) -> member_pb2.Member:
        """UpdateMember as `secret`, with `paths` as the update mask."""
        updated: member_pb2.Member = await self.members.UpdateMember(
            member_pb2.UpdateMemberRequest(member=member, update_mask=mask(*paths)), metadata=auth(secret)
        )
        return updated

    async def update_key(self, secret: str, key: api_key_pb2.ApiKey, *paths: str) -> api_key_pb2.ApiKey:
        """UpdateApiKey as `secret`, with `paths` as the update mask."""
        updated: api_key_pb2.ApiKey = await self.api_keys.UpdateApiKey(
            api_key_pb2.UpdateApiKeyRequest(api_key=key, update_mask=mask(*paths)), metadata=auth(secret)
        )
        return updated


async def stored_events(harness: Harness, organization_id: str) -> list[EventRow]:
    """The organization's events as stored, in commit order (revision, then sequence)."""
    async with harness.app.engine.connect() as connection:
        rows = await connection.execute(
            select(EventRow)
            .where(EventRow.organization_id == organization_id)
            .order_by(EventRow.revision, EventRow.sequence)
        )
        return list(rows)  # type: ignore[arg-type]
