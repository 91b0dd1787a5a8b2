"""Keys inherit their owner's access: every membership change shows on the key's next call, in
the RPCs it makes and in what VerifyApiKey reports."""

from __future__ import annotations

import asyncio

import grpc
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import environment_pb2 as env_pb
from agentpost.environments.v1 import member_pb2 as pb

from service.domain import scopes
from tests.harness import Harness, Org, auth, fails
from tests.servers import Backend, serving

Code = grpc.StatusCode
Denial = key_pb.VerifyApiKeyResponse
ALL = list(scopes.ALL_SCOPES)


async def listed_environments(harness: Harness, secret: str) -> list[str]:
    """The ids ListEnvironments shows the key."""
    page = await harness.environments.ListEnvironments(
        env_pb.ListEnvironmentsRequest(), metadata=auth(secret)
    )
    return sorted(env.id for env in page.environments)


async def test_key_reach_is_its_environments_within_the_owners(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    prod = await harness.new_environment(org, "Prod")
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, staging.id, member.id)
    _, secret = await harness.new_key(org, ALL, [staging.id, prod.id], owner_member_id=member.id)

    assert await listed_environments(harness, secret) == [staging.id]
    allowed = await harness.verify(secret, staging.id)
    assert allowed.valid and list(allowed.principal.allowed_environment_ids) == [staging.id]
    assert allowed.principal.owner_member_id == member.id
    denied = await harness.verify(secret, prod.id)
    assert not denied.valid and denied.denial_reason == Denial.ENVIRONMENT_NOT_ALLOWED
    await fails(
        harness.environments.GetEnvironment(env_pb.GetEnvironmentRequest(id=prod.id), metadata=auth(secret)),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )

    # Adding the owner to prod widens the key at once, up to the key's own list.
    await harness.add_environment_member(org.owner_secret, prod.id, member.id)
    assert await listed_environments(harness, secret) == sorted([staging.id, prod.id])
    assert (await harness.verify(secret, prod.id)).valid
    assert not (await harness.verify(secret, org.default_environment.id)).valid


async def test_removing_the_owner_from_an_environment_takes_it_from_the_key(
    harness: Harness, org: Org
) -> None:
    staging = await harness.new_environment(org, "Staging")
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, staging.id, member.id)
    await harness.add_environment_member(org.owner_secret, org.default_environment.id, member.id)
    _, secret = await harness.new_key(org, ALL, owner_member_id=member.id)
    assert (await harness.verify(secret, staging.id)).valid

    await harness.members.RemoveEnvironmentMember(
        pb.RemoveEnvironmentMemberRequest(environment_id=staging.id, member_id=member.id),
        metadata=auth(org.owner_secret),
    )
    assert await listed_environments(harness, secret) == [org.default_environment.id]
    denied = await harness.verify(secret, staging.id)
    assert not denied.valid and denied.denial_reason == Denial.ENVIRONMENT_NOT_ALLOWED
    allowed = await harness.verify(secret, org.default_environment.id)
    assert list(allowed.principal.allowed_environment_ids) == [org.default_environment.id]


async def test_deleting_the_owner_disables_its_keys(harness: Harness, org: Org) -> None:
    member = await harness.new_member(org, "ADMIN")
    key, secret = await harness.new_key(org, ALL, owner_member_id=member.id)
    _, env_secret = await harness.new_key(org, ALL, [org.default_environment.id], owner_member_id=member.id)
    assert (await harness.verify(secret, "default")).valid

    await harness.members.DeleteMember(pb.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret))
    for each in (secret, env_secret):
        await fails(
            harness.environments.ListEnvironments(env_pb.ListEnvironmentsRequest(), metadata=auth(each)),
            Code.UNAUTHENTICATED,
            "API_KEY_OWNER_REMOVED",
        )
        denied = await harness.verify(each, "default")
        assert not denied.valid and denied.denial_reason == Denial.OWNER_REMOVED
    # The key stays stored, still tied to its former owner.
    stored = await harness.api_keys.GetApiKey(
        key_pb.GetApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
    )
    assert stored.owner_member_id == member.id
    # Another member with the same email does not revive it.
    await harness.new_member(org, "ADMIN", email=member.email)
    denied = await harness.verify(secret, "default")
    assert denied.denial_reason == Denial.OWNER_REMOVED


async def test_demoting_an_admin_shrinks_its_organization_wide_key(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    prod = await harness.new_environment(org, "Prod")
    member = await harness.new_member(org, "ADMIN")
    await harness.add_environment_member(org.owner_secret, staging.id, member.id)
    _, secret = await harness.new_key(org, ALL, owner_member_id=member.id)
    everything = sorted([org.default_environment.id, staging.id, prod.id])
    assert await listed_environments(harness, secret) == everything
    assert (await harness.verify(secret, prod.id)).principal.organization_wide

    await harness.update_member(org.owner_secret, pb.Member(id=member.id, role=pb.Member.MEMBER), "role")
    assert await listed_environments(harness, secret) == [staging.id]
    denied = await harness.verify(secret, prod.id)
    assert denied.denial_reason == Denial.ENVIRONMENT_NOT_ALLOWED
    allowed = await harness.verify(secret, staging.id)
    assert list(allowed.principal.allowed_environment_ids) == [staging.id]
    # It is no longer an organization-level key either.
    await fails(
        harness.environments.CreateEnvironment(
            env_pb.CreateEnvironmentRequest(name="New"), metadata=auth(secret)
        ),
        Code.PERMISSION_DENIED,
        "ORGANIZATION_KEY_REQUIRED",
    )
    await fails(
        harness.members.ListMembers(pb.ListMembersRequest(), metadata=auth(secret)),
        Code.PERMISSION_DENIED,
        "ORGANIZATION_KEY_REQUIRED",
    )

    # Promoting again restores the full reach.
    await harness.update_member(org.owner_secret, pb.Member(id=member.id, role=pb.Member.ADMIN), "role")
    assert await listed_environments(harness, secret) == everything
    await harness.members.ListMembers(pb.ListMembersRequest(), metadata=auth(secret))


async def test_unowned_keys_do_not_depend_on_members(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    _, secret = await harness.new_key(org, ALL, [staging.id])
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, staging.id, member.id)
    await harness.members.DeleteMember(pb.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret))
    assert await listed_environments(harness, secret) == [staging.id]


async def test_another_replica_sees_membership_changes(harness: Harness, backend: Backend, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, staging.id, member.id)
    _, secret = await harness.new_key(org, ALL, owner_member_id=member.id)
    async with serving(backend) as replica:
        assert (await replica.verify(secret, staging.id)).valid  # warms the replica's cache
        await harness.members.RemoveEnvironmentMember(
            pb.RemoveEnvironmentMemberRequest(environment_id=staging.id, member_id=member.id),
            metadata=auth(org.owner_secret),
        )
        # The replica polls revisions every cache_refresh_seconds (0.2 s in tests).
        for _ in range(50):
            if not (await replica.verify(secret, staging.id)).valid:
                break
            await asyncio.sleep(0.1)
        denied = await replica.verify(secret, staging.id)
        assert denied.denial_reason == Denial.ENVIRONMENT_NOT_ALLOWED
