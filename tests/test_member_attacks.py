"""Attacks on membership and environment access control (SPEC §3 MembershipService, §4).

What the other membership tests leave out, tried through the gRPC surface of real servers on both
databases:

- the last OWNER: owners demoting or deleting each other with their own keys at the same moment
  on two replicas, and callers below OWNER or unowned keys trying to remove the last one;
- an environment ADMIN (an organization MEMBER) stepping out of its environment: other
  environments, its own role where it is only a MEMBER, a key narrower than its owner;
- stale reach on another replica: a removed, demoted or deleted member's keys are refused there
  within the bound, and at once when the caller demands the change's revision;
- another organization's ids in UpdateEnvironmentMember / RemoveEnvironmentMember: the same
  NOT_FOUND as a random id, and nothing changes over there;
- update-mask tricks: a role the mask leaves out never applies, repeated and prefixed paths, an
  etag of another member;
- emails that are one address case-insensitively but that a plain lower-casing tells apart, and
  look-alikes (full-width @) that must be refused cleanly;
- deleting a member whose key is streaming events on another replica.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import grpc
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import environment_pb2 as env_pb
from agentpost.environments.v1 import event_pb2, resource_pb2
from agentpost.environments.v1 import member_pb2 as pb

from service.domain import scopes
from tests.harness import Harness, Org, auth, fails, failure_of, mask
from tests.servers import Backend, serving
from tests.watching import Watcher
from tests.writes import outcome, register_call, revision_of

Code = grpc.StatusCode
Denial = key_pb.VerifyApiKeyResponse
ALL = list(scopes.ALL_SCOPES)
RANDOM_MEMBER = "mem_01J0000000000000000000000A"
RANDOM_ENV = "env_01J0000000000000000000000A"
MIN_REVISION = "x-agentpost-min-revision"
# Generous: the README's hard bound is the poll interval plus one read (0.2 s in tests); this only
# keeps a broken promise from hanging the run, it times nothing.
WITHIN_BOUND = 10.0
# A replica whose safety-net poll is far slower than any test here: on SQLite it learns of the
# other replica's writes only when a freshness demand makes it read the log.
SLOW_POLL = 60.0


def fresh(secret: str, revision: int, environment: str | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata for `secret` demanding the organization's `revision`."""
    return (*auth(secret, environment), (MIN_REVISION, str(revision)))


def env_role_call(
    harness: Harness,
    secret: str,
    env_id: str,
    member_id: str,
    role: pb.EnvironmentMember.Role,
    *paths: str,
) -> Any:
    """An UpdateEnvironmentMember call (not yet awaited) as `secret`, `paths` as the mask."""
    return harness.members.UpdateEnvironmentMember(
        pb.UpdateEnvironmentMemberRequest(
            environment_member=pb.EnvironmentMember(environment_id=env_id, member_id=member_id, role=role),
            update_mask=mask(*paths),
        ),
        metadata=auth(secret),
    )


def remove_call(harness: Harness, secret: str, env_id: str, member_id: str) -> Any:
    """A RemoveEnvironmentMember call (not yet awaited) as `secret`."""
    return harness.members.RemoveEnvironmentMember(
        pb.RemoveEnvironmentMemberRequest(environment_id=env_id, member_id=member_id), metadata=auth(secret)
    )


async def roles_of(harness: Harness, org: Org) -> dict[str, int]:
    """Every member of the organization and its role, as the owner's key lists them."""
    page = await harness.members.ListMembers(
        pb.ListMembersRequest(page_size=500), metadata=auth(org.owner_secret)
    )
    return {member.id: member.role for member in page.members}


async def environment_roles(harness: Harness, secret: str, env_id: str) -> dict[str, int]:
    """An environment's members and their roles there."""
    page = await harness.members.ListEnvironmentMembers(
        pb.ListEnvironmentMembersRequest(environment_id=env_id, page_size=500), metadata=auth(secret)
    )
    return {item.member_id: item.role for item in page.environment_members}


