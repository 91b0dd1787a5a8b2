"""Environment access end to end: add, list, update, remove, ListMemberEnvironments, visibility."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc
import pytest
from agentpost.environments.v1 import member_pb2 as pb
from google.protobuf import empty_pb2

from service.domain import scopes
from tests.harness import Harness, Org, auth, fails, mask

Code = grpc.StatusCode
ALL = list(scopes.ALL_SCOPES)
RANDOM_MEMBER = "mem_01J0000000000000000000000A"
RANDOM_ENV = "env_01J0000000000000000000000A"


def remove(harness: Harness, secret: str, env_id: str, member_id: str) -> Awaitable[empty_pb2.Empty]:
    """RemoveEnvironmentMember as `secret`."""
    return harness.members.RemoveEnvironmentMember(
        pb.RemoveEnvironmentMemberRequest(environment_id=env_id, member_id=member_id), metadata=auth(secret)
    )


def change_role(
    harness: Harness, secret: str, env_id: str, member_id: str, role: pb.EnvironmentMember.Role, *paths: str
) -> Awaitable[pb.EnvironmentMember]:
    """UpdateEnvironmentMember as `secret`, with `paths` as the update mask."""
    return harness.members.UpdateEnvironmentMember(
        pb.UpdateEnvironmentMemberRequest(
            environment_member=pb.EnvironmentMember(environment_id=env_id, member_id=member_id, role=role),
            update_mask=mask(*paths),
        ),
        metadata=auth(secret),
    )


async def environment_member_ids(harness: Harness, secret: str, env_id: str) -> list[str]:
    """The member ids ListEnvironmentMembers returns on its first page."""
    page = await harness.members.ListEnvironmentMembers(
        pb.ListEnvironmentMembersRequest(environment_id=env_id), metadata=auth(secret)
    )
    return [item.member_id for item in page.environment_members]


async def member_environment_ids(harness: Harness, secret: str, member_id: str) -> list[str]:
    """The environment ids ListMemberEnvironments returns on its first page."""
    page = await harness.members.ListMemberEnvironments(
        pb.ListMemberEnvironmentsRequest(member_id=member_id), metadata=auth(secret)
    )
    return [env.id for env in page.environments]


async def test_add_update_list_remove(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    member = await harness.new_member(org, "MEMBER")
    added = await harness.add_environment_member(org.owner_secret, env.id, member.id)
    assert (added.environment_id, added.member_id, added.role) == (
        env.id,
        member.id,
        pb.EnvironmentMember.MEMBER,
    )
    assert added.create_time.seconds > 0 and added.create_time == added.update_time
    assert await environment_member_ids(harness, org.owner_secret, env.id) == [member.id]

    promoted = await change_role(
        harness, org.owner_secret, env.id, member.id, pb.EnvironmentMember.ADMIN, "role"
    )
    assert promoted.role == pb.EnvironmentMember.ADMIN and promoted.create_time == added.create_time
    # An empty mask means the role.
    demoted = await change_role(harness, org.owner_secret, env.id, member.id, pb.EnvironmentMember.MEMBER)
    assert demoted.role == pb.EnvironmentMember.MEMBER

    await remove(harness, org.owner_secret, env.id, member.id)
    assert await environment_member_ids(harness, org.owner_secret, env.id) == []
    await fails(
        remove(harness, org.owner_secret, env.id, member.id), Code.NOT_FOUND, "ENVIRONMENT_MEMBER_NOT_FOUND"
    )
    await fails(
        change_role(harness, org.owner_secret, env.id, member.id, pb.EnvironmentMember.ADMIN, "role"),
        Code.NOT_FOUND,
        "ENVIRONMENT_MEMBER_NOT_FOUND",
    )


async def test_adding_twice_is_already_exists(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env.id, member.id)
    await fails(
        harness.add_environment_member(org.owner_secret, env.id, member.id, pb.EnvironmentMember.ADMIN),
        Code.ALREADY_EXISTS,
        "ENVIRONMENT_MEMBER_EXISTS",
    )


async def test_concurrent_adds_of_one_pair_have_one_winner(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    members = [await harness.new_member(org, "MEMBER") for _ in range(3)]
    for member in members:
        outcomes = await asyncio.gather(
            *(harness.add_environment_member(org.owner_secret, env.id, member.id) for _ in range(4)),
            return_exceptions=True,
        )
        won = [outcome for outcome in outcomes if isinstance(outcome, pb.EnvironmentMember)]
        lost = [outcome for outcome in outcomes if isinstance(outcome, grpc.aio.AioRpcError)]
        assert len(won) == 1 and len(lost) == 3, outcomes
        for error in lost:
            assert error.code() == Code.ALREADY_EXISTS
    assert await environment_member_ids(harness, org.owner_secret, env.id) == sorted(m.id for m in members)


@pytest.mark.parametrize(
    ("env_id", "member_id", "role", "field"),
    [
        ("", "mem_x", pb.EnvironmentMember.MEMBER, "environment_id"),
        ("env_x", "", pb.EnvironmentMember.MEMBER, "member_id"),
        ("env_x", "mem_x", pb.EnvironmentMember.ROLE_UNSPECIFIED, "role"),
        ("env_x", "mem_x", 7, "role"),
    ],
)
async def test_add_rejects_bad_input(
    harness: Harness, org: Org, env_id: str, member_id: str, role: pb.EnvironmentMember.Role, field: str
) -> None:
    failure = await fails(
        harness.add_environment_member(org.owner_secret, env_id, member_id, role), Code.INVALID_ARGUMENT
    )
    assert field in failure.violations


async def test_update_rejects_other_mask_paths(harness: Harness, org: Org) -> None:
    member = await harness.new_member(org, "MEMBER")
    env_id = org.default_environment.id
    await harness.add_environment_member(org.owner_secret, env_id, member.id)
    for paths in (("member_id",), ("role", "create_time"), ("*", "role")):
        failure = await fails(
            change_role(harness, org.owner_secret, env_id, member.id, pb.EnvironmentMember.ADMIN, *paths),
            Code.INVALID_ARGUMENT,
            "FIELD_NOT_MUTABLE",
        )
        assert "update_mask" in failure.violations
    failure = await fails(
        change_role(
            harness, org.owner_secret, env_id, member.id, pb.EnvironmentMember.ROLE_UNSPECIFIED, "role"
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "environment_member.role" in failure.violations
    # `*` and no mask both mean the role, the one mutable field (AIP-134).
    for role_paths in (("*",), ()):
        changed = await change_role(
            harness, org.owner_secret, env_id, member.id, pb.EnvironmentMember.ADMIN, *role_paths
        )
        assert changed.role == pb.EnvironmentMember.ADMIN


async def test_unknown_and_foreign_ids_are_not_found(harness: Harness, org: Org) -> None:
    other = await harness.new_org("Other")
    their_env = await harness.new_environment(other, "Theirs")
    member = await harness.new_member(org, "MEMBER")
    env_id = org.default_environment.id
    for foreign_env in (RANDOM_ENV, their_env.id):
        await fails(
            harness.add_environment_member(org.owner_secret, foreign_env, member.id),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
        await fails(
            remove(harness, org.owner_secret, foreign_env, member.id), Code.NOT_FOUND, "ENVIRONMENT_NOT_FOUND"
        )
        await fails(
            harness.members.ListEnvironmentMembers(
                pb.ListEnvironmentMembersRequest(environment_id=foreign_env), metadata=auth(org.owner_secret)
            ),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
    for foreign_member in (RANDOM_MEMBER, other.owner_member_id):
        await fails(
            harness.add_environment_member(org.owner_secret, env_id, foreign_member),
            Code.NOT_FOUND,
            "MEMBER_NOT_FOUND",
        )
        await fails(
            harness.members.ListMemberEnvironments(
                pb.ListMemberEnvironmentsRequest(member_id=foreign_member), metadata=auth(org.owner_secret)
            ),
            Code.NOT_FOUND,
            "MEMBER_NOT_FOUND",
        )


async def test_deleted_environment_refuses_changes_but_lists(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Old")
    member = await harness.new_member(org, "MEMBER")
    newcomer = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env.id, member.id)
    await harness.delete_environment(org.owner_secret, env.id)
    for call in (
        harness.add_environment_member(org.owner_secret, env.id, newcomer.id),
        change_role(harness, org.owner_secret, env.id, member.id, pb.EnvironmentMember.ADMIN, "role"),
        remove(harness, org.owner_secret, env.id, member.id),
    ):
        await fails(call, Code.FAILED_PRECONDITION, "ENVIRONMENT_DELETED")
    assert await environment_member_ids(harness, org.owner_secret, env.id) == [member.id]
    # A deleted environment is not reached.
    assert await member_environment_ids(harness, org.owner_secret, member.id) == []


async def test_list_environment_members_paginates(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Busy")
    members = [await harness.new_member(org, "MEMBER") for _ in range(5)]
    for member in members:
        await harness.add_environment_member(org.owner_secret, env.id, member.id)
    seen: list[str] = []
    token = ""
    while True:
        page = await harness.members.ListEnvironmentMembers(
            pb.ListEnvironmentMembersRequest(environment_id=env.id, page_size=2, page_token=token),
            metadata=auth(org.owner_secret),
        )
        assert len(page.environment_members) <= 2
        seen += [item.member_id for item in page.environment_members]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(m.id for m in members)
    first = await harness.members.ListEnvironmentMembers(
        pb.ListEnvironmentMembersRequest(environment_id=env.id, page_size=2), metadata=auth(org.owner_secret)
    )
    # The token names its environment: another environment's listing refuses it.
    await fails(
        harness.members.ListEnvironmentMembers(
            pb.ListEnvironmentMembersRequest(
                environment_id=org.default_environment.id, page_token=first.next_page_token
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_member_environments_follow_roles(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    prod = await harness.new_environment(org, "Prod")
    everything = sorted([org.default_environment.id, staging.id, prod.id])
    admin = await harness.new_member(org, "ADMIN")
    member = await harness.new_member(org, "MEMBER")
    assert await member_environment_ids(harness, org.owner_secret, org.owner_member_id) == everything
    assert await member_environment_ids(harness, org.owner_secret, admin.id) == everything
    assert await member_environment_ids(harness, org.owner_secret, member.id) == []
    await harness.add_environment_member(org.owner_secret, staging.id, member.id)
    assert await member_environment_ids(harness, org.owner_secret, member.id) == [staging.id]
    # Pages of one.
    first = await harness.members.ListMemberEnvironments(
        pb.ListMemberEnvironmentsRequest(member_id=admin.id, page_size=1), metadata=auth(org.owner_secret)
    )
    second = await harness.members.ListMemberEnvironments(
        pb.ListMemberEnvironmentsRequest(member_id=admin.id, page_size=1, page_token=first.next_page_token),
        metadata=auth(org.owner_secret),
    )
    assert [e.id for e in (*first.environments, *second.environments)] == everything[:2]
    # A caller limited to staging sees only staging, even of an ADMIN.
    _, staging_key = await harness.new_key(org, ALL, [staging.id])
    assert await member_environment_ids(harness, staging_key, admin.id) == [staging.id]


async def test_member_visibility_below_organization_level(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    prod = await harness.new_environment(org, "Prod")
    in_staging = await harness.new_member(org, "MEMBER")
    in_prod = await harness.new_member(org, "MEMBER")
    admin = await harness.new_member(org, "ADMIN")
    await harness.add_environment_member(org.owner_secret, staging.id, in_staging.id)
    await harness.add_environment_member(org.owner_secret, prod.id, in_prod.id)
    _, staging_key = await harness.new_key(org, ALL, [staging.id])

    async def get(member_id: str) -> pb.Member:
        result: pb.Member = await harness.members.GetMember(
            pb.GetMemberRequest(id=member_id), metadata=auth(staging_key)
        )
        return result

    assert (await get(in_staging.id)).id == in_staging.id
    assert (await get(admin.id)).id == admin.id
    assert (await get(org.owner_member_id)).id == org.owner_member_id
    hidden = await fails(get(in_prod.id), Code.NOT_FOUND, "MEMBER_NOT_FOUND")
    random = await fails(get(RANDOM_MEMBER), Code.NOT_FOUND, "MEMBER_NOT_FOUND")
    assert hidden.message.replace(in_prod.id, "ID") == random.message.replace(RANDOM_MEMBER, "ID")
    await fails(
        harness.members.ListMemberEnvironments(
            pb.ListMemberEnvironmentsRequest(member_id=in_prod.id), metadata=auth(staging_key)
        ),
        Code.NOT_FOUND,
        "MEMBER_NOT_FOUND",
    )
    # A key limited to staging cannot see or change prod's members.
    await fails(
        harness.members.ListEnvironmentMembers(
            pb.ListEnvironmentMembersRequest(environment_id=prod.id), metadata=auth(staging_key)
        ),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )
    await fails(
        harness.add_environment_member(staging_key, prod.id, in_staging.id),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )
    # It administers staging (an unowned key administers its environments), so it may add any
    # member of the organization by id, even one it cannot otherwise see; an unknown id and
    # another organization's member are the same NOT_FOUND.
    await harness.add_environment_member(staging_key, staging.id, in_prod.id)
    await harness.add_environment_member(staging_key, staging.id, admin.id, pb.EnvironmentMember.ADMIN)
    assert await environment_member_ids(harness, staging_key, staging.id) == sorted(
        [in_staging.id, in_prod.id, admin.id]
    )
    other = await harness.new_org("Other")
    for unknown in (RANDOM_MEMBER, other.owner_member_id):
        await fails(
            harness.add_environment_member(staging_key, staging.id, unknown),
            Code.NOT_FOUND,
            "MEMBER_NOT_FOUND",
        )


async def test_deleting_a_member_removes_its_environment_access(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env.id, member.id)
    await harness.members.DeleteMember(pb.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret))
    assert await environment_member_ids(harness, org.owner_secret, env.id) == []


async def test_membership_scopes(harness: Harness, org: Org) -> None:
    member = await harness.new_member(org, "MEMBER")
    _, read_only = await harness.new_key(org, ["members:read"])
    env_id = org.default_environment.id
    await fails(
        harness.add_environment_member(read_only, env_id, member.id), Code.PERMISSION_DENIED, "SCOPE_MISSING"
    )
    assert await environment_member_ids(harness, read_only, env_id) == []
    _, no_members = await harness.new_key(org, ["environments:read"])
    await fails(
        harness.members.ListMemberEnvironments(
            pb.ListMemberEnvironmentsRequest(member_id=member.id), metadata=auth(no_members)
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
