"""Keys inherit their owner's access: every membership change shows on the key's next call, in
the RPCs it makes and in what VerifyApiKey reports."""

from __future__ import annotations

import asyncio

import grpc
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import environment_pb2 as env_pb
from agentpost.environments.v1 import member_pb2 as pb
from google.protobuf import field_mask_pb2

from service.domain import scopes
from tests.conftest import Backend, start_server
from tests.harness import Harness, Org, auth, fails

Code = grpc.StatusCode
Denial = key_pb.VerifyApiKeyResponse
ALL = list(scopes.ALL_SCOPES)


async def verify(harness: Harness, secret: str, environment: str) -> key_pb.VerifyApiKeyResponse:
    """VerifyApiKey for `secret` acting in `environment`."""
    response: key_pb.VerifyApiKeyResponse = await harness.api_keys.VerifyApiKey(
        key_pb.VerifyApiKeyRequest(secret=secret, environment=environment)
    )
    return response


async def listed_environments(harness: Harness, secret: str) -> list[str]:
    """The ids ListEnvironments shows the key."""
    page = await harness.environments.ListEnvironments(
        env_pb.ListEnvironmentsRequest(), metadata=auth(secret)
    )
    return sorted(env.id for env in page.environments)


async def add(harness: Harness, org: Org, env_id: str, member_id: str) -> None:
    """Gives the member MEMBER access to the environment, as the org owner."""
    await harness.members.AddEnvironmentMember(
        pb.AddEnvironmentMemberRequest(
            environment_id=env_id, member_id=member_id, role=pb.EnvironmentMember.MEMBER
        ),
        metadata=auth(org.owner_secret),
    )


async def set_role(harness: Harness, org: Org, member_id: str, role: int) -> None:
    """Changes the member's organization role, as the org owner."""
    await harness.members.UpdateMember(
        pb.UpdateMemberRequest(
            member=pb.Member(id=member_id, role=role), update_mask=field_mask_pb2.FieldMask(paths=["role"])
        ),
        metadata=auth(org.owner_secret),
    )


async def test_key_reach_is_its_environments_within_the_owners(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    prod = await harness.new_environment(org, "Prod")
    member = await harness.new_member(org, "MEMBER")
    await add(harness, org, staging.id, member.id)
    _, secret = await harness.new_key(org, ALL, [staging.id, prod.id], owner_member_id=member.id)

    assert await listed_environments(harness, secret) == [staging.id]
    allowed = await verify(harness, secret, staging.id)
    assert allowed.valid and list(allowed.principal.allowed_environment_ids) == [staging.id]
    assert allowed.principal.owner_member_id == member.id
    denied = await verify(harness, secret, prod.id)
    assert not denied.valid and denied.denial_reason == Denial.ENVIRONMENT_NOT_ALLOWED
    await fails(
        harness.environments.GetEnvironment(env_pb.GetEnvironmentRequest(id=prod.id), metadata=auth(secret)),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )

    # Adding the owner to prod widens the key at once, up to the key's own list.
    await add(harness, org, prod.id, member.id)
    assert await listed_environments(harness, secret) == sorted([staging.id, prod.id])
    assert (await verify(harness, secret, prod.id)).valid
    assert not (await verify(harness, secret, org.default_environment.id)).valid


async def test_removing_the_owner_from_an_environment_takes_it_from_the_key(
    harness: Harness, org: Org
) -> None:
    staging = await harness.new_environment(org, "Staging")
    member = await harness.new_member(org, "MEMBER")
    await add(harness, org, staging.id, member.id)
    await add(harness, org, org.default_environment.id, member.id)
    _, secret = await harness.new_key(org, ALL, owner_member_id=member.id)
    assert (await verify(harness, secret, staging.id)).valid

    await harness.members.RemoveEnvironmentMember(
        pb.RemoveEnvironmentMemberRequest(environment_id=staging.id, member_id=member.id),
        metadata=auth(org.owner_secret),
    )
    assert await listed_environments(harness, secret) == [org.default_environment.id]
    denied = await verify(harness, secret, staging.id)
    assert not denied.valid and denied.denial_reason == Denial.ENVIRONMENT_NOT_ALLOWED
    allowed = await verify(harness, secret, org.default_environment.id)
    assert list(allowed.principal.allowed_environment_ids) == [org.default_environment.id]


async def test_deleting_the_owner_disables_its_keys(harness: Harness, org: Org) -> None:
    member = await harness.new_member(org, "ADMIN")
    key, secret = await harness.new_key(org, ALL, owner_member_id=member.id)
    _, env_secret = await harness.new_key(org, ALL, [org.default_environment.id], owner_member_id=member.id)
    assert (await verify(harness, secret, "default")).valid

    await harness.members.DeleteMember(pb.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret))
    for each in (secret, env_secret):
        await fails(
            harness.environments.ListEnvironments(env_pb.ListEnvironmentsRequest(), metadata=auth(each)),
            Code.UNAUTHENTICATED,
            "API_KEY_OWNER_REMOVED",
        )
        denied = await verify(harness, each, "default")
        assert not denied.valid and denied.denial_reason == Denial.OWNER_REMOVED
    # The key stays stored, still tied to its former owner.
    stored = await harness.api_keys.GetApiKey(
        key_pb.GetApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
    )
    assert stored.owner_member_id == member.id
    # Another member with the same email does not revive it.
    await harness.new_member(org, "ADMIN", email=member.email)
    denied = await verify(harness, secret, "default")
    assert denied.denial_reason == Denial.OWNER_REMOVED


