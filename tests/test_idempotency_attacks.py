"""Attacks on the idempotency of create requests (`request_id`, AIP-155), through the gRPC surface
of real servers on both databases.

What they try to break:

- the scope of a request id: two organizations, two environments' keys, five kinds of create
  sharing one id must each stay independent, never answering with another tenant's or another
  context's resource;
- one request id sent again with another payload: refused (REQUEST_ID_REUSED, or
  DUPLICATE_REQUEST for the creates whose secrets are never stored), never the first result
  passed off as the one asked for;
- retries after a refusal: a refused attempt must not burn its request id;
- retries after what was made was deleted, undeleted, moved, removed or revoked: the documented
  answer, no resurrection and no duplicate;
- malformed request ids: INVALID_ARGUMENT naming `request_id`, nothing created; the canonical
  forms of one UUID are one request; an empty id is no idempotency at all;
- fifty callers racing with one request id across two replicas, and callers giving up
  mid-create then retrying: one resource, every caller told about that one, and a retry racing
  a caller that gave up is answered (not stalled with it);
- a refused replay (REQUEST_ID_REUSED, DUPLICATE_REQUEST) is not a write: no revision.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import environment_pb2 as env_pb
from agentpost.environments.v1 import member_pb2 as member_pb
from agentpost.environments.v1 import organization_pb2 as org_pb
from agentpost.environments.v1 import resource_pb2 as resource_pb
from sqlalchemy import select

from service.storage.tables import ApiKeyRow, MemberRow, OrganizationRow
from tests.harness import AS_OPERATOR, Failure, Harness, Org, auth, fails, failure_of
from tests.servers import Backend, serving
from tests.writes import create_call, register_call, revision_of, stored_environments, stored_resources

Code = grpc.StatusCode
INBOX = resource_pb.ScopedResource.INBOX
THREAD = resource_pb.ScopedResource.THREAD
MEMBER = member_pb.Member.MEMBER
# What a caller whose deadline expired may be told, besides the answer itself.
GAVE_UP = {"DEADLINE_EXCEEDED", "CANCELLED"}


# -- calls ----------------------------------------------------------------------------------------


def member_call(
    harness: Harness, secret: str, email: str, request_id: str = "", role: member_pb.Member.Role = MEMBER
) -> Any:
    """A CreateMember call (not yet awaited) as `secret`."""
    return harness.members.CreateMember(
        member_pb.CreateMemberRequest(email=email, display_name="Idem", role=role, request_id=request_id),
        metadata=auth(secret),
    )


def key_call(
    harness: Harness,
    secret: str,
    name: str,
    request_id: str = "",
    scopes: tuple[str, ...] = ("inboxes:read",),
    environment_ids: tuple[str, ...] = (),
    timeout: float | None = None,
) -> Any:
    """A CreateApiKey call (not yet awaited) as `secret`."""
    return harness.api_keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(
            name=name, scopes=list(scopes), environment_ids=list(environment_ids), request_id=request_id
        ),
        metadata=auth(secret),
        timeout=timeout,
    )


def org_call(
    harness: Harness, name: str, email: str, request_id: str = "", timeout: float | None = None
) -> Any:
    """A CreateOrganization call (not yet awaited) as the operator."""
    return harness.organizations.CreateOrganization(
        org_pb.CreateOrganizationRequest(
            name=name, owner_email=email, owner_display_name="Owner", request_id=request_id
        ),
        metadata=AS_OPERATOR,
        timeout=timeout,
    )


async def answer(call: Any) -> tuple[str, Any]:
    """`("OK", response)` for a call that succeeded, else `("CODE REASON", Failure)`."""
    try:
        return "OK", await call
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        return f"{failure.code.name} {failure.reason}".strip(), failure


def unique(prefix: str) -> str:
    """A name (or slug, or id) no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def email(prefix: str = "idem") -> str:
    """An email no other test uses."""
    return f"{unique(prefix)}@example.com"


# -- what is stored -------------------------------------------------------------------------------


async def stored_key_ids(harness: Harness, organization_id: str, name: str) -> list[str]:
    """The ids of the organization's keys named `name`, as stored (revoked ones too)."""
    async with harness.app.engine.connect() as connection:
        rows = await connection.execute(
            select(ApiKeyRow.id).where(ApiKeyRow.organization_id == organization_id, ApiKeyRow.name == name)
        )
        return [row.id for row in rows]


async def stored_member_ids(harness: Harness, organization_id: str, address: str) -> list[str]:
    """The ids of the organization's members with that email, as stored."""
    async with harness.app.engine.connect() as connection:
        rows = await connection.execute(
            select(MemberRow.id).where(
                MemberRow.organization_id == organization_id, MemberRow.email_key == address.lower()
            )
        )
        return [row.id for row in rows]