async def refusal(call: Awaitable[Any]) -> str:
    """`OK` for a call that succeeded, else "CODE REASON"."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        return f"{failure.code.name} {failure.reason}"
    return "OK"


async def refused_within(call: Any, expected: str, seconds: float = WITHIN_BOUND) -> None:
    """Makes `call()` again and again until it answers `expected` ("CODE REASON"); fails after
    `seconds`."""
    deadline = time.monotonic() + seconds
    seen = await refusal(call())
    while seen != expected:
        assert time.monotonic() < deadline, f"still {seen!r} after {seconds} s, expected {expected!r}"
        await asyncio.sleep(0.05)
        seen = await refusal(call())


# -- 1. the last OWNER -------------------------------------------------------------------------


async def test_owners_removing_each_other_on_two_replicas_leave_one_owner(
    harness: Harness, backend: Backend
) -> None:
    """Two OWNERs, each with its own key, demote or delete each other at the same moment, one
    request on each replica. Whatever order the writes take, exactly one wins and the organization
    keeps exactly one OWNER (the loser is LAST_OWNER, or OWNER_REQUIRED when its replica already
    knew it had lost its rank). Round after round, demotions and deletions mixed."""
    async with serving(backend) as replica:
        for round_number in range(6):
            org = await harness.new_org()
            second = await harness.new_member(org, "OWNER")
            _, second_secret = await harness.new_key(org, ALL, owner_member_id=second.id)
            # Both replicas hold both keys, so neither has to load anything mid-race.
            for server in (harness, replica):
                for secret in (org.owner_secret, second_secret):
                    await server.whoami(secret)
            first_call: Any
            second_call: Any
            if round_number % 2 == 0:
                first_call = harness.members.UpdateMember(
                    pb.UpdateMemberRequest(
                        member=pb.Member(id=second.id, role=pb.Member.ADMIN), update_mask=mask("role")
                    ),
                    metadata=auth(org.owner_secret),
                )
                second_call = replica.members.UpdateMember(
                    pb.UpdateMemberRequest(
                        member=pb.Member(id=org.owner_member_id, role=pb.Member.MEMBER),
                        update_mask=mask("role"),
                    ),
                    metadata=auth(second_secret),
                )
            else:
                first_call = harness.members.DeleteMember(
                    pb.DeleteMemberRequest(id=second.id), metadata=auth(org.owner_secret)
                )
                second_call = replica.members.DeleteMember(
                    pb.DeleteMemberRequest(id=org.owner_member_id), metadata=auth(second_secret)
                )
            outcomes = await asyncio.gather(outcome(first_call), outcome(second_call))
            answers = sorted(answer for answer, _ in outcomes)
            assert answers.count("OK") == 1, outcomes
            assert set(answers) - {"OK"} <= {
                "FAILED_PRECONDITION LAST_OWNER",
                "PERMISSION_DENIED OWNER_REQUIRED",
            }
            # The winner's key is still an owner's (the loser's may no longer make keys); list
            # with an unowned organization key it makes.
            winner_secret = org.owner_secret if outcomes[0][0] == "OK" else second_secret
            _, unowned = await harness.new_key(org, ["members:read"], as_secret=winner_secret)
            page = await harness.members.ListMembers(pb.ListMembersRequest(), metadata=auth(unowned))
            owners = [member.id for member in page.members if member.role == pb.Member.OWNER]
            assert len(owners) == 1, (round_number, outcomes, page.members)


async def test_nobody_removes_the_last_owner(harness: Harness, org: Org) -> None:
    """The only OWNER stays whoever asks: an org ADMIN's key is refused for lack of rank
    (OWNER_REQUIRED, permission before the precondition), an unowned organization-wide key (which
    acts as OWNER) gets LAST_OWNER for a demotion to either role and for a deletion, and an
    unowned key limited to one environment is not organization-level at all. The owner's key
    still works afterwards."""
    admin = await harness.new_member(org, "ADMIN")
    _, admin_secret = await harness.new_key(org, ALL, owner_member_id=admin.id)
    _, unowned = await harness.new_key(org, ALL)
    _, env_unowned = await harness.new_key(org, ALL, [org.default_environment.id])
    owner = org.owner_member_id
    for role in (pb.Member.ADMIN, pb.Member.MEMBER):
        await fails(
            harness.update_member(admin_secret, pb.Member(id=owner, role=role), "role"),
            Code.PERMISSION_DENIED,
            "OWNER_REQUIRED",
        )
        await fails(
            harness.update_member(unowned, pb.Member(id=owner, role=role), "*"),
            Code.FAILED_PRECONDITION,
            "LAST_OWNER",
        )
        await fails(
            harness.update_member(env_unowned, pb.Member(id=owner, role=role), "role"),
            Code.PERMISSION_DENIED,
            "ORGANIZATION_KEY_REQUIRED",
        )
    await fails(
        harness.members.DeleteMember(pb.DeleteMemberRequest(id=owner), metadata=auth(admin_secret)),
        Code.PERMISSION_DENIED,
        "OWNER_REQUIRED",
    )
    await fails(
        harness.members.DeleteMember(pb.DeleteMemberRequest(id=owner), metadata=auth(unowned)),
        Code.FAILED_PRECONDITION,
        "LAST_OWNER",
    )
    assert (await roles_of(harness, org))[owner] == pb.Member.OWNER
    await harness.members.ListMembers(pb.ListMembersRequest(), metadata=auth(org.owner_secret))


async def test_an_owner_who_deleted_itself_has_no_rank_left(harness: Harness, org: Org) -> None:
    """With two OWNERs, one may delete itself; its key is then OWNER_REMOVED at once, so it
    cannot go on to demote the other (which would leave the organization with no owner-level
    member at all) and the other stays OWNER."""
    second = await harness.new_member(org, "OWNER")
    _, second_secret = await harness.new_key(org, ALL, owner_member_id=second.id)
    await harness.members.DeleteMember(pb.DeleteMemberRequest(id=second.id), metadata=auth(second_secret))
    await fails(
        harness.update_member(
            second_secret, pb.Member(id=org.owner_member_id, role=pb.Member.MEMBER), "role"
        ),
        Code.UNAUTHENTICATED,
        "API_KEY_OWNER_REMOVED",
    )
    assert await roles_of(harness, org) == {org.owner_member_id: pb.Member.OWNER}


# -- 2. environment ADMINs stay inside their environment ---------------------------------------


async def test_environment_admin_stays_inside_its_environment(harness: Harness, org: Org) -> None:
    """An organization MEMBER who is ADMIN of A and MEMBER of B, with an organization-wide key:
    it runs A's membership, but cannot add itself or anyone to C (NOT_FOUND, as for a random
    environment), cannot raise its own role in B nor change or remove anyone there
    (ENVIRONMENT_ADMIN_REQUIRED), cannot promote itself in the organization
    (ORGANIZATION_KEY_REQUIRED). A key of its own limited to B does not administer A either
    (NOT_FOUND). Nothing it tried changed anything."""
    env_a = await harness.new_environment(org, "Alpha")
    env_b = await harness.new_environment(org, "Beta")
    env_c = await harness.new_environment(org, "Gamma")
    me = await harness.new_member(org, "MEMBER")
    peer = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env_a.id, me.id, pb.EnvironmentMember.ADMIN)
    await harness.add_environment_member(org.owner_secret, env_b.id, me.id, pb.EnvironmentMember.MEMBER)
    await harness.add_environment_member(org.owner_secret, env_b.id, peer.id, pb.EnvironmentMember.MEMBER)
    _, mine = await harness.new_key(org, ALL, owner_member_id=me.id)
    _, mine_in_b = await harness.new_key(org, ALL, [env_b.id], owner_member_id=me.id)
    before = {
        env.id: await environment_roles(harness, org.owner_secret, env.id) for env in (env_a, env_b, env_c)
    }

    # Where it is ADMIN, it may add anyone by id, as ADMIN too.
    await harness.add_environment_member(mine, env_a.id, peer.id, pb.EnvironmentMember.ADMIN)
    await remove_call(harness, mine, env_a.id, peer.id)

    for target in (env_c.id, RANDOM_ENV):
        for who in (me.id, peer.id):
            await fails(
                harness.add_environment_member(mine, target, who, pb.EnvironmentMember.ADMIN),
                Code.NOT_FOUND,
                "ENVIRONMENT_NOT_FOUND",
            )
    for attempt in (
        env_role_call(harness, mine, env_b.id, me.id, pb.EnvironmentMember.ADMIN, "role"),
        env_role_call(harness, mine, env_b.id, peer.id, pb.EnvironmentMember.ADMIN),
        remove_call(harness, mine, env_b.id, peer.id),
        harness.add_environment_member(mine, env_b.id, org.owner_member_id),
    ):
        await fails(attempt, Code.PERMISSION_DENIED, "ENVIRONMENT_ADMIN_REQUIRED")
    await fails(
        harness.update_member(mine, pb.Member(id=me.id, role=pb.Member.ADMIN), "role"),
        Code.PERMISSION_DENIED,
        "ORGANIZATION_KEY_REQUIRED",
    )
    for attempt in (
        harness.add_environment_member(mine_in_b, env_a.id, peer.id),
        env_role_call(harness, mine_in_b, env_a.id, me.id, pb.EnvironmentMember.MEMBER, "role"),
        remove_call(harness, mine_in_b, env_a.id, me.id),
    ):
        await fails(attempt, Code.NOT_FOUND, "ENVIRONMENT_NOT_FOUND")
    await fails(
        env_role_call(harness, mine_in_b, env_b.id, me.id, pb.EnvironmentMember.ADMIN, "role"),
        Code.PERMISSION_DENIED,
        "ENVIRONMENT_ADMIN_REQUIRED",
    )

    after = {
        env.id: await environment_roles(harness, org.owner_secret, env.id) for env in (env_a, env_b, env_c)
    }
    assert after == before
    assert (await roles_of(harness, org))[me.id] == pb.Member.MEMBER


async def test_a_demoted_environment_admin_loses_the_right_on_its_next_call(
    harness: Harness, org: Org
) -> None:
    """An environment ADMIN demoted to MEMBER there (by an org ADMIN) is refused the next
    membership change in that environment with ENVIRONMENT_ADMIN_REQUIRED, and cannot undo its own
    demotion."""
    env = await harness.new_environment(org, "Ops")
    boss = await harness.new_member(org, "ADMIN")
    _, boss_secret = await harness.new_key(org, ALL, owner_member_id=boss.id)
    lead = await harness.new_member(org, "MEMBER")
    newcomer = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env.id, lead.id, pb.EnvironmentMember.ADMIN)
    _, lead_secret = await harness.new_key(org, ALL, [env.id], owner_member_id=lead.id)
    await harness.add_environment_member(lead_secret, env.id, newcomer.id)
    await env_role_call(harness, boss_secret, env.id, lead.id, pb.EnvironmentMember.MEMBER, "role")
    await fails(
        remove_call(harness, lead_secret, env.id, newcomer.id),
        Code.PERMISSION_DENIED,
        "ENVIRONMENT_ADMIN_REQUIRED",
    )
    await fails(
        env_role_call(harness, lead_secret, env.id, lead.id, pb.EnvironmentMember.ADMIN, "role"),
        Code.PERMISSION_DENIED,
        "ENVIRONMENT_ADMIN_REQUIRED",
    )
    assert await environment_roles(harness, org.owner_secret, env.id) == {
        lead.id: pb.EnvironmentMember.MEMBER,
        newcomer.id: pb.EnvironmentMember.MEMBER,
    }


# -- 3. stale reach on another replica ---------------------------------------------------------


async def test_removed_from_an_environment_on_one_replica_refused_on_the_other(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """A member removed from an environment on replica A: its key, held valid on replica B, is
    refused in that environment on B at once when the call demands the removal's revision
    (ResourceService: NOT_FOUND as if the environment did not exist; VerifyApiKey:
    ENVIRONMENT_NOT_ALLOWED), and without the demand within the bound on a normally polling
    replica."""
    env = await harness.new_environment(org, "Staging")
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env.id, member.id)
    _, secret = await harness.new_key(org, ALL, owner_member_id=member.id)
    async with serving(backend, cache_refresh_seconds=SLOW_POLL) as stale, serving(backend) as polling:
        for server in (stale, polling):
            await register_call(server, secret, f"warm-{uuid.uuid4().hex[:8]}", env.id)
            assert (await server.verify(secret, env.id)).valid
        removal = remove_call(harness, org.owner_secret, env.id, member.id)
        await removal
        revision = await revision_of(removal)

        await fails(
            stale.resources.ListResources(
                resource_pb2.ListResourcesRequest(), metadata=fresh(secret, revision, env.id)
            ),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
        verdict = await stale.api_keys.VerifyApiKey(
            key_pb.VerifyApiKeyRequest(secret=secret, environment=env.id, min_revision=revision)
        )
        assert not verdict.valid and verdict.denial_reason == Denial.ENVIRONMENT_NOT_ALLOWED

        await refused_within(
            lambda: register_call(polling, secret, f"late-{uuid.uuid4().hex[:8]}", env.id),
            "NOT_FOUND ENVIRONMENT_NOT_FOUND",
        )


async def test_demoted_admin_loses_organization_calls_on_the_other_replica(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """An org ADMIN demoted to MEMBER on replica A: its organization-wide key, held as an ADMIN's
    on replica B, may no longer make organization-level calls there: at once with the demotion's
    revision demanded, within the bound otherwise. It can neither create a member nor promote
    itself back through the stale replica."""
    admin = await harness.new_member(org, "ADMIN")
    _, secret = await harness.new_key(org, ALL, owner_member_id=admin.id)
    async with serving(backend, cache_refresh_seconds=SLOW_POLL) as stale, serving(backend) as polling:
        for server in (stale, polling):
            await server.members.ListMembers(pb.ListMembersRequest(), metadata=auth(secret))
        demotion = harness.members.UpdateMember(
            pb.UpdateMemberRequest(
                member=pb.Member(id=admin.id, role=pb.Member.MEMBER), update_mask=mask("role")
            ),
            metadata=auth(org.owner_secret),
        )
        await demotion
        revision = await revision_of(demotion)
        await fails(
            stale.members.CreateMember(
                pb.CreateMemberRequest(
                    email=f"sneak-{uuid.uuid4().hex[:6]}@example.com", role=pb.Member.ADMIN
                ),
                metadata=fresh(secret, revision),
            ),
            Code.PERMISSION_DENIED,
            "ORGANIZATION_KEY_REQUIRED",
        )
        await fails(
            stale.members.UpdateMember(
                pb.UpdateMemberRequest(
                    member=pb.Member(id=admin.id, role=pb.Member.ADMIN), update_mask=mask("role")
                ),
                metadata=fresh(secret, revision),
            ),
            Code.PERMISSION_DENIED,
            "ORGANIZATION_KEY_REQUIRED",
        )
        await refused_within(
            lambda: polling.members.ListMembers(pb.ListMembersRequest(), metadata=auth(secret)),
            "PERMISSION_DENIED ORGANIZATION_KEY_REQUIRED",
        )
    assert (await roles_of(harness, org))[admin.id] == pb.Member.MEMBER


async def test_demoted_environment_admin_refused_on_the_other_replica(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """An environment ADMIN demoted to environment MEMBER on replica A is refused
    ENVIRONMENT_ADMIN_REQUIRED on a stale replica B as soon as its call demands the demotion's
    revision; the member it tried to add is not added."""
    env = await harness.new_environment(org, "Ops")
    lead = await harness.new_member(org, "MEMBER")
    newcomer = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env.id, lead.id, pb.EnvironmentMember.ADMIN)
    _, secret = await harness.new_key(org, ALL, owner_member_id=lead.id)
    async with serving(backend, cache_refresh_seconds=SLOW_POLL) as stale:
        await environment_roles(stale, secret, env.id)
        demotion = env_role_call(
            harness, org.owner_secret, env.id, lead.id, pb.EnvironmentMember.MEMBER, "role"
        )
        await demotion
        revision = await revision_of(demotion)
        await fails(
            stale.members.AddEnvironmentMember(
                pb.AddEnvironmentMemberRequest(
                    environment_id=env.id, member_id=newcomer.id, role=pb.EnvironmentMember.ADMIN
                ),
                metadata=fresh(secret, revision),
            ),
            Code.PERMISSION_DENIED,
            "ENVIRONMENT_ADMIN_REQUIRED",
        )
    assert await environment_roles(harness, org.owner_secret, env.id) == {
        lead.id: pb.EnvironmentMember.MEMBER
    }


# -- 4. another organization's ids -------------------------------------------------------------


async def test_foreign_ids_in_environment_member_changes_are_random_ids(harness: Harness, org: Org) -> None:
    """UpdateEnvironmentMember and RemoveEnvironmentMember naming another organization's
    environment, or its member (in ours or in theirs), answer exactly what a random id answers,
    code, reason and message alike (ids replaced); the other organization's access is untouched."""
    other = await harness.new_org("Other")
    their_env = await harness.new_environment(other, "Theirs")
    theirs = await harness.new_member(other, "MEMBER")
    await harness.add_environment_member(other.owner_secret, their_env.id, theirs.id)
    ours = await harness.new_member(org, "MEMBER")
    our_env = await harness.new_environment(org, "Ours")
    await harness.add_environment_member(org.owner_secret, our_env.id, ours.id)
    their_before = await environment_roles(harness, other.owner_secret, their_env.id)
    their_default_before = await environment_roles(harness, other.owner_secret, other.default_environment.id)

    def shape(failure_message: str, *ids: str) -> str:
        for each in ids:
            failure_message = failure_message.replace(each, "ID")
        return failure_message

    cases = [
        # (environment, member): the foreign pair, then the random pair it must look like.
        ((their_env.id, theirs.id), (RANDOM_ENV, RANDOM_MEMBER)),
        ((their_env.id, ours.id), (RANDOM_ENV, ours.id)),
        ((our_env.id, theirs.id), (our_env.id, RANDOM_MEMBER)),
        ((other.default_environment.id, other.owner_member_id), (RANDOM_ENV, RANDOM_MEMBER)),
    ]
    for (env_id, member_id), (random_env, random_member) in cases:
        for make in (
            lambda e, m: env_role_call(harness, org.owner_secret, e, m, pb.EnvironmentMember.ADMIN, "role"),
            lambda e, m: remove_call(harness, org.owner_secret, e, m),
        ):
            foreign = await fails(make(env_id, member_id), Code.NOT_FOUND)
            random = await fails(make(random_env, random_member), Code.NOT_FOUND)
            assert foreign.reason == random.reason, (env_id, member_id, foreign, random)
            assert shape(foreign.message, env_id, member_id) == shape(
                random.message, random_env, random_member
            )
    assert await environment_roles(harness, other.owner_secret, their_env.id) == their_before
    assert (
        await environment_roles(harness, other.owner_secret, other.default_environment.id)
        == their_default_before
    )
    assert await environment_roles(harness, org.owner_secret, our_env.id) == {
        ours.id: pb.EnvironmentMember.MEMBER
    }


