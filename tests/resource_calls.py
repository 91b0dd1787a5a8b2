"""The resource RPCs as the resource-semantics attacks make them (calls not yet awaited, so that
they can be raised together), what Get, List and the event log show of a resource, and refusals
checked against what every refusal owes its caller (AIP-193) and decoded."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import environment_pb2 as env_pb
from agentpost.environments.v1 import event_pb2, event_pb2_grpc
from agentpost.environments.v1 import member_pb2 as mem_pb
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.harness import ERROR_DOMAIN, Harness, Org, auth, mask
from tests.writes import REVISION, revision_of, stored_revision

Code = grpc.StatusCode
UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
STATUS_DETAILS = "grpc-status-details-bin"
# Well-formed ids that name nothing.
RANDOM_ENV = "env_01J0000000000000000000000A"
RANDOM_MEMBER = "mem_01J0000000000000000000000A"
RANDOM_KEY = "key_01J0000000000000000000000A"


# -- refusals --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """What a refused call answered, decoded from its google.rpc.Status."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str]
    violations: dict[str, str]


def decoded(error: grpc.aio.AioRpcError) -> Refusal:
    """Checks what every refusal owes its caller (AIP-193) and decodes it: status details that
    parse as one google.rpc.Status agreeing with the call's code and message, exactly one
    ErrorInfo in the service's domain with an UPPER_SNAKE reason, for INVALID_ARGUMENT one
    BadRequest whose violations each name a field and say why, never UNKNOWN or INTERNAL, and no
    `x-agentpost-revision` (nothing was committed)."""
    assert error.code() not in (Code.UNKNOWN, Code.INTERNAL), (error.code(), error.details())
    trailers = list(error.trailing_metadata() or ())
    raw = [value for key, value in trailers if key == STATUS_DETAILS]
    assert len(raw) == 1, f"{error.code()} {error.details()}: {len(raw)} status details"
    assert isinstance(raw[0], bytes)
    status = status_pb2.Status.FromString(raw[0])
    assert status.code == error.code().value[0], (status.code, error.code())
    assert status.message == error.details()
    infos, requests = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            requests.append(bad)
    assert len(infos) == 1, f"{error.code()} {error.details()}: {len(infos)} ErrorInfo"
    info = infos[0]
    assert info.domain == ERROR_DOMAIN
    assert UPPER_SNAKE.fullmatch(info.reason), info.reason
    violations: dict[str, str] = {}
    if error.code() == Code.INVALID_ARGUMENT:
        assert len(requests) == 1, f"{info.reason}: {len(requests)} BadRequest"
        assert requests[0].field_violations, info.reason
        for violation in requests[0].field_violations:
            assert violation.field and violation.description, violation
            violations[violation.field] = violation.description
    assert REVISION not in {key for key, _ in trailers}, trailers
    return Refusal(error.code(), info.reason, error.details() or "", dict(info.metadata), violations)


async def refusal_of(call: Awaitable[Any]) -> Refusal:
    """Awaits a call that must be refused, whatever the refusal; returns it, checked and decoded."""
    try:
        result = await call
    except grpc.aio.AioRpcError as error:
        return decoded(error)
    raise AssertionError(f"expected a refusal, but the call succeeded: {result}")


async def refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str | None, *fields: str) -> Refusal:
    """Awaits a call that must fail with `code` and `reason` (any reason when None), the
    BadRequest naming `fields`; returns the refusal, checked and decoded."""
    refusal = await refusal_of(call)
    assert refusal.code == code and reason in (None, refusal.reason), (
        f"expected {code.name} {reason}, got {refusal.code.name} {refusal.reason}: {refusal.message}"
    )
    for field in fields:
        assert field in refusal.violations, (field, refusal.violations)
    return refusal


async def written(call: Any) -> tuple[Any, int]:
    """Awaits a write that must succeed; returns its answer and the revision it committed."""
    answer = await call
    return answer, await revision_of(call)


# -- reads ---------------------------------------------------------------------------------------


def events_stub(harness: Harness) -> event_pb2_grpc.EventServiceStub:
    """The event service on the harness's channel."""
    return event_pb2_grpc.EventServiceStub(harness.channel)


async def events_of(harness: Harness, org: Org, resource_id: str) -> list[event_pb2.Event]:
    """The events of one resource, newest first, as the owner lists them."""
    page = await events_stub(harness).ListEvents(
        event_pb2.ListEventsRequest(resource_id=resource_id, page_size=500), metadata=auth(org.owner_secret)
    )
    return list(page.events)


async def trace(harness: Harness, org: Org) -> tuple[int, list[str]]:
    """What any write leaves behind: the stored revision and the newest events' ids."""
    page = await events_stub(harness).ListEvents(
        event_pb2.ListEventsRequest(page_size=5), metadata=auth(org.owner_secret)
    )
    return await stored_revision(harness, org.id), [event.id for event in page.events]