async def stored_org_ids(harness: Harness, name: str) -> list[str]:
    """The ids of the organizations named `name`, as stored."""
    async with harness.app.engine.connect() as connection:
        rows = await connection.execute(select(OrganizationRow.id).where(OrganizationRow.name == name))
        return [row.id for row in rows]


async def environments_named(harness: Harness, organization_id: str, name: str) -> list[str]:
    """The ids of the organization's environments named `name`, as stored (deleted ones too)."""
    return [
        env_id
        for env_id, (stored, _) in (await stored_environments(harness, organization_id)).items()
        if stored == name
    ]


# -- 1. The scope of a request id -----------------------------------------------------------------


async def test_one_request_id_in_two_organizations_creates_in_each(harness: Harness, org: Org) -> None:
    """Two tenants sending the same request id with the same payload to every organization-scoped
    create get one resource each, in their own organization; each one's retry answers with its
    own, never the other tenant's (which would hand one tenant's resource to the other)."""
    other = await harness.new_org("Other tenant")
    request_id = str(uuid.uuid4())
    address = email("shared")
    made: dict[str, dict[str, Any]] = {}
    for tenant in (org, other):
        made[tenant.id] = {
            "env": await create_call(harness, tenant.owner_secret, "Shared", "shared", request_id),
            "member": await member_call(harness, tenant.owner_secret, address, request_id),
            "resource": await register_call(
                harness, tenant.owner_secret, "shared-inbox", request_id=request_id
            ),
            "key": await key_call(harness, tenant.owner_secret, "shared key", request_id),
        }
    mine, theirs = made[org.id], made[other.id]
    assert mine["env"].id != theirs["env"].id and mine["member"].id != theirs["member"].id
    assert mine["key"].api_key.id != theirs["key"].api_key.id
    for tenant in (org, other):
        ours = made[tenant.id]
        assert ours["env"].organization_id == ours["member"].organization_id == tenant.id
        assert ours["resource"].organization_id == ours["key"].api_key.organization_id == tenant.id
        assert ours["resource"].environment_id == tenant.default_environment.id
        # Each tenant's retries answer with its own.
        assert await create_call(harness, tenant.owner_secret, "Shared", "shared", request_id) == ours["env"]
        assert await member_call(harness, tenant.owner_secret, address, request_id) == ours["member"]
        again = await register_call(harness, tenant.owner_secret, "shared-inbox", request_id=request_id)
        assert again == ours["resource"]
        failure = await fails(
            key_call(harness, tenant.owner_secret, "shared key", request_id),
            Code.ALREADY_EXISTS,
            "DUPLICATE_REQUEST",
        )
        assert failure.metadata == {"keyId": ours["key"].api_key.id}


async def test_one_request_id_for_every_kind_of_create_is_independent(harness: Harness, org: Org) -> None:
    """One request id used for CreateEnvironment, CreateMember, RegisterResource, CreateApiKey and
    CreateOrganization is five independent requests: each creates, and each one's retry answers
    with its own result, never another operation's."""
    request_id = str(uuid.uuid4())
    env = await create_call(harness, org.owner_secret, unique("Every"), request_id=request_id)
    member = await member_call(harness, org.owner_secret, address := email(), request_id)
    resource = await register_call(harness, org.owner_secret, "every-inbox", request_id=request_id)
    key = await key_call(harness, org.owner_secret, "every key", request_id)
    organization = await org_call(harness, name := unique("Every org"), email(), request_id)
    assert env.id.startswith("env_") and member.id.startswith("mem_") and key.api_key.id.startswith("key_")
    assert resource.resource_id == "every-inbox" and organization.organization.name == name
    # The retries, in the reverse order: each finds its own.
    org_failure = await fails(
        org_call(harness, name, email(), request_id), Code.ALREADY_EXISTS, "DUPLICATE_REQUEST"
    )
    assert org_failure.metadata == {"organizationId": organization.organization.id}
    key_failure = await fails(
        key_call(harness, org.owner_secret, "every key", request_id), Code.ALREADY_EXISTS, "DUPLICATE_REQUEST"
    )
    assert key_failure.metadata == {"keyId": key.api_key.id}
    assert await register_call(harness, org.owner_secret, "every-inbox", request_id=request_id) == resource
    assert await member_call(harness, org.owner_secret, address, request_id) == member
    assert await create_call(harness, org.owner_secret, env.name, request_id=request_id) == env
    assert await stored_org_ids(harness, name) == [organization.organization.id]


