"""Existence is never leaked: for every RPC that takes an id, an id of another organization, or one
of the caller's organization outside the caller's reach, gets exactly the refusal a random
well-formed id gets: the same code, ErrorInfo reason and metadata, and the same message once the
id is replaced by a placeholder."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import environment_pb2 as env_pb
from agentpost.environments.v1 import member_pb2 as mem_pb
from agentpost.environments.v1 import resource_pb2 as res_pb
from google.protobuf.message import Message
from ulid import ULID

from tests.harness import Failure, Harness, Org, auth, failure_of, mask

AREAS = ("environments", "members", "api_keys", "inboxes", "messages", "threads", "drafts", "domains",
         "webhooks", "labels")  # fmt: skip
EVERY_SCOPE = [f"{area}:{access}" for area in AREAS for access in ("read", "write")]
INBOX = res_pb.ScopedResource.INBOX


@dataclass(frozen=True)
class Ids:
    """One id of each type: environment (active and deleted), its slug, member, key, resource."""

    environment: str
    deleted_environment: str
    slug: str
    member: str
    key: str
    resource: str


@dataclass(frozen=True)
class World:
    """Two organizations. The caller's org has environments A (the env-scoped caller's) and B
    (outside that caller's reach); `outside` names things of B, `theirs` of the other org."""

    org: Org
    env_a: str
    member_a: str
    env_caller: str
    outside: Ids
    theirs: Ids


def random_ids() -> Ids:
    """Well-formed ids that name nothing."""
    return Ids(
        environment=f"env_{ULID()}",
        deleted_environment=f"env_{ULID()}",
        slug=f"random-{uuid.uuid4().hex[:10]}",
        member=f"mem_{ULID()}",
        key=f"key_{ULID()}",
        resource=f"random-{uuid.uuid4().hex}",
    )


async def populate(harness: Harness, org: Org) -> Ids:
    """An environment B (plus a deleted one), a MEMBER added to B only, a key on B, an inbox in B."""
    suffix = uuid.uuid4().hex[:10]
    env_b = await harness.new_environment(org, f"B {suffix}", slug=f"b-{suffix}")
    gone = await harness.new_environment(org, f"Gone {suffix}")
    await harness.delete_environment(org.owner_secret, gone.id)
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env_b.id, member.id)
    key, _ = await harness.new_key(org, ["inboxes:read"], [env_b.id])
    resource_id = f"inbox-{suffix}"
    await harness.resources.RegisterResource(
        res_pb.RegisterResourceRequest(kind=INBOX, resource_id=resource_id),
        metadata=auth(org.owner_secret, env_b.id),
    )
    return Ids(env_b.id, gone.id, env_b.slug, member.id, key.id, resource_id)


@pytest.fixture
async def world(harness: Harness) -> World:
    """Built afresh for each row, so a call that wrongly succeeds cannot change the next row."""
    org = await harness.new_org("Mine")
    other = await harness.new_org("Theirs")
    env_a = await harness.new_environment(org, "A")
    member_a = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env_a.id, member_a.id)
    _, env_caller = await harness.new_key(org, EVERY_SCOPE, [env_a.id])
    return World(
        org=org,
        env_a=env_a.id,
        member_a=member_a.id,
        env_caller=env_caller,
        outside=await populate(harness, org),
        theirs=await populate(harness, other),
    )


@dataclass(frozen=True)
class InContext:
    """A request that names no id itself, sent in an environment's context (x-agentpost-environment)."""

    request: Message
    environment: str


RequestFor = Callable[[World, Ids], Message | InContext]
# The harness's stub of each service.
STUBS = {
    "EnvironmentService": "environments",
    "MembershipService": "members",
    "ApiKeyService": "api_keys",
    "ResourceService": "resources",
}


def sent(harness: Harness, request: Message | InContext, secret: str) -> Awaitable[Any]:
    """`request` sent as `secret` to the one RPC that takes it (GetEnvironmentRequest: GetEnvironment)."""
    if isinstance(request, InContext):
        message, environment = request.request, request.environment
    else:
        message, environment = request, None
    ((service, method),) = [
        (service.name, method.name)
        for service in message.DESCRIPTOR.file.services_by_name.values()
        for method in service.methods
        if method.input_type.full_name == message.DESCRIPTOR.full_name
    ]
    stub = getattr(harness, STUBS[service])
    return getattr(stub, method)(message, metadata=auth(secret, environment))


# An environment's administrator may add any member of its organization by id (the contract):
# such an id is in reach by design, so only (a) and (b) apply; test_environment_members.py shows
# the add succeeding.
ADDRESSABLE_BY_ID = {"AddEnvironmentMember(member_id)"}