# -- 5. update-mask tricks ---------------------------------------------------------------------


async def test_a_role_the_mask_leaves_out_never_applies(harness: Harness, org: Org) -> None:
    """An ADMIN renaming a MEMBER with `role: OWNER` in the body but only `display_name` in the
    mask: allowed (it changes no role), and the member stays a MEMBER; the same with an OWNER as
    the target is still OWNER_REQUIRED (an ADMIN never changes an OWNER)."""
    admin = await harness.new_member(org, "ADMIN")
    _, admin_secret = await harness.new_key(org, ALL, owner_member_id=admin.id)
    member = await harness.new_member(org, "MEMBER")
    renamed = await harness.update_member(
        admin_secret, pb.Member(id=member.id, display_name="Renamed", role=pb.Member.OWNER), "display_name"
    )
    assert (renamed.display_name, renamed.role) == ("Renamed", pb.Member.MEMBER)
    await fails(
        harness.update_member(
            admin_secret,
            pb.Member(id=org.owner_member_id, display_name="Pwned", role=pb.Member.MEMBER),
            "display_name",
        ),
        Code.PERMISSION_DENIED,
        "OWNER_REQUIRED",
    )
    assert (await roles_of(harness, org))[member.id] == pb.Member.MEMBER


async def test_odd_mask_paths_are_refused_or_read_by_the_rule(harness: Harness, org: Org) -> None:
    """Repeated paths mean the field once; a path spelled with its message's name
    (`member.role`), an output-only field, an empty path, an upper-cased one or a long non-ASCII
    one are INVALID_ARGUMENT FIELD_NOT_MUTABLE naming `update_mask` (never INTERNAL), and change
    nothing. The same for UpdateEnvironmentMember."""
    member = await harness.new_member(org, "MEMBER")
    env_id = org.default_environment.id
    await harness.add_environment_member(org.owner_secret, env_id, member.id)
    twice = await harness.update_member(
        org.owner_secret, pb.Member(id=member.id, display_name="Twice", role=pb.Member.ADMIN), "role", "role"
    )
    assert (twice.role, twice.display_name) == (pb.Member.ADMIN, "Member")
    for paths in (
        ("member.role",),
        ("etag",),
        ("id",),
        ("",),
        ("ROLE",),
        ("rôle" * 80,),
        ("display_name", "email"),
    ):
        failure = await fails(
            harness.update_member(org.owner_secret, pb.Member(id=member.id, role=pb.Member.OWNER), *paths),
            Code.INVALID_ARGUMENT,
            "FIELD_NOT_MUTABLE",
        )
        assert "update_mask" in failure.violations
    changed = await env_role_call(
        harness, org.owner_secret, env_id, member.id, pb.EnvironmentMember.ADMIN, "role", "role"
    )
    assert changed.role == pb.EnvironmentMember.ADMIN
    for paths in (("environment_member.role",), ("environment_id",), ("",), ("update_time",)):
        failure = await fails(
            env_role_call(harness, org.owner_secret, env_id, member.id, pb.EnvironmentMember.MEMBER, *paths),
            Code.INVALID_ARGUMENT,
            "FIELD_NOT_MUTABLE",
        )
        assert "update_mask" in failure.violations
    assert (await roles_of(harness, org))[member.id] == pb.Member.ADMIN
    assert (await environment_roles(harness, org.owner_secret, env_id))[
        member.id
    ] == pb.EnvironmentMember.ADMIN