@contextlib.asynccontextmanager
async def leaves_no_trace(harness: Harness, org: Org) -> AsyncIterator[None]:
    """Whatever runs inside commits no revision and appends no event."""
    before = await trace(harness, org)
    yield
    assert await trace(harness, org) == before


async def get_env(harness: Harness, org: Org, env_id: str) -> env_pb.Environment:
    """An environment as GetEnvironment shows it to the owner."""
    got: env_pb.Environment = await harness.environments.GetEnvironment(
        env_pb.GetEnvironmentRequest(id=env_id), metadata=auth(org.owner_secret)
    )
    return got


async def get_member(harness: Harness, org: Org, member_id: str) -> mem_pb.Member:
    """A member as GetMember shows it to the owner."""
    got: mem_pb.Member = await harness.members.GetMember(
        mem_pb.GetMemberRequest(id=member_id), metadata=auth(org.owner_secret)
    )
    return got


async def get_key(harness: Harness, org: Org, key_id: str) -> key_pb.ApiKey:
    """A key as GetApiKey shows it to the owner."""
    got: key_pb.ApiKey = await harness.api_keys.GetApiKey(
        key_pb.GetApiKeyRequest(id=key_id), metadata=auth(org.owner_secret)
    )
    return got


async def listed_env(harness: Harness, org: Org, env_id: str) -> env_pb.Environment:
    """An environment's entry in ListEnvironments (deleted ones shown)."""
    page = await harness.environments.ListEnvironments(
        env_pb.ListEnvironmentsRequest(page_size=500, show_deleted=True), metadata=auth(org.owner_secret)
    )
    return next(env for env in page.environments if env.id == env_id)


async def listed_member(harness: Harness, org: Org, member_id: str) -> mem_pb.Member:
    """A member's entry in ListMembers."""
    page = await harness.members.ListMembers(
        mem_pb.ListMembersRequest(page_size=500), metadata=auth(org.owner_secret)
    )
    return next(member for member in page.members if member.id == member_id)


async def listed_key(harness: Harness, org: Org, key_id: str) -> key_pb.ApiKey:
    """A key's entry in ListApiKeys (revoked ones shown)."""
    page = await harness.api_keys.ListApiKeys(
        key_pb.ListApiKeysRequest(page_size=500, show_revoked=True), metadata=auth(org.owner_secret)
    )
    return next(key for key in page.api_keys if key.id == key_id)


async def access_of(
    harness: Harness, org: Org, env_id: str, member_id: str
) -> mem_pb.EnvironmentMember | None:
    """A member's access to an environment as ListEnvironmentMembers shows it, if any."""
    page = await harness.members.ListEnvironmentMembers(
        mem_pb.ListEnvironmentMembersRequest(environment_id=env_id, page_size=500),
        metadata=auth(org.owner_secret),
    )
    return next((item for item in page.environment_members if item.member_id == member_id), None)


# -- writes, not yet awaited ---------------------------------------------------------------------


def masked(request: Any, paths: tuple[str, ...] | None) -> Any:
    """`request` with an update mask of `paths`; None leaves it with no mask at all."""
    if paths is not None:
        request.update_mask.CopyFrom(mask(*paths))
    return request


def update_env(
    harness: Harness,
    secret: str,
    environment: env_pb.Environment,
    paths: tuple[str, ...] | None = None,
) -> Any:
    """An UpdateEnvironment call (not yet awaited); `paths` None sends no mask at all."""
    request = masked(env_pb.UpdateEnvironmentRequest(environment=environment), paths)
    return harness.environments.UpdateEnvironment(request, metadata=auth(secret))


def update_member(
    harness: Harness, secret: str, member: mem_pb.Member, paths: tuple[str, ...] | None = None
) -> Any:
    """An UpdateMember call (not yet awaited); `paths` None sends no mask at all."""
    request = masked(mem_pb.UpdateMemberRequest(member=member), paths)
    return harness.members.UpdateMember(request, metadata=auth(secret))


def update_key(
    harness: Harness, secret: str, key: key_pb.ApiKey, paths: tuple[str, ...] | None = None
) -> Any:
    """An UpdateApiKey call (not yet awaited); `paths` None sends no mask at all."""
    request = masked(key_pb.UpdateApiKeyRequest(api_key=key), paths)
    return harness.api_keys.UpdateApiKey(request, metadata=auth(secret))