# Each row: what the RPC is given, which id of `Ids` it names, and the request that names it.
CASES: list[tuple[str, str, RequestFor]] = [
    ("GetEnvironment(id)", "environment", lambda w, ids: env_pb.GetEnvironmentRequest(id=ids.environment)),
    ("GetEnvironment(slug)", "slug", lambda w, ids: env_pb.GetEnvironmentRequest(slug=ids.slug)),
    (
        "UpdateEnvironment",
        "environment",
        lambda w, ids: env_pb.UpdateEnvironmentRequest(
            environment=env_pb.Environment(id=ids.environment, name="Renamed"), update_mask=mask("name")
        ),
    ),
    ("DeleteEnvironment", "environment", lambda w, ids: env_pb.DeleteEnvironmentRequest(id=ids.environment)),
    (
        "UndeleteEnvironment",
        "deleted_environment",
        lambda w, ids: env_pb.UndeleteEnvironmentRequest(id=ids.deleted_environment),
    ),
    ("GetMember", "member", lambda w, ids: mem_pb.GetMemberRequest(id=ids.member)),
    (
        "UpdateMember",
        "member",
        lambda w, ids: mem_pb.UpdateMemberRequest(
            member=mem_pb.Member(id=ids.member, display_name="Renamed"), update_mask=mask("display_name")
        ),
    ),
    ("DeleteMember", "member", lambda w, ids: mem_pb.DeleteMemberRequest(id=ids.member)),
    (
        "AddEnvironmentMember(environment_id)",
        "environment",
        lambda w, ids: mem_pb.AddEnvironmentMemberRequest(
            environment_id=ids.environment, member_id=w.member_a, role=mem_pb.EnvironmentMember.MEMBER
        ),
    ),
    (
        "AddEnvironmentMember(member_id)",
        "member",
        lambda w, ids: mem_pb.AddEnvironmentMemberRequest(
            environment_id=w.env_a, member_id=ids.member, role=mem_pb.EnvironmentMember.MEMBER
        ),
    ),
    (
        "ListEnvironmentMembers",
        "environment",
        lambda w, ids: mem_pb.ListEnvironmentMembersRequest(environment_id=ids.environment),
    ),
    (
        "ListMemberEnvironments",
        "member",
        lambda w, ids: mem_pb.ListMemberEnvironmentsRequest(member_id=ids.member),
    ),
    ("GetApiKey", "key", lambda w, ids: key_pb.GetApiKeyRequest(id=ids.key)),
    (
        "UpdateApiKey",
        "key",
        lambda w, ids: key_pb.UpdateApiKeyRequest(
            api_key=key_pb.ApiKey(id=ids.key, name="Renamed"), update_mask=mask("name")
        ),
    ),
    ("RevokeApiKey", "key", lambda w, ids: key_pb.RevokeApiKeyRequest(id=ids.key)),
    ("RollApiKey", "key", lambda w, ids: key_pb.RollApiKeyRequest(id=ids.key)),
    (
        "GetResource",
        "resource",
        lambda w, ids: res_pb.GetResourceRequest(kind=INBOX, resource_id=ids.resource),
    ),
    (
        "DeregisterResource",
        "resource",
        lambda w, ids: res_pb.DeregisterResourceRequest(kind=INBOX, resource_id=ids.resource),
    ),
    (
        "ListOrphanedResources",
        "deleted_environment",
        lambda w, ids: res_pb.ListOrphanedResourcesRequest(environment_id=ids.deleted_environment),
    ),
    (
        "ReassignResources(from)",
        "deleted_environment",
        lambda w, ids: res_pb.ReassignResourcesRequest(
            from_environment_id=ids.deleted_environment, to_environment_id=w.env_a
        ),
    ),
    (
        "ReassignResources(to)",
        "environment",
        lambda w, ids: res_pb.ReassignResourcesRequest(
            from_environment_id=w.env_a, to_environment_id=ids.environment
        ),
    ),
    (
        "x-agentpost-environment(id)",
        "environment",
        lambda w, ids: InContext(res_pb.ListResourcesRequest(), ids.environment),
    ),
    (
        "x-agentpost-environment(slug)",
        "slug",
        lambda w, ids: InContext(res_pb.ListResourcesRequest(), ids.slug),
    ),
]


async def refusal(call: Awaitable[Any], named: str) -> tuple[object, ...]:
    """The call's refusal with the id it named replaced by a placeholder; it must not succeed."""
    try:
        result = await call
    except grpc.aio.AioRpcError as error:
        failure: Failure = failure_of(error)
        return (
            failure.code,
            failure.reason,
            failure.message.replace(named, "<id>"),
            {key: value.replace(named, "<id>") for key, value in failure.metadata.items()},
            {key: value.replace(named, "<id>") for key, value in failure.violations.items()},
        )
    raise AssertionError(f"the call succeeded: {result}")


@pytest.mark.parametrize(("rpc", "id_type", "request_for"), CASES, ids=[row[0] for row in CASES])
async def test_ids_of_other_orgs_or_out_of_reach_are_refused_like_random_ids(
    harness: Harness, world: World, rpc: str, id_type: str, request_for: RequestFor
) -> None:
    """(a) another organization's id and (b) a random id, as the org owner: the same NOT_FOUND.
    (c) an id of the caller's org out of its reach and a random id, as a key on environment A
    only: the same refusal (organization-level RPCs refuse that key before looking, whatever
    the id, with PERMISSION_DENIED)."""
    owner = world.org.owner_secret
    random = random_ids()
    as_random = await refusal(sent(harness, request_for(world, random), owner), getattr(random, id_type))
    as_theirs = await refusal(
        sent(harness, request_for(world, world.theirs), owner), getattr(world.theirs, id_type)
    )
    assert as_random[0] == grpc.StatusCode.NOT_FOUND, as_random
    assert as_theirs == as_random

    if rpc in ADDRESSABLE_BY_ID:
        return
    random = random_ids()
    as_random = await refusal(
        sent(harness, request_for(world, random), world.env_caller), getattr(random, id_type)
    )
    as_outside = await refusal(
        sent(harness, request_for(world, world.outside), world.env_caller), getattr(world.outside, id_type)
    )
    assert as_random[0] in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED), as_random
    assert as_outside == as_random