async def test_a_registration_replayed_from_another_environment_is_neither_shown_nor_copied(
    harness: Harness, org: Org
) -> None:
    """A key of environment B replaying the request id a key of environment A registered with
    gets NOT_FOUND for that resource (the same answer as for one that does not exist, nothing of
    A's registration) and REQUEST_ID_REUSED for another: the registration is not copied into B,
    and B's refusals never name A."""
    env_a = await harness.new_environment(org, unique("A"))
    env_b = await harness.new_environment(org, unique("B"))
    _, key_a = await harness.new_key(org, ["inboxes:read", "inboxes:write"], [env_a.id])
    _, key_b = await harness.new_key(org, ["inboxes:read", "inboxes:write"], [env_b.id])
    request_id = str(uuid.uuid4())
    first = await register_call(harness, key_a, "private-inbox", request_id=request_id, display_name="A's")
    assert first.environment_id == env_a.id

    not_found = await fails(
        register_call(harness, key_b, "private-inbox", request_id=request_id, display_name="A's"),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    never_there = await fails(
        harness.resources.GetResource(
            resource_pb.GetResourceRequest(kind=INBOX, resource_id=unique("never")), metadata=auth(key_b)
        ),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    assert not_found.metadata.keys() == never_there.metadata.keys()
    reused = await fails(
        register_call(harness, key_b, "other-inbox", request_id=request_id),
        Code.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert "request_id" in reused.violations
    for failure in (not_found, reused):
        told = failure.message + repr(failure.metadata) + repr(failure.violations)
        assert env_a.id not in told and env_a.slug not in told and "A's" not in told
    assert await stored_resources(harness, org.id) == {"INBOX:private-inbox": env_a.id}
    # A's own retry still answers with its registration.
    assert await register_call(harness, key_a, "private-inbox", request_id=request_id) == first


# -- 2. One request id, another payload -----------------------------------------------------------


async def test_create_environment_reusing_a_request_id_for_another_slug_is_refused(
    harness: Harness, org: Org
) -> None:
    """A request id sent again for another environment (another slug, so another resource) must
    not be answered with the first environment as if it were the one asked for: the client
    would believe "prod" exists and write to "staging". The service's own rule for the same
    mistake on RegisterResource (README, resource.proto) is INVALID_ARGUMENT REQUEST_ID_REUSED;
    Stripe refuses a reused key with other parameters too."""
    request_id = str(uuid.uuid4())
    first = await create_call(harness, org.owner_secret, "Staging", unique("staging"), request_id)
    other_slug = unique("prod")
    failure = await fails(
        create_call(harness, org.owner_secret, "Prod", other_slug, request_id),
        Code.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert "request_id" in failure.violations
    stored = await stored_environments(harness, org.id)
    assert first.id in stored and "Prod" not in {name for name, _ in stored.values()}


async def test_create_member_reusing_a_request_id_for_another_email_is_refused(
    harness: Harness, org: Org
) -> None:
    """A request id sent again to add another person (another email, another role) must not be
    answered with the first member: the caller would believe bob@ was added as ADMIN when the
    answer is alice@ as MEMBER. Expected as for RegisterResource: INVALID_ARGUMENT
    REQUEST_ID_REUSED naming `request_id`."""
    request_id = str(uuid.uuid4())
    first = await member_call(harness, org.owner_secret, email("alice"), request_id)
    bob = email("bob")
    failure = await fails(
        member_call(harness, org.owner_secret, bob, request_id, role=member_pb.Member.ADMIN),
        Code.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert "request_id" in failure.violations
    assert await stored_member_ids(harness, org.id, first.email) == [first.id]


async def test_key_and_organization_creates_reusing_a_request_id_are_duplicates_naming_the_first(
    harness: Harness, org: Org
) -> None:
    """CreateApiKey and CreateOrganization never answer twice with a secret: the same request id
    with another name, other scopes or another environment is ALREADY_EXISTS DUPLICATE_REQUEST
    naming the first key (or organization), and no second one is made."""
    env = await harness.new_environment(org, unique("Keys"))
    request_id = str(uuid.uuid4())
    first = await key_call(harness, org.owner_secret, "payload key", request_id)
    for changed in (
        {"name": "another name"},
        {"scopes": ("inboxes:read", "inboxes:write", "messages:read")},
        {"environment_ids": (env.id,)},
    ):
        fields: dict[str, Any] = {"name": "payload key", **changed}
        failure = await fails(
            key_call(harness, org.owner_secret, request_id=request_id, **fields),
            Code.ALREADY_EXISTS,
            "DUPLICATE_REQUEST",
        )
        assert failure.metadata == {"keyId": first.api_key.id}
    assert await stored_key_ids(harness, org.id, "payload key") == [first.api_key.id]
    assert await stored_key_ids(harness, org.id, "another name") == []

    name = unique("Payload org")
    made = await org_call(harness, name, email(), request_id)
    failure = await fails(
        org_call(harness, unique("Another org"), email(), request_id),
        Code.ALREADY_EXISTS,
        "DUPLICATE_REQUEST",
    )
    assert failure.metadata == {"organizationId": made.organization.id}
    assert "ap_sk_" not in failure.message


async def test_register_reusing_a_request_id_for_another_kind_is_refused_and_no_field_changes(
    harness: Harness, org: Org
) -> None:
    """The same resource id under another kind is another resource: REQUEST_ID_REUSED, nothing
    registered. The same resource with another display name is the documented replay of the
    same resource: it answers the registration as stored, and the retry changes nothing."""
    request_id = str(uuid.uuid4())
    first = await register_call(
        harness, org.owner_secret, "kinded", request_id=request_id, display_name="First"
    )
    failure = await fails(
        register_call(harness, org.owner_secret, "kinded", request_id=request_id, kind=THREAD),
        Code.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert "request_id" in failure.violations
    again = await register_call(
        harness, org.owner_secret, "kinded", request_id=request_id, display_name="Second"
    )
    assert again == first and again.display_name == "First"
    assert await stored_resources(harness, org.id) == {"INBOX:kinded": org.default_environment.id}


# -- 3. Retries after a refusal -------------------------------------------------------------------


async def test_refused_creates_do_not_burn_their_request_ids(harness: Harness, org: Org) -> None:
    """A create refused (slug taken, email taken, resource registered, scope escalation, invalid
    argument) stores nothing under its request id: the same id with the mistake fixed creates,
    and a retry of that answers with what it created, never with the refusal or a stranger's
    resource."""
    taken = await harness.new_environment(org, unique("Taken"), slug=unique("taken"))
    await member_call(harness, org.owner_secret, taken_email := email("taken"))
    await register_call(harness, org.owner_secret, "taken-inbox")
    _, narrow = await harness.new_key(org, ["api_keys:write", "inboxes:read"], [org.default_environment.id])

    env_id, member_id, resource_id, key_id = (str(uuid.uuid4()) for _ in range(4))
    await fails(
        create_call(harness, org.owner_secret, "Clash", taken.slug, env_id), Code.ALREADY_EXISTS, "SLUG_TAKEN"
    )
    await fails(
        member_call(harness, org.owner_secret, taken_email, member_id), Code.ALREADY_EXISTS, "EMAIL_TAKEN"
    )
    await fails(
        register_call(harness, org.owner_secret, "taken-inbox", request_id=resource_id),
        Code.ALREADY_EXISTS,
        "RESOURCE_EXISTS",
    )
    await fails(
        key_call(harness, narrow, "fixed key", key_id, ("inboxes:write",), (org.default_environment.id,)),
        Code.PERMISSION_DENIED,
        "SCOPE_ESCALATION",
    )

    env = await create_call(harness, org.owner_secret, "Clash", fixed_slug := unique("fixed"), env_id)
    member = await member_call(harness, org.owner_secret, fixed_email := email("fixed"), member_id)
    resource = await register_call(harness, org.owner_secret, "fixed-inbox", request_id=resource_id)
    key = await key_call(
        harness, narrow, "fixed key", key_id, ("inboxes:read",), (org.default_environment.id,)
    )
    assert env.slug == fixed_slug and member.email == fixed_email and resource.resource_id == "fixed-inbox"
    assert await create_call(harness, org.owner_secret, "Clash", fixed_slug, env_id) == env
    assert await member_call(harness, org.owner_secret, fixed_email, member_id) == member
    assert await register_call(harness, org.owner_secret, "fixed-inbox", request_id=resource_id) == resource
    failure = await fails(
        key_call(harness, narrow, "fixed key", key_id, ("inboxes:read",), (org.default_environment.id,)),
        Code.ALREADY_EXISTS,
        "DUPLICATE_REQUEST",
    )
    assert failure.metadata == {"keyId": key.api_key.id}

    # An organization refused for its owner's email, then fixed.
    org_request = str(uuid.uuid4())
    await fails(
        org_call(harness, name := unique("Fixed org"), "not an email", org_request), Code.INVALID_ARGUMENT
    )
    made = await org_call(harness, name, email(), org_request)
    assert await stored_org_ids(harness, name) == [made.organization.id]


async def test_a_registration_refused_in_a_deleted_environment_succeeds_after_undelete(
    harness: Harness, org: Org
) -> None:
    """A registration refused because its environment is deleted leaves its request id free: once
    the environment is restored, the same request registers (in that environment), once."""
    env = await harness.new_environment(org, unique("Paused"))
    await harness.delete_environment(org.owner_secret, env.id)
    request_id = str(uuid.uuid4())
    await fails(
        register_call(harness, org.owner_secret, "paused-inbox", env.id, request_id),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_DELETED",
    )
    await harness.environments.UndeleteEnvironment(
        env_pb.UndeleteEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
    )
    made = await register_call(harness, org.owner_secret, "paused-inbox", env.id, request_id)
    assert made.environment_id == env.id
    assert await register_call(harness, org.owner_secret, "paused-inbox", env.id, request_id) == made
    assert await stored_resources(harness, org.id) == {"INBOX:paused-inbox": env.id}


# -- 5. Retries after what was made changed --------------------------------------------------------


async def test_an_environment_retry_after_delete_and_undelete_returns_the_same_environment(
    harness: Harness, org: Org
) -> None:
    """A retry of a create whose environment was since deleted answers with that environment as it
    stands (DELETED), not with a new one and not by restoring it; after an undelete, with the
    same environment ACTIVE. One environment is ever stored."""
    request_id = str(uuid.uuid4())
    name = unique("Cycle")
    first = await create_call(harness, org.owner_secret, name, request_id=request_id)
    await harness.delete_environment(org.owner_secret, first.id)
    deleted = await create_call(harness, org.owner_secret, name, request_id=request_id)
    assert deleted.id == first.id and deleted.state == env_pb.Environment.DELETED
    listed = await harness.environments.GetEnvironment(
        env_pb.GetEnvironmentRequest(id=first.id), metadata=auth(org.owner_secret)
    )
    assert listed.state == env_pb.Environment.DELETED  # the retry did not bring it back
    await harness.environments.UndeleteEnvironment(
        env_pb.UndeleteEnvironmentRequest(id=first.id), metadata=auth(org.owner_secret)
    )
    restored = await create_call(harness, org.owner_secret, name, request_id=request_id)
    assert restored.id == first.id and restored.state == env_pb.Environment.ACTIVE
    assert await environments_named(harness, org.id, name) == [first.id]


async def test_a_registration_retry_after_reassignment_follows_the_resource_never_duplicates(
    harness: Harness, org: Org
) -> None:
    """A registration moved by ReassignResources is NOT_FOUND to a retry in its first environment
    (README) and is not registered there again; in the environment it moved to, the retry answers
    with it as it stands."""
    source = await harness.new_environment(org, unique("Source"))
    target = await harness.new_environment(org, unique("Target"))
    request_id = str(uuid.uuid4())
    await register_call(harness, org.owner_secret, "moving-inbox", source.id, request_id)
    moved = await harness.resources.ReassignResources(
        resource_pb.ReassignResourcesRequest(
            from_environment_id=source.id,
            to_environment_id=target.id,
            resources=[resource_pb.ResourceRef(kind=INBOX, resource_id="moving-inbox")],
        ),
        metadata=auth(org.owner_secret),
    )
    assert moved.moved_count == 1
    await fails(
        register_call(harness, org.owner_secret, "moving-inbox", source.id, request_id),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    there = await register_call(harness, org.owner_secret, "moving-inbox", target.id, request_id)
    assert there.environment_id == target.id
    assert await stored_resources(harness, org.id) == {"INBOX:moving-inbox": target.id}


async def test_a_member_retry_after_the_member_left_does_not_bring_it_back(
    harness: Harness, org: Org
) -> None:
    """A CreateMember retry after that member was deleted is NOT_FOUND MEMBER_NOT_FOUND (the first
    result is gone) and creates no one: a removed person is not re-added by a late retry."""
    request_id = str(uuid.uuid4())
    address = email("leaver")
    member = await member_call(harness, org.owner_secret, address, request_id)
    await harness.members.DeleteMember(
        member_pb.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret)
    )
    await fails(
        member_call(harness, org.owner_secret, address, request_id), Code.NOT_FOUND, "MEMBER_NOT_FOUND"
    )
    assert await stored_member_ids(harness, org.id, address) == []


async def test_a_key_retry_after_revoke_names_the_revoked_key(harness: Harness, org: Org) -> None:
    """A CreateApiKey retry after the key was revoked is still DUPLICATE_REQUEST naming it: no new
    key (with a fresh secret) replaces the one its owner revoked."""
    request_id = str(uuid.uuid4())
    made = await key_call(harness, org.owner_secret, "revoked key", request_id)
    await harness.api_keys.RevokeApiKey(
        key_pb.RevokeApiKeyRequest(id=made.api_key.id), metadata=auth(org.owner_secret)
    )
    failure = await fails(
        key_call(harness, org.owner_secret, "revoked key", request_id),
        Code.ALREADY_EXISTS,
        "DUPLICATE_REQUEST",
    )
    assert failure.metadata == {"keyId": made.api_key.id}
    assert await stored_key_ids(harness, org.id, "revoked key") == [made.api_key.id]
    assert not (await harness.verify(made.secret)).valid


async def test_a_key_retry_after_its_environment_was_deleted_still_names_the_key(
    harness: Harness, org: Org
) -> None:
    """The first CreateApiKey made the key (its answer lost on the way), then its environment was
    deleted: the retry is a duplicate of a request that succeeded, so it must be ALREADY_EXISTS
    DUPLICATE_REQUEST with the key's id (SPEC §2, AIP-155), not a refusal that tells the client
    no key was made: that client would never learn the id of a key that comes back to life, with
    its secret unaccounted for, the moment the environment is undeleted."""
    env = await harness.new_environment(org, unique("Short lived"))
    request_id = str(uuid.uuid4())
    made = await key_call(harness, org.owner_secret, "lost answer", request_id, environment_ids=(env.id,))
    await harness.delete_environment(org.owner_secret, env.id)
    failure = await fails(
        key_call(harness, org.owner_secret, "lost answer", request_id, environment_ids=(env.id,)),
        Code.ALREADY_EXISTS,
        "DUPLICATE_REQUEST",
    )
    assert failure.metadata == {"keyId": made.api_key.id}


# -- 6. Malformed request ids ----------------------------------------------------------------------


BAD_REQUEST_IDS: dict[str, Callable[[str], str]] = {
    "ten-thousand-characters": lambda value: value + "a" * (10_000 - len(value)),
    "white-space-only": lambda value: " " * len(value),
    "nul-inside": lambda value: value[:8] + "\x00" + value[9:],
    "tab-inside": lambda value: value[:8] + "\t" + value[9:],
    "cyrillic-lookalikes": lambda value: "\u0430\u0435" + value[2:],
    "fullwidth-digits": lambda value: "\uff11" * 8 + value[8:],
    "zero-width-space": lambda value: value[:8] + "\u200b" + value[8:],
    "trailing-nbsp": lambda value: value + "\u00a0",
    "mixed-hyphenation": lambda value: value.replace("-", "", 1),
    "one-digit-short": lambda value: value[:-1],
}


@pytest.mark.parametrize("spoil", BAD_REQUEST_IDS.values(), ids=BAD_REQUEST_IDS.keys())
async def test_malformed_request_ids_are_refused_by_every_create(
    harness: Harness, org: Org, spoil: Callable[[str], str]
) -> None:
    """A request id that is not exactly a UUID is INVALID_ARGUMENT with a `request_id` field
    violation on each of the five creates (never UNKNOWN/INTERNAL, never a silent
    non-idempotent create), and nothing is created."""
    request_id = spoil(str(uuid.uuid4()))
    name = unique("Bad-id")
    address = email("bad-id")
    calls = [
        create_call(harness, org.owner_secret, name, request_id=request_id),
        member_call(harness, org.owner_secret, address, request_id),
        register_call(harness, org.owner_secret, name.lower(), request_id=request_id),
        key_call(harness, org.owner_secret, name, request_id),
        org_call(harness, name, address, request_id),
    ]
    for call in calls:
        failure = await fails(call, Code.INVALID_ARGUMENT)
        assert "request_id" in failure.violations, failure
        assert request_id not in failure.message  # not echoed back, whatever its size
    assert await environments_named(harness, org.id, name) == []
    assert await stored_member_ids(harness, org.id, address) == []
    assert f"INBOX:{name.lower()}" not in await stored_resources(harness, org.id)
    assert await stored_key_ids(harness, org.id, name) == []
    assert await stored_org_ids(harness, name) == []


async def test_request_ids_differing_only_in_case_or_hyphens_are_one_request(
    harness: Harness, org: Org
) -> None:
    """A UUID's upper-case, lower-case and hyphen-less spellings are one request id (it is stored
    canonical): retries in another spelling answer with the first result on every create."""
    value = uuid.uuid4()
    spellings = [str(value), str(value).upper(), value.hex.upper()]
    name = unique("Cased")
    envs = [await create_call(harness, org.owner_secret, name, request_id=s) for s in spellings]
    assert len({env.id for env in envs}) == 1
    address = email("cased")
    members = [await member_call(harness, org.owner_secret, address, s) for s in spellings]
    assert {m.id for m in members} == {members[0].id} and {m.email for m in members} == {address}
    resources = [await register_call(harness, org.owner_secret, "cased", request_id=s) for s in spellings]
    assert all(resource == resources[0] for resource in resources)
    key = await key_call(harness, org.owner_secret, "cased key", spellings[0])
    for spelling in spellings[1:]:
        failure = await fails(
            key_call(harness, org.owner_secret, "cased key", spelling),
            Code.ALREADY_EXISTS,
            "DUPLICATE_REQUEST",
        )
        assert failure.metadata == {"keyId": key.api_key.id}
    made = await org_call(harness, org_name := unique("Cased org"), email(), spellings[1])
    failure = await fails(
        org_call(harness, org_name, email(), spellings[2]), Code.ALREADY_EXISTS, "DUPLICATE_REQUEST"
    )
    assert failure.metadata == {"organizationId": made.organization.id}


async def test_an_empty_request_id_is_no_request_id(harness: Harness, org: Org) -> None:
    """An empty request id is allowed and means no idempotency: two such key creates make two
    keys, and a second environment create with the same slug is a clash, not a replay."""
    first = await key_call(harness, org.owner_secret, "no id key")
    second = await key_call(harness, org.owner_secret, "no id key")
    assert first.api_key.id != second.api_key.id
    slug = unique("no-id")
    await create_call(harness, org.owner_secret, "No id", slug)
    await fails(create_call(harness, org.owner_secret, "No id", slug), Code.ALREADY_EXISTS, "SLUG_TAKEN")


# -- 4. Races ---------------------------------------------------------------------------------------


RACERS = 50


async def test_fifty_racing_retries_across_two_replicas_create_once(
    backend: Backend, harness: Harness, org: Org
) -> None:
    """Fifty callers sending one request id, half to each of two replicas on one database, for
    CreateEnvironment, CreateMember and RegisterResource: every caller is answered OK with the
    same resource, and exactly one is stored (no SLUG_TAKEN, EMAIL_TAKEN or RESOURCE_EXISTS
    leaking out of the race, no UNKNOWN/INTERNAL, no "database is locked")."""
    async with serving(backend) as other:
        replicas = (harness, other)
        env_id, member_id, resource_id = (str(uuid.uuid4()) for _ in range(3))
        name, address = unique("Raced"), email("raced")
        envs = await asyncio.gather(
            *(
                answer(create_call(replicas[n % 2], org.owner_secret, name, request_id=env_id))
                for n in range(RACERS)
            )
        )
        members = await asyncio.gather(
            *(
                answer(member_call(replicas[n % 2], org.owner_secret, address, member_id))
                for n in range(RACERS)
            )
        )
        resources = await asyncio.gather(
            *(
                answer(register_call(replicas[n % 2], org.owner_secret, "raced", request_id=resource_id))
                for n in range(RACERS)
            )
        )
    for answers in (envs, members, resources):
        codes = {code for code, _ in answers}
        assert codes == {"OK"}, codes
    assert len({env.id for _, env in envs}) == 1
    assert len({member.id for _, member in members}) == 1
    assert len({(r.resource_id, r.environment_id, r.create_time.ToNanoseconds()) for _, r in resources}) == 1
    assert await environments_named(harness, org.id, name) == [envs[0][1].id]
    assert await stored_member_ids(harness, org.id, address) == [members[0][1].id]
    assert await stored_resources(harness, org.id) == {"INBOX:raced": org.default_environment.id}


async def test_fifty_racing_key_and_organization_creates_across_two_replicas_make_one(
    backend: Backend, harness: Harness, org: Org
) -> None:
    """Fifty callers racing one CreateApiKey request id (one calling key) and fifty racing one
    CreateOrganization request id, split across two replicas: exactly one OK each, every other
    caller ALREADY_EXISTS DUPLICATE_REQUEST naming that key (organization), one of each stored."""
    async with serving(backend) as other:
        replicas = (harness, other)
        key_request, org_request = str(uuid.uuid4()), str(uuid.uuid4())
        org_name = unique("Raced org")
        keys = await asyncio.gather(
            *(
                answer(key_call(replicas[n % 2], org.owner_secret, "raced key", key_request))
                for n in range(RACERS)
            )
        )
        orgs = await asyncio.gather(
            *(answer(org_call(replicas[n % 2], org_name, email("racer"), org_request)) for n in range(RACERS))
        )
    for answers, reason_field, stored in (
        (keys, "keyId", await stored_key_ids(harness, org.id, "raced key")),
        (orgs, "organizationId", await stored_org_ids(harness, org_name)),
    ):
        codes = sorted(code for code, _ in answers)
        assert codes == ["ALREADY_EXISTS DUPLICATE_REQUEST"] * (RACERS - 1) + ["OK"], set(codes)
        assert len(stored) == 1
        named = {failure.metadata.get(reason_field) for code, failure in answers if code != "OK"}
        assert named == set(stored)
    (winner,) = [key for code, key in keys if code == "OK"]
    assert winner.api_key.id == (await stored_key_ids(harness, org.id, "raced key"))[0]
    assert (await harness.verify(winner.secret)).valid


# -- 7. Callers that give up mid-create --------------------------------------------------------------


async def test_callers_that_give_up_mid_create_and_retry_get_one_resource(harness: Harness, org: Org) -> None:
    """Callers with 1-5 ms deadlines send one request id again and again (concurrently and in
    turn), then retry patiently: every answer is OK with the one environment (or DEADLINE_EXCEEDED
    / CANCELLED), the patient retry answers with it, and exactly one is stored; for CreateApiKey
    and CreateOrganization the patient retry is the one OK or a DUPLICATE_REQUEST naming the one
    stored. (The organization is warmed first: a cold one stalls the patient retry, see the
    next test.)"""
    await harness.whoami(org.owner_secret)
    env_request, key_request, org_request = (str(uuid.uuid4()) for _ in range(3))
    name, org_name = unique("Hasty"), unique("Hasty org")
    env_answers: list[tuple[str, Any]] = []
    key_answers: list[tuple[str, Any]] = []
    org_answers: list[tuple[str, Any]] = []
    for round_number in range(4):
        deadlines = [0.001 * (1 + n % 5) for n in range(8)]
        env_answers += await asyncio.gather(
            *(
                answer(create_call(harness, org.owner_secret, name, request_id=env_request, timeout=d))
                for d in deadlines
            )
        )
        key_answers += await asyncio.gather(
            *(answer(key_call(harness, org.owner_secret, name, key_request, timeout=d)) for d in deadlines)
        )
        org_answers += await asyncio.gather(
            *(answer(org_call(harness, org_name, email("hasty"), org_request, timeout=d)) for d in deadlines)
        )
        env_answers.append(
            await answer(
                create_call(
                    harness, org.owner_secret, name, request_id=env_request, timeout=0.001 * round_number
                )
            )
        )
    patient_env = await create_call(harness, org.owner_secret, name, request_id=env_request, timeout=10)
    patient_key = await answer(key_call(harness, org.owner_secret, name, key_request, timeout=10))
    patient_org = await answer(org_call(harness, org_name, email("hasty"), org_request, timeout=10))

    assert {code for code, _ in env_answers} <= {"OK", *GAVE_UP}, {code for code, _ in env_answers}
    assert {env.id for code, env in env_answers if code == "OK"} <= {patient_env.id}
    assert await environments_named(harness, org.id, name) == [patient_env.id]

    for answers, patient, stored, field in (
        (key_answers, patient_key, await stored_key_ids(harness, org.id, name), "keyId"),
        (org_answers, patient_org, await stored_org_ids(harness, org_name), "organizationId"),
    ):
        codes = {code for code, _ in answers}
        assert codes <= {"OK", "ALREADY_EXISTS DUPLICATE_REQUEST", *GAVE_UP}, codes
        assert len(stored) == 1, stored
        oks = [code for code, _ in [*answers, patient] if code == "OK"]
        assert len(oks) <= 1
        if patient[0] != "OK":
            assert patient[0] == "ALREADY_EXISTS DUPLICATE_REQUEST" and patient[1].metadata == {
                field: stored[0]
            }


async def test_a_retry_racing_a_caller_that_gave_up_on_a_cold_organization_is_answered(
    harness: Harness,
) -> None:
    """The first call to an organization the server holds nothing of loads its view once for every
    caller that asks meanwhile. A caller that gives up (a 2 ms deadline) while that load runs must
    not take the load down with it for the others: its retry with the same request id, sent a
    moment later with a 5 s deadline, is answered OK with the one environment. (Any call joining
    that load stalls the same way, a read included, and with no deadline it never ends.)"""
    for attempt in range(3):
        org = await harness.new_org(f"Cold {attempt}")  # made, but not yet looked at by any call
        request_id = str(uuid.uuid4())
        name = unique("Cold")
        hasty = asyncio.ensure_future(
            answer(create_call(harness, org.owner_secret, name, request_id=request_id, timeout=0.002))
        )
        await asyncio.sleep(0.0005)
        patient = await answer(create_call(harness, org.owner_secret, name, request_id=request_id, timeout=5))
        hasty_code, _ = await hasty
        assert hasty_code in {"OK", *GAVE_UP}, hasty_code
        assert patient[0] == "OK", (attempt, patient[0])
        assert await environments_named(harness, org.id, name) == [patient[1].id]


# -- Refusals of a replay change nothing -------------------------------------------------------------


async def test_a_refused_replay_commits_no_revision(harness: Harness, org: Org) -> None:
    """A retry refused as REQUEST_ID_REUSED or DUPLICATE_REQUEST is not a write: it must not raise
    the organization's revision (SPEC §6: every *write* raises it by one, and a refusal leaves
    nothing behind). Seen through the surface: the next write after such refusals answers the
    revision right after the write before them."""
    request_id = str(uuid.uuid4())
    await register_call(harness, org.owner_secret, "rev-inbox", request_id=request_id)
    key_request = str(uuid.uuid4())
    await key_call(harness, org.owner_secret, "rev key", key_request)
    before = create_call(harness, org.owner_secret, unique("Before"))
    await before
    revision = await revision_of(before)
    refused: list[Failure] = [
        await fails(
            register_call(harness, org.owner_secret, "rev-other", request_id=request_id),
            Code.INVALID_ARGUMENT,
            "REQUEST_ID_REUSED",
        ),
        await fails(
            key_call(harness, org.owner_secret, "rev key", key_request),
            Code.ALREADY_EXISTS,
            "DUPLICATE_REQUEST",
        ),
    ]
    assert all("x-agentpost-revision" not in failure.trailers for failure in refused)
    after = create_call(harness, org.owner_secret, unique("After"))
    await after
    assert await revision_of(after) == revision + 1
