"""Organization members end to end: create, get, list, update, delete, OWNER protection."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import member_pb2 as pb

from service.domain import scopes
from tests.harness import Harness, Org, auth, fails

Code = grpc.StatusCode
ALL = list(scopes.ALL_SCOPES)
RANDOM_MEMBER = "mem_01J0000000000000000000000A"


async def test_create_returns_the_member(harness: Harness, org: Org) -> None:
    member = await harness.members.CreateMember(
        pb.CreateMemberRequest(email="Ada.Lovelace@Example.com", display_name="Ada", role=pb.Member.ADMIN),
        metadata=auth(org.owner_secret),
    )
    assert member.id.startswith("mem_") and len(member.id) == 30
    assert member.organization_id == org.id
    assert member.email == "Ada.Lovelace@Example.com"
    assert member.display_name == "Ada"
    assert member.role == pb.Member.ADMIN
    assert member.etag and member.create_time.seconds > 0
    assert member.create_time == member.update_time
    fetched = await harness.members.GetMember(
        pb.GetMemberRequest(id=member.id), metadata=auth(org.owner_secret)
    )
    assert fetched == member


async def test_email_is_unique_case_insensitively(harness: Harness, org: Org) -> None:
    await harness.new_member(org, "MEMBER", email="grace@example.com")
    await fails(
        harness.members.CreateMember(
            pb.CreateMemberRequest(email="GRACE@example.COM", role=pb.Member.MEMBER),
            metadata=auth(org.owner_secret),
        ),
        Code.ALREADY_EXISTS,
        "EMAIL_TAKEN",
    )
    # Another organization may use the same address.
    other = await harness.new_org("Other")
    await harness.new_member(other, "MEMBER", email="grace@example.com")


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"email": "", "role": pb.Member.MEMBER}, "email"),
        ({"email": "not-an-email", "role": pb.Member.MEMBER}, "email"),
        ({"email": "a b@example.com", "role": pb.Member.MEMBER}, "email"),
        ({"email": "x" * 250 + "@example.com", "role": pb.Member.MEMBER}, "email"),
        ({"email": "ok@example.com", "role": pb.Member.ROLE_UNSPECIFIED}, "role"),
        ({"email": "ok@example.com", "role": 42}, "role"),
        ({"email": "ok@example.com", "role": pb.Member.MEMBER, "display_name": "x" * 101}, "display_name"),
        ({"email": "ok@example.com", "role": pb.Member.MEMBER, "display_name": "bad\x00"}, "display_name"),
        ({"email": "ok@example.com", "role": pb.Member.MEMBER, "request_id": "nope"}, "request_id"),
    ],
)
async def test_create_rejects_bad_input(
    harness: Harness, org: Org, request_fields: dict[str, Any], field: str
) -> None:
    failure = await fails(
        harness.members.CreateMember(
            pb.CreateMemberRequest(**request_fields), metadata=auth(org.owner_secret)
        ),
        Code.INVALID_ARGUMENT,
    )
    assert field in failure.violations


async def test_create_with_request_id_is_idempotent(harness: Harness, org: Org) -> None:
    request_id = str(uuid.uuid4())
    request = pb.CreateMemberRequest(email="retry@example.com", role=pb.Member.MEMBER, request_id=request_id)
    first, second = await asyncio.gather(
        harness.members.CreateMember(request, metadata=auth(org.owner_secret)),
        harness.members.CreateMember(request, metadata=auth(org.owner_secret)),
    )
    assert first == second
    listed = await harness.members.ListMembers(pb.ListMembersRequest(), metadata=auth(org.owner_secret))
    assert [m.email for m in listed.members].count("retry@example.com") == 1


async def test_get_unknown_or_foreign_member_is_not_found(harness: Harness, org: Org) -> None:
    other = await harness.new_org("Other")
    for member_id in (RANDOM_MEMBER, other.owner_member_id, "garbage"):
        failure = await fails(
            harness.members.GetMember(pb.GetMemberRequest(id=member_id), metadata=auth(org.owner_secret)),
            Code.NOT_FOUND,
            "MEMBER_NOT_FOUND",
        )
        assert member_id in failure.message
    failure = await fails(
        harness.members.GetMember(pb.GetMemberRequest(), metadata=auth(org.owner_secret)),
        Code.INVALID_ARGUMENT,
    )
    assert "id" in failure.violations


async def test_list_paginates_by_id(harness: Harness, org: Org) -> None:
    created = [await harness.new_member(org, "MEMBER") for _ in range(4)]
    expected = sorted([org.owner_member_id, *(m.id for m in created)])
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await harness.members.ListMembers(
            pb.ListMembersRequest(page_size=2, page_token=token), metadata=auth(org.owner_secret)
        )
        seen += [m.id for m in page.members]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == expected
    assert pages == 3
    everything = await harness.members.ListMembers(
        pb.ListMembersRequest(page_size=10_000), metadata=auth(org.owner_secret)
    )
    assert [m.id for m in everything.members] == expected and not everything.next_page_token


async def test_list_rejects_bad_paging(harness: Harness, org: Org) -> None:
    await harness.new_member(org, "MEMBER")
    first = await harness.members.ListMembers(
        pb.ListMembersRequest(page_size=1), metadata=auth(org.owner_secret)
    )
    assert first.next_page_token
    await fails(
        harness.members.ListMembers(pb.ListMembersRequest(page_size=-1), metadata=auth(org.owner_secret)),
        Code.INVALID_ARGUMENT,
    )
    await fails(
        harness.members.ListMembers(
            pb.ListMembersRequest(page_token="garbage"), metadata=auth(org.owner_secret)
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    # A token is bound to its caller: another organization's owner cannot use it.
    other = await harness.new_org("Other")
    await fails(
        harness.members.ListMembers(
            pb.ListMembersRequest(page_size=1, page_token=first.next_page_token),
            metadata=auth(other.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_update_changes_only_masked_fields(harness: Harness, org: Org) -> None:
    member = await harness.new_member(org, "MEMBER", email="keep@example.com")
    attempt = pb.Member(
        id=member.id,
        organization_id="org_01J0000000000000000000000A",
        email="changed@example.com",
        display_name="New Name",
        role=pb.Member.ADMIN,
        etag=member.etag,
    )
    renamed = await harness.update_member(org.owner_secret, attempt, "display_name")
    assert renamed.display_name == "New Name"
    assert renamed.role == pb.Member.MEMBER
    assert renamed.email == "keep@example.com" and renamed.organization_id == org.id
    assert renamed.etag != member.etag
    assert renamed.create_time == member.create_time
    promoted = await harness.update_member(
        org.owner_secret, pb.Member(id=member.id, role=pb.Member.ADMIN), "role"
    )
    assert promoted.role == pb.Member.ADMIN and promoted.display_name == "New Name"
    fetched = await harness.members.GetMember(
        pb.GetMemberRequest(id=member.id), metadata=auth(org.owner_secret)
    )
    assert fetched == promoted


async def test_update_rejects_bad_masks_and_stale_etags(harness: Harness, org: Org) -> None:
    member = await harness.new_member(org, "MEMBER")
    for paths in (("email",), ("display_name", "organization_id"), ("*", "role"), ("create_time",)):
        failure = await fails(
            harness.update_member(org.owner_secret, pb.Member(id=member.id, email="x@example.com"), *paths),
            Code.INVALID_ARGUMENT,
            "FIELD_NOT_MUTABLE",
        )
        assert "update_mask" in failure.violations
    # No mask: the mutable fields the request sets (AIP-134); `*`: all of them, so an unset role
    # is refused rather than guessed.
    named = await harness.update_member(org.owner_secret, pb.Member(id=member.id, display_name="x"))
    assert named.display_name == "x" and named.role == pb.Member.MEMBER
    failure = await fails(
        harness.update_member(org.owner_secret, pb.Member(id=member.id)), Code.INVALID_ARGUMENT
    )
    assert failure.reason == "NOTHING_TO_UPDATE" and "update_mask" in failure.violations
    failure = await fails(
        harness.update_member(org.owner_secret, pb.Member(id=member.id, display_name="y"), "*"),
        Code.INVALID_ARGUMENT,
    )
    assert "member.role" in failure.violations
    everything = await harness.update_member(
        org.owner_secret, pb.Member(id=member.id, display_name="", role=pb.Member.ADMIN), "*"
    )
    assert (everything.display_name, everything.role) == ("", pb.Member.ADMIN)
    member = await harness.update_member(
        org.owner_secret, pb.Member(id=member.id, role=pb.Member.MEMBER), "role"
    )
    failure = await fails(
        harness.update_member(org.owner_secret, pb.Member(id=member.id), "role"), Code.INVALID_ARGUMENT
    )
    assert "member.role" in failure.violations
    renamed = await harness.update_member(
        org.owner_secret, pb.Member(id=member.id, display_name="One"), "display_name"
    )
    await fails(
        harness.update_member(
            org.owner_secret,
            pb.Member(id=member.id, display_name="Two", etag=member.etag),
            "display_name",
        ),
        Code.ABORTED,
        "ETAG_MISMATCH",
    )
    await harness.update_member(
        org.owner_secret,
        pb.Member(id=member.id, display_name="Two", etag=renamed.etag),
        "display_name",
    )
    await fails(
        harness.update_member(
            org.owner_secret, pb.Member(id=RANDOM_MEMBER, display_name="x"), "display_name"
        ),
        Code.NOT_FOUND,
        "MEMBER_NOT_FOUND",
    )


async def test_last_owner_can_be_neither_demoted_nor_deleted(harness: Harness, org: Org) -> None:
    owner = pb.Member(id=org.owner_member_id, role=pb.Member.ADMIN)
    await fails(
        harness.update_member(org.owner_secret, owner, "role"), Code.FAILED_PRECONDITION, "LAST_OWNER"
    )
    await fails(
        harness.members.DeleteMember(
            pb.DeleteMemberRequest(id=org.owner_member_id), metadata=auth(org.owner_secret)
        ),
        Code.FAILED_PRECONDITION,
        "LAST_OWNER",
    )
    # With a second OWNER, the first can step down; then the second is the last one.
    second = await harness.new_member(org, "OWNER")
    demoted = await harness.update_member(org.owner_secret, owner, "role")
    assert demoted.role == pb.Member.ADMIN
    await fails(
        harness.update_member(org.owner_secret, pb.Member(id=second.id, role=pb.Member.MEMBER), "role"),
        Code.PERMISSION_DENIED,
        "OWNER_REQUIRED",  # the caller's owner is no longer an OWNER
    )


async def test_delete_member(harness: Harness, org: Org) -> None:
    member = await harness.new_member(org, "ADMIN")
    await fails(
        harness.members.DeleteMember(
            pb.DeleteMemberRequest(id=member.id, etag="stale"), metadata=auth(org.owner_secret)
        ),
        Code.ABORTED,
        "ETAG_MISMATCH",
    )
    await harness.members.DeleteMember(
        pb.DeleteMemberRequest(id=member.id, etag=member.etag), metadata=auth(org.owner_secret)
    )
    await fails(
        harness.members.GetMember(pb.GetMemberRequest(id=member.id), metadata=auth(org.owner_secret)),
        Code.NOT_FOUND,
        "MEMBER_NOT_FOUND",
    )
    await fails(
        harness.members.DeleteMember(pb.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret)),
        Code.NOT_FOUND,
        "MEMBER_NOT_FOUND",
    )
    # The email is free again.
    again = await harness.new_member(org, "MEMBER", email=member.email.upper())
    assert again.id != member.id


async def test_deleting_an_owner_leaves_the_others(harness: Harness, org: Org) -> None:
    second = await harness.new_member(org, "OWNER")
    await harness.members.DeleteMember(pb.DeleteMemberRequest(id=second.id), metadata=auth(org.owner_secret))
    listed = await harness.members.ListMembers(pb.ListMembersRequest(), metadata=auth(org.owner_secret))
    assert [(m.id, m.role) for m in listed.members] == [(org.owner_member_id, pb.Member.OWNER)]


async def test_only_owners_manage_owners(harness: Harness, org: Org) -> None:
    admin = await harness.new_member(org, "ADMIN")
    other_owner = await harness.new_member(org, "OWNER")
    _, admin_secret = await harness.new_key(org, ALL, owner_member_id=admin.id)
    await fails(
        harness.members.CreateMember(
            pb.CreateMemberRequest(email="boss@example.com", role=pb.Member.OWNER),
            metadata=auth(admin_secret),
        ),
        Code.PERMISSION_DENIED,
        "OWNER_REQUIRED",
    )
    for target, role in ((admin.id, pb.Member.OWNER), (other_owner.id, pb.Member.ADMIN)):
        await fails(
            harness.update_member(admin_secret, pb.Member(id=target, role=role), "role"),
            Code.PERMISSION_DENIED,
            "OWNER_REQUIRED",
        )
    await fails(
        harness.update_member(admin_secret, pb.Member(id=other_owner.id, display_name="x"), "display_name"),
        Code.PERMISSION_DENIED,
        "OWNER_REQUIRED",
    )
    await fails(
        harness.members.DeleteMember(pb.DeleteMemberRequest(id=other_owner.id), metadata=auth(admin_secret)),
        Code.PERMISSION_DENIED,
        "OWNER_REQUIRED",
    )
    # An ADMIN manages ADMINs and MEMBERs.
    created = await harness.members.CreateMember(
        pb.CreateMemberRequest(email="helper@example.com", role=pb.Member.ADMIN), metadata=auth(admin_secret)
    )
    demoted = await harness.update_member(
        admin_secret, pb.Member(id=created.id, role=pb.Member.MEMBER), "role"
    )
    assert demoted.role == pb.Member.MEMBER
    # An unowned organization-wide key is owner-level.
    _, unowned_secret = await harness.new_key(org, ALL)
    promoted = await harness.update_member(
        unowned_secret, pb.Member(id=admin.id, role=pb.Member.OWNER), "role"
    )
    assert promoted.role == pb.Member.OWNER


async def test_concurrent_demotions_keep_one_owner(harness: Harness) -> None:
    for _ in range(3):
        org = await harness.new_org()
        second = await harness.new_member(org, "OWNER")
        # An unowned key, so that neither demotion changes the caller's own rights.
        _, secret = await harness.new_key(org, ALL)
        outcomes = await asyncio.gather(
            *(
                harness.update_member(secret, pb.Member(id=member_id, role=pb.Member.ADMIN), "role")
                for member_id in (org.owner_member_id, second.id)
            ),
            return_exceptions=True,
        )
        won = [outcome for outcome in outcomes if isinstance(outcome, pb.Member)]
        lost = [outcome for outcome in outcomes if isinstance(outcome, grpc.aio.AioRpcError)]
        assert len(won) == 1 and len(lost) == 1, outcomes
        await fails(_raise(lost[0]), Code.FAILED_PRECONDITION, "LAST_OWNER")
        listed = await harness.members.ListMembers(pb.ListMembersRequest(), metadata=auth(secret))
        assert [m.role for m in listed.members].count(pb.Member.OWNER) == 1


async def _raise(error: BaseException) -> None:
    """An awaitable that fails as `error` did, so `fails` can inspect it."""
    raise error


async def test_members_scopes_and_levels(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    _, read_only = await harness.new_key(org, ["members:read"])
    _, env_key = await harness.new_key(org, ALL, [env.id])
    await fails(
        harness.members.CreateMember(
            pb.CreateMemberRequest(email="x@example.com", role=pb.Member.MEMBER), metadata=auth(read_only)
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    listed = await harness.members.ListMembers(pb.ListMembersRequest(), metadata=auth(read_only))
    assert [m.id for m in listed.members] == [org.owner_member_id]
    # An environment key is not organization-level, even without an owner.
    for call in (
        harness.members.ListMembers(pb.ListMembersRequest(), metadata=auth(env_key)),
        harness.members.CreateMember(
            pb.CreateMemberRequest(email="x@example.com", role=pb.Member.MEMBER), metadata=auth(env_key)
        ),
        harness.members.DeleteMember(pb.DeleteMemberRequest(id=RANDOM_MEMBER), metadata=auth(env_key)),
    ):
        await fails(call, Code.PERMISSION_DENIED, "ORGANIZATION_KEY_REQUIRED")