async def test_demoting_an_admin_shrinks_its_organization_wide_key(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    prod = await harness.new_environment(org, "Prod")
    member = await harness.new_member(org, "ADMIN")
    await add(harness, org, staging.id, member.id)
    _, secret = await harness.new_key(org, ALL, owner_member_id=member.id)
    everything = sorted([org.default_environment.id, staging.id, prod.id])
    assert await listed_environments(harness, secret) == everything
    assert (await verify(harness, secret, prod.id)).principal.organization_wide

    await set_role(harness, org, member.id, pb.Member.MEMBER)
    assert await listed_environments(harness, secret) == [staging.id]
    denied = await verify(harness, secret, prod.id)
    assert denied.denial_reason == Denial.ENVIRONMENT_NOT_ALLOWED
    allowed = await verify(harness, secret, staging.id)
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
    await set_role(harness, org, member.id, pb.Member.ADMIN)
    assert await listed_environments(harness, secret) == everything
    await harness.members.ListMembers(pb.ListMembersRequest(), metadata=auth(secret))


async def test_unowned_keys_do_not_depend_on_members(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    _, secret = await harness.new_key(org, ALL, [staging.id])
    member = await harness.new_member(org, "MEMBER")
    await add(harness, org, staging.id, member.id)
    await harness.members.DeleteMember(pb.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret))
    assert await listed_environments(harness, secret) == [staging.id]


async def test_another_replica_sees_membership_changes(harness: Harness, backend: Backend, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    member = await harness.new_member(org, "MEMBER")
    await add(harness, org, staging.id, member.id)
    _, secret = await harness.new_key(org, ALL, owner_member_id=member.id)
    app, channel = await start_server(backend)
    try:
        replica = Harness(app, channel, backend.name)
        assert (await verify(replica, secret, staging.id)).valid  # warms the replica's cache
        await harness.members.RemoveEnvironmentMember(
            pb.RemoveEnvironmentMemberRequest(environment_id=staging.id, member_id=member.id),
            metadata=auth(org.owner_secret),
        )
        # The replica polls revisions every cache_refresh_seconds (0.2 s in tests).
        for _ in range(50):
            if not (await verify(replica, secret, staging.id)).valid:
                break
            await asyncio.sleep(0.1)
        denied = await verify(replica, secret, staging.id)
        assert denied.denial_reason == Denial.ENVIRONMENT_NOT_ALLOWED
    finally:
        await channel.close()
        await app.stop(grace=0)