async def test_an_etag_of_another_member_is_stale(harness: Harness, org: Org) -> None:
    """An etag is tied to its member: one member's current etag sent to update or delete another
    is ABORTED ETAG_MISMATCH, and neither changes."""
    first = await harness.new_member(org, "MEMBER")
    second = await harness.new_member(org, "MEMBER")
    await fails(
        harness.update_member(
            org.owner_secret, pb.Member(id=second.id, display_name="x", etag=first.etag), "display_name"
        ),
        Code.ABORTED,
        "ETAG_MISMATCH",
    )
    await fails(
        harness.members.DeleteMember(
            pb.DeleteMemberRequest(id=second.id, etag=first.etag), metadata=auth(org.owner_secret)
        ),
        Code.ABORTED,
        "ETAG_MISMATCH",
    )
    fetched = await harness.members.GetMember(
        pb.GetMemberRequest(id=second.id), metadata=auth(org.owner_secret)
    )
    assert fetched == second


# -- 6. emails ---------------------------------------------------------------------------------


async def test_an_address_and_its_own_upper_case_are_one_email(harness: Harness, org: Org) -> None:
    """SPEC §3 says "Email unique per org, compared case-insensitively": an address and its own
    upper-case spelling (Python's `str.upper`, the Unicode case mapping) are the same address
    case-insensitively, so the second is ALREADY_EXISTS EMAIL_TAKEN. A plain lower-casing of each
    side is not a case-insensitive comparison outside ASCII: the Greek final sigma lower-cases to
    U+03C2 (final sigma) but U+03C3 upper-cases to U+03A3, `ß` upper-cases to `SS`, the `ﬁ` ligature to `FI`."""
    outcomes: dict[str, str] = {}
    for local in ("\u03bf\u03b4\u03bf\u03c3", "straße", "ﬁnance", "grace"):
        tag = uuid.uuid4().hex[:6]
        first = f"{tag}.{local}@example.com"
        upper = first.upper()
        assert upper.casefold() == first.casefold()
        await harness.new_member(org, "MEMBER", email=first)
        outcomes[f"{first!a} then {upper!a}"] = await refusal(harness.new_member(org, "MEMBER", email=upper))
    accepted = [pair for pair, answer in outcomes.items() if answer != "ALREADY_EXISTS EMAIL_TAKEN"]
    assert not accepted, f"both addresses accepted: {accepted}"