def update_access(
    harness: Harness,
    secret: str,
    env_id: str,
    member_id: str,
    role: mem_pb.EnvironmentMember.Role,
    paths: tuple[str, ...] | None = None,
    etag: str = "",
) -> Any:
    """An UpdateEnvironmentMember call (not yet awaited); `paths` None sends no mask at all."""
    access = mem_pb.EnvironmentMember(environment_id=env_id, member_id=member_id, role=role, etag=etag)
    request = masked(mem_pb.UpdateEnvironmentMemberRequest(environment_member=access), paths)
    return harness.members.UpdateEnvironmentMember(request, metadata=auth(secret))


def delete_env(harness: Harness, secret: str, env_id: str, etag: str = "") -> Any:
    """A DeleteEnvironment call (not yet awaited)."""
    return harness.environments.DeleteEnvironment(
        env_pb.DeleteEnvironmentRequest(id=env_id, etag=etag), metadata=auth(secret)
    )


def undelete_env(harness: Harness, secret: str, env_id: str, etag: str = "") -> Any:
    """An UndeleteEnvironment call (not yet awaited)."""
    return harness.environments.UndeleteEnvironment(
        env_pb.UndeleteEnvironmentRequest(id=env_id, etag=etag), metadata=auth(secret)
    )


def delete_member(harness: Harness, secret: str, member_id: str, etag: str = "") -> Any:
    """A DeleteMember call (not yet awaited)."""
    return harness.members.DeleteMember(
        mem_pb.DeleteMemberRequest(id=member_id, etag=etag), metadata=auth(secret)
    )


def revoke_key(harness: Harness, secret: str, key_id: str, etag: str = "") -> Any:
    """A RevokeApiKey call (not yet awaited)."""
    return harness.api_keys.RevokeApiKey(
        key_pb.RevokeApiKeyRequest(id=key_id, etag=etag), metadata=auth(secret)
    )


def roll_key(harness: Harness, secret: str, key_id: str, ttl_seconds: int = 0, etag: str = "") -> Any:
    """A RollApiKey call (not yet awaited), the previous key kept for `ttl_seconds`."""
    return harness.api_keys.RollApiKey(
        key_pb.RollApiKeyRequest(
            id=key_id, previous_key_ttl=duration_pb2.Duration(seconds=ttl_seconds), etag=etag
        ),
        metadata=auth(secret),
    )


def remove_access(harness: Harness, secret: str, env_id: str, member_id: str, etag: str = "") -> Any:
    """A RemoveEnvironmentMember call (not yet awaited)."""
    return harness.members.RemoveEnvironmentMember(
        mem_pb.RemoveEnvironmentMemberRequest(environment_id=env_id, member_id=member_id, etag=etag),
        metadata=auth(secret),
    )


def add_access(
    harness: Harness,
    secret: str,
    env_id: str,
    member_id: str,
    role: mem_pb.EnvironmentMember.Role = mem_pb.EnvironmentMember.MEMBER,
) -> Any:
    """An AddEnvironmentMember call (not yet awaited)."""
    return harness.members.AddEnvironmentMember(
        mem_pb.AddEnvironmentMemberRequest(environment_id=env_id, member_id=member_id, role=role),
        metadata=auth(secret),
    )


# -- versions and set-up --------------------------------------------------------------------------


def when(value: Any) -> datetime:
    """A Timestamp as an aware datetime."""
    moment: datetime = value.ToDatetime(tzinfo=UTC)
    return moment


def assert_history(versions: list[Any]) -> None:
    """Successive versions of one resource: every etag differs from every other, update_time
    strictly rises with each change, create_time never moves."""
    etags = [version.etag for version in versions]
    assert all(etags) and len(set(etags)) == len(etags), etags
    for before, after in itertools.pairwise(versions):
        assert when(after.update_time) > when(before.update_time), (before, after)
        assert after.create_time == versions[0].create_time


async def new_env(harness: Harness, org: Org, name: str = "Env", description: str = "") -> env_pb.Environment:
    """A new environment, made by the owner, its name made unique."""
    env: env_pb.Environment = await harness.environments.CreateEnvironment(
        env_pb.CreateEnvironmentRequest(name=f"{name} {uuid.uuid4().hex[:6]}", description=description),
        metadata=auth(org.owner_secret),
    )
    return env


async def new_deleted_env(harness: Harness, org: Org) -> env_pb.Environment:
    """A new environment, deleted: the deleted version."""
    env = await new_env(harness, org, "Gone")
    deleted: env_pb.Environment = await delete_env(harness, org.owner_secret, env.id)
    return deleted


# -- races -----------------------------------------------------------------------------------------


async def race(*calls: Any) -> list[tuple[str, Any]]:
    """Awaits calls started together; each as ("OK", answer) or ("CODE REASON", None)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    outcomes: list[tuple[str, Any]] = []
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            refusal = decoded(result)
            outcomes.append((f"{refusal.code.name} {refusal.reason}", None))
        elif isinstance(result, BaseException):
            raise result
        else:
            outcomes.append(("OK", result))
    return outcomes