async def test_email_look_alikes_are_refused_cleanly_or_kept_apart(harness: Harness, org: Org) -> None:
    """Look-alikes of a taken address: a full-width at sign (U+FF20) is no `@` (INVALID_ARGUMENT naming
    `email`); the Kelvin sign lower-cases to `k`, so it is the same address (EMAIL_TAKEN).
    A decomposed accent is the same address as the composed one (the caseless match normalizes
    both), while a trailing dot on the domain and the domain's punycode spelling are different
    addresses (README), and none of them is ever INTERNAL."""
    tag = uuid.uuid4().hex[:6]
    await harness.new_member(org, "MEMBER", email=f"kate.{tag}@bücher.example")
    await harness.new_member(org, "MEMBER", email=f"josé.{tag}@example.com")
    failure = await fails(
        harness.new_member(org, "MEMBER", email=f"kate.{tag}\uff20bücher.example"), Code.INVALID_ARGUMENT
    )
    assert "email" in failure.violations
    await fails(
        harness.new_member(org, "MEMBER", email=f"\u212aate.{tag}@bücher.example"),
        Code.ALREADY_EXISTS,
        "EMAIL_TAKEN",
    )
    answers = {
        variant: await refusal(harness.new_member(org, "MEMBER", email=variant))
        for variant in (
            f"kate.{tag}@bücher.example.",
            f"kate.{tag}@xn--bcher-kva.example",
            f"jose\u0301.{tag}@example.com",
        )
    }
    assert list(answers.values()) == ["OK", "OK", "ALREADY_EXISTS EMAIL_TAKEN"], answers


# -- 7. deleting a member with keys and a stream on another replica ----------------------------


async def test_deleting_a_member_stops_its_keys_and_stream_on_another_replica(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """A MEMBER's organization-wide and environment keys are held valid on replica B, one of them
    streaming events there. Deleted on replica A: on B each key is refused API_KEY_OWNER_REMOVED
    within the bound (and VerifyApiKey says OWNER_REMOVED), the stream ends UNAUTHENTICATED
    API_KEY_OWNER_REMOVED, and a stale replica demanded the deletion's revision says
    OWNER_REMOVED at once."""
    env = await harness.new_environment(org, "Staging")
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(org.owner_secret, env.id, member.id, pb.EnvironmentMember.ADMIN)
    _, wide = await harness.new_key(org, ALL, owner_member_id=member.id)
    _, narrow = await harness.new_key(org, ALL, [env.id], owner_member_id=member.id)
    async with serving(backend) as replica, serving(backend, cache_refresh_seconds=SLOW_POLL) as stale:
        for server in (replica, stale):
            for secret in (wide, narrow):
                assert (await server.verify(secret, env.id)).valid
                await environment_roles(server, secret, env.id)
        watcher = Watcher(replica.channel, wide)
        try:
            await watcher.live()
            deletion = harness.members.DeleteMember(
                pb.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret)
            )
            await deletion
            revision = await revision_of(deletion)
            for secret in (wide, narrow):
                verdict = await stale.api_keys.VerifyApiKey(
                    key_pb.VerifyApiKeyRequest(secret=secret, environment=env.id, min_revision=revision)
                )
                assert not verdict.valid and verdict.denial_reason == Denial.OWNER_REMOVED
                await fails(
                    stale.members.ListEnvironmentMembers(
                        pb.ListEnvironmentMembersRequest(environment_id=env.id),
                        metadata=fresh(secret, revision),
                    ),
                    Code.UNAUTHENTICATED,
                    "API_KEY_OWNER_REMOVED",
                )
                await refused_within(
                    lambda secret=secret: replica.environments.ListEnvironments(
                        env_pb.ListEnvironmentsRequest(), metadata=auth(secret)
                    ),
                    "UNAUTHENTICATED API_KEY_OWNER_REMOVED",
                )
                assert (await replica.verify(secret, env.id)).denial_reason == Denial.OWNER_REMOVED
            failure = await watcher.ended_with(WITHIN_BOUND)
            assert (failure.code, failure.reason) == (Code.UNAUTHENTICATED, "API_KEY_OWNER_REMOVED")
        finally:
            await watcher.close()


async def test_a_demoted_admins_stream_stops_showing_organization_events(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """An org ADMIN's organization-wide key watches events on replica B. Demoted to MEMBER (no
    environment) on A, the stream may go on, but member events (organization-level) are no
    longer delivered: a member created after the demotion never shows, while the demoted member's
    later access to the default environment does."""
    admin = await harness.new_member(org, "ADMIN")
    _, secret = await harness.new_key(org, ["events:read", "members:read"], owner_member_id=admin.id)
    async with serving(backend) as replica:
        watcher = Watcher(
            replica.channel,
            secret,
            resource_types=[event_pb2.Event.MEMBER, event_pb2.Event.ENVIRONMENT_MEMBER],
        )
        try:
            await watcher.live()
            seen_before = await harness.new_member(org, "MEMBER")
            await watcher.until(lambda: any(e.resource_id == seen_before.id for e in watcher.events))
            await harness.update_member(
                org.owner_secret, pb.Member(id=admin.id, role=pb.Member.MEMBER), "role"
            )
            hidden = await harness.new_member(org, "MEMBER")
            added = await harness.members.AddEnvironmentMember(
                pb.AddEnvironmentMemberRequest(
                    environment_id=org.default_environment.id,
                    member_id=admin.id,
                    role=pb.EnvironmentMember.MEMBER,
                ),
                metadata=auth(org.owner_secret),
            )
            await watcher.until(
                lambda: any(
                    e.resource_type == event_pb2.Event.ENVIRONMENT_MEMBER
                    and e.environment_member.member_id == admin.id
                    for e in watcher.events
                )
            )
            assert added.member_id == admin.id
            assert all(e.resource_id != hidden.id for e in watcher.events), [
                (e.resource_type, e.resource_id) for e in watcher.events
            ]
        finally:
            await watcher.close()
