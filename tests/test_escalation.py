"""No escalation, tried the way an attacker would: a key never acts above its owner, a narrower
key cannot revive a wider one, request ids do not cross callers, and VerifyApiKey denials reveal
nothing of what a key may do."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import grpc
from agentpost.environments.v1 import api_key_pb2 as pb
from agentpost.environments.v1 import environment_pb2, member_pb2
from google.protobuf import duration_pb2

from service.domain import scopes
from tests.harness import Harness, Org, auth, fails, stamp

Code = grpc.StatusCode
Reason = pb.VerifyApiKeyResponse
ALL = list(scopes.ALL_SCOPES)


async def create_key(harness: Harness, caller: str, **fields: object) -> pb.CreateApiKeyResponse:
    """CreateApiKey as `caller`, named "made"."""
    response: pb.CreateApiKeyResponse = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(name="made", **fields),  # type: ignore[arg-type]
        metadata=auth(caller),
    )
    return response


async def admin_key(harness: Harness, org: Org) -> tuple[member_pb2.Member, str]:
    """An org ADMIN and an organization-wide key it owns holding every scope."""
    admin = await harness.new_member(org, "ADMIN")
    _, secret = await harness.new_key(org, ALL, owner_member_id=admin.id)
    return admin, secret


# -- 1. A key never acts above its owner --------------------------------------------------------


async def test_admin_key_cannot_make_a_key_no_member_owns(harness: Harness, org: Org) -> None:
    admin, admin_secret = await admin_key(harness, org)
    # Asking for a key no member owns, organization-wide and environment-scoped, gives a key the
    # ADMIN owns: a key no member owns would act as OWNER.
    local = await create_key(harness, admin_secret, scopes=ALL, environment_ids=[org.default_environment.id])
    assert local.api_key.owner_member_id == admin.id
    made = await create_key(harness, admin_secret, scopes=ALL)
    assert made.api_key.owner_member_id == admin.id and not made.api_key.environment_ids
    backdoor = made.secret
    # So the new key cannot do what only an OWNER may: make an OWNER, demote the real OWNER.
    await fails(
        harness.members.CreateMember(
            member_pb2.CreateMemberRequest(
                email=f"boss-{uuid.uuid4().hex[:8]}@example.com", role=member_pb2.Member.OWNER
            ),
            metadata=auth(backdoor),
        ),
        Code.PERMISSION_DENIED,
        "OWNER_REQUIRED",
    )
    await fails(
        harness.update_member(
            backdoor, member_pb2.Member(id=org.owner_member_id, role=member_pb2.Member.MEMBER), "role"
        ),
        Code.PERMISSION_DENIED,
        "OWNER_REQUIRED",
    )
    # And it does not outlive the ADMIN.
    await harness.members.DeleteMember(
        member_pb2.DeleteMemberRequest(id=admin.id), metadata=auth(org.owner_secret)
    )
    assert (await harness.verify(backdoor)).denial_reason == Reason.OWNER_REMOVED
    # An OWNER's key still makes keys no member owns.
    unowned = await create_key(harness, org.owner_secret, scopes=["inboxes:read"])
    assert unowned.api_key.owner_member_id == ""


async def test_admin_key_cannot_make_a_key_an_owner_owns(harness: Harness, org: Org) -> None:
    _, admin_secret = await admin_key(harness, org)
    second_owner = await harness.new_member(org, "OWNER")
    for owner_id in (org.owner_member_id, second_owner.id):
        for environment_ids in ([], [org.default_environment.id]):
            await fails(
                create_key(
                    harness,
                    admin_secret,
                    scopes=["inboxes:read"],
                    environment_ids=environment_ids,
                    owner_member_id=owner_id,
                ),
                Code.PERMISSION_DENIED,
                "OWNER_ESCALATION",
            )
    # ADMINs and MEMBERs it may manage are fine; an unknown member stays NOT_FOUND.
    for role in ("ADMIN", "MEMBER"):
        member = await harness.new_member(org, role)
        made = await create_key(harness, admin_secret, scopes=["inboxes:read"], owner_member_id=member.id)
        assert made.api_key.owner_member_id == member.id
    await fails(
        create_key(
            harness, admin_secret, scopes=["inboxes:read"], owner_member_id="mem_01J0000000000000000000000A"
        ),
        Code.NOT_FOUND,
        "MEMBER_NOT_FOUND",
    )
    # A key no member owns acts as OWNER, so it may.
    _, unowned_secret = await harness.new_key(org, ALL)
    made = await create_key(harness, unowned_secret, scopes=["inboxes:read"], owner_member_id=second_owner.id)
    assert made.api_key.owner_member_id == second_owner.id


async def test_admin_key_cannot_roll_an_owners_key_or_an_unowned_one(harness: Harness, org: Org) -> None:
    admin, admin_secret = await admin_key(harness, org)
    unowned, unowned_secret = await harness.new_key(org, ["inboxes:read"])
    for target in (org.owner_key_id, unowned.id):
        await fails(
            harness.api_keys.RollApiKey(pb.RollApiKeyRequest(id=target), metadata=auth(admin_secret)),
            Code.PERMISSION_DENIED,
            "OWNER_ESCALATION",
        )
    # Neither key was expired by the attempt.
    assert (await harness.verify(org.owner_secret)).valid
    assert (await harness.verify(unowned_secret)).valid
    # A key of a member who is promoted to OWNER becomes out of the ADMIN's hands at once.
    member = await harness.new_member(org, "MEMBER")
    members_key, _ = await harness.new_key(org, ["inboxes:read"], owner_member_id=member.id)
    rolled = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=members_key.id), metadata=auth(admin_secret)
    )
    await harness.update_member(
        org.owner_secret, member_pb2.Member(id=member.id, role=member_pb2.Member.OWNER), "role"
    )
    await fails(
        harness.api_keys.RollApiKey(pb.RollApiKeyRequest(id=rolled.api_key.id), metadata=auth(admin_secret)),
        Code.PERMISSION_DENIED,
        "OWNER_ESCALATION",
    )
    # Its own keys, and another ADMIN's, it may roll.
    own, _ = await harness.new_key(org, ["inboxes:read"], owner_member_id=admin.id)
    again = await harness.api_keys.RollApiKey(pb.RollApiKeyRequest(id=own.id), metadata=auth(admin_secret))
    assert again.api_key.owner_member_id == admin.id


async def test_admin_key_cannot_widen_a_key_acting_above_it(harness: Harness, org: Org) -> None:
    _, admin_secret = await admin_key(harness, org)
    env_a = await harness.new_environment(org, "A")
    env_b = await harness.new_environment(org, "B")
    soon = datetime.now(UTC) + timedelta(hours=1)
    owners_key, _ = await harness.new_key(org, ["inboxes:read"], [env_a.id], org.owner_member_id)
    unowned_key, _ = await harness.new_key(org, ["inboxes:read"], [env_a.id])
    for key in (owners_key, unowned_key):
        await harness.update_key(
            org.owner_secret, pb.ApiKey(id=key.id, expire_time=stamp(soon)), "expire_time"
        )
        widenings = (
            (pb.ApiKey(id=key.id, scopes=["inboxes:read", "inboxes:write"]), "scopes"),
            (pb.ApiKey(id=key.id, environment_ids=[env_a.id, env_b.id]), "environment_ids"),
            (pb.ApiKey(id=key.id), "environment_ids"),  # organization-wide
            (pb.ApiKey(id=key.id), "expire_time"),  # never expires
            (pb.ApiKey(id=key.id, expire_time=stamp(soon + timedelta(days=1))), "expire_time"),
        )
        for change, path in widenings:
            await fails(
                harness.update_key(admin_secret, change, path), Code.PERMISSION_DENIED, "OWNER_ESCALATION"
            )
        got = await harness.api_keys.GetApiKey(
            pb.GetApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
        )
        assert (list(got.scopes), list(got.environment_ids)) == (["inboxes:read"], [env_a.id])
        assert got.expire_time == stamp(soon)
        # Nor may it narrow, rename or revoke it: a narrower key never changes a wider one.
        narrowings = (
            (pb.ApiKey(id=key.id, name="renamed"), "name"),
            (pb.ApiKey(id=key.id, expire_time=stamp(soon - timedelta(minutes=1))), "expire_time"),
            (pb.ApiKey(id=key.id, scopes=["inboxes:read"]), "scopes"),
        )
        for change, path in narrowings:
            await fails(
                harness.update_key(admin_secret, change, path), Code.PERMISSION_DENIED, "OWNER_ESCALATION"
            )
        await fails(
            harness.api_keys.RevokeApiKey(pb.RevokeApiKeyRequest(id=key.id), metadata=auth(admin_secret)),
            Code.PERMISSION_DENIED,
            "OWNER_ESCALATION",
        )
        got = await harness.api_keys.GetApiKey(
            pb.GetApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
        )
        assert (got.name, got.expire_time, got.HasField("revoke_time")) == (key.name, stamp(soon), False)
        # An OWNER's key may.
        narrowed = await harness.update_key(
            org.owner_secret,
            pb.ApiKey(id=key.id, name="renamed", expire_time=stamp(soon - timedelta(minutes=1))),
            "name",
            "expire_time",
        )
        assert narrowed.name == "renamed" and narrowed.expire_time == stamp(soon - timedelta(minutes=1))
    # A MEMBER's key the ADMIN may widen.
    member = await harness.new_member(org, "MEMBER")
    for env_id in (env_a.id, env_b.id):
        await harness.add_environment_member(org.owner_secret, env_id, member.id)
    members_key, _ = await harness.new_key(org, ["inboxes:read"], [env_a.id], member.id)
    widened = await harness.update_key(
        admin_secret,
        pb.ApiKey(
            id=members_key.id, scopes=["inboxes:read", "inboxes:write"], environment_ids=[env_a.id, env_b.id]
        ),
        "scopes",
        "environment_ids",
    )
    assert list(widened.environment_ids) == sorted([env_a.id, env_b.id])


async def test_admin_key_changes_and_revokes_only_keys_acting_at_most_as_admin(
    harness: Harness, org: Org
) -> None:
    admin, admin_secret = await admin_key(harness, org)
    other_admin = await harness.new_member(org, "ADMIN")
    member = await harness.new_member(org, "MEMBER")
    leaver = await harness.new_member(org, "OWNER")
    keys = {
        "own": (await harness.new_key(org, ["inboxes:read"], owner_member_id=admin.id))[0],
        "another ADMIN's": (await harness.new_key(org, ["inboxes:read"], owner_member_id=other_admin.id))[0],
        "a MEMBER's": (await harness.new_key(org, ["inboxes:read"], owner_member_id=member.id))[0],
        "a departed OWNER's": (await harness.new_key(org, ["inboxes:read"], owner_member_id=leaver.id))[0],
    }
    # While its owner is an OWNER, that key is out of the ADMIN's hands; once the owner has left
    # the organization, the key acts as no one and may be cleaned up.
    await fails(
        harness.update_key(admin_secret, pb.ApiKey(id=keys["a departed OWNER's"].id, name="x"), "name"),
        Code.PERMISSION_DENIED,
        "OWNER_ESCALATION",
    )
    await harness.members.DeleteMember(
        member_pb2.DeleteMemberRequest(id=leaver.id), metadata=auth(org.owner_secret)
    )
    for label, key in keys.items():
        renamed = await harness.update_key(
            admin_secret, pb.ApiKey(id=key.id, name=f"renamed {label}"), "name"
        )
        assert renamed.name == f"renamed {label}"
        revoked = await harness.api_keys.RevokeApiKey(
            pb.RevokeApiKeyRequest(id=key.id), metadata=auth(admin_secret)
        )
        assert revoked.HasField("revoke_time"), label


# -- 2. A narrower key cannot revive a wider one --------------------------------------------------


async def expired_key(harness: Harness, org: Org, key_scopes: list[str]) -> tuple[pb.ApiKey, str]:
    """A key no member owns that a roll with no overlap has just expired, and its secret."""
    key, secret = await harness.new_key(org, key_scopes)
    rolled = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=key.id, previous_key_ttl=duration_pb2.Duration(seconds=0)),
        metadata=auth(org.owner_secret),
    )
    assert (await harness.verify(secret)).denial_reason == Reason.EXPIRED
    return rolled.previous_api_key, secret


async def test_narrower_key_cannot_revive_an_expired_wider_key(harness: Harness, org: Org) -> None:
    wide_scopes = ["inboxes:read", "inboxes:write", "messages:write"]
    wide, wide_secret = await expired_key(harness, org, wide_scopes)
    # Unowned (acts as OWNER) and organization-wide, but lacking two of the key's scopes.
    _, narrow_secret = await harness.new_key(org, ["api_keys:read", "api_keys:write", "inboxes:read"])
    later = stamp(datetime.now(UTC) + timedelta(days=30))
    for change in (pb.ApiKey(id=wide.id), pb.ApiKey(id=wide.id, expire_time=later)):
        await fails(
            harness.update_key(narrow_secret, change, "expire_time"),
            Code.PERMISSION_DENIED,
            "SCOPE_ESCALATION",
        )
    # A key holding every scope but owned by an ADMIN acts below the key, which acts as OWNER.
    _, admin_secret = await admin_key(harness, org)
    await fails(
        harness.update_key(admin_secret, pb.ApiKey(id=wide.id), "expire_time"),
        Code.PERMISSION_DENIED,
        "OWNER_ESCALATION",
    )
    response = await harness.verify(wide_secret)
    assert not response.valid and response.denial_reason == Reason.EXPIRED
    got = await harness.api_keys.GetApiKey(pb.GetApiKeyRequest(id=wide.id), metadata=auth(org.owner_secret))
    assert got.state == pb.ApiKey.EXPIRED and got.expire_time == wide.expire_time
    # Narrowing the key to what the caller holds and reviving it together is no escalation.
    revived = await harness.update_key(
        narrow_secret,
        pb.ApiKey(id=wide.id, scopes=["inboxes:read"], expire_time=later),
        "scopes",
        "expire_time",
    )
    assert revived.state == pb.ApiKey.ACTIVE and list(revived.scopes) == ["inboxes:read"]
    assert (await harness.verify(wide_secret, "", "inboxes:read")).valid
    assert (await harness.verify(wide_secret, "", "inboxes:write")).denial_reason == Reason.SCOPE_MISSING


async def test_narrower_key_may_shorten_a_wider_keys_life(harness: Harness, org: Org) -> None:
    far = datetime.now(UTC) + timedelta(days=30)
    wide = (
        await create_key(
            harness, org.owner_secret, scopes=["inboxes:read", "inboxes:write"], expire_time=stamp(far)
        )
    ).api_key
    _, narrow_secret = await harness.new_key(org, ["api_keys:write", "inboxes:read"])
    shorter = stamp(far - timedelta(days=29))
    assert (
        await harness.update_key(narrow_secret, pb.ApiKey(id=wide.id, expire_time=shorter), "expire_time")
    ).expire_time == shorter
    # Setting it back is an extension again.
    await fails(
        harness.update_key(narrow_secret, pb.ApiKey(id=wide.id, expire_time=stamp(far)), "expire_time"),
        Code.PERMISSION_DENIED,
        "SCOPE_ESCALATION",
    )
    # The owner's key, holding every scope, may.
    extended = await harness.update_key(org.owner_secret, pb.ApiKey(id=wide.id), "expire_time")
    assert not extended.HasField("expire_time")


# -- 3. Request ids belong to the calling key -----------------------------------------------------


async def test_create_api_key_request_ids_do_not_cross_callers(harness: Harness, org: Org) -> None:
    env_a = await harness.new_environment(org, "A")
    env_b = await harness.new_environment(org, "B")
    _, victim = await harness.new_key(org, ["api_keys:write", "inboxes:read"], [env_a.id])
    _, attacker = await harness.new_key(org, ["api_keys:write", "inboxes:read"], [env_b.id])
    request_id = str(uuid.uuid4())
    first = await create_key(
        harness, victim, scopes=["inboxes:read"], environment_ids=[env_a.id], request_id=request_id
    )
    # The attacker replays the victim's request id: an independent request, no keyId of A.
    theirs = await create_key(
        harness, attacker, scopes=["inboxes:read"], environment_ids=[env_b.id], request_id=request_id
    )
    assert theirs.api_key.id != first.api_key.id and list(theirs.api_key.environment_ids) == [env_b.id]
    # Each caller's own retry still answers with its own first key.
    for caller, made, env_id in ((victim, first, env_a.id), (attacker, theirs, env_b.id)):
        failure = await fails(
            create_key(
                harness, caller, scopes=["inboxes:read"], environment_ids=[env_id], request_id=request_id
            ),
            Code.ALREADY_EXISTS,
            "DUPLICATE_REQUEST",
        )
        assert failure.metadata == {"keyId": made.api_key.id}
    # The organization owner sending it too is a third, independent request.
    third = await create_key(harness, org.owner_secret, scopes=["inboxes:read"], request_id=request_id)
    assert third.api_key.id not in (first.api_key.id, theirs.api_key.id)


async def test_other_creates_keep_organization_scoped_request_ids(harness: Harness, org: Org) -> None:
    # CreateEnvironment is organization-level: every caller that may send it sees what it made.
    _, other_owner_key = await harness.new_key(org, ALL)
    request_id = str(uuid.uuid4())
    made = [
        await harness.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name="Once", request_id=request_id),
            metadata=auth(secret),
        )
        for secret in (org.owner_secret, other_owner_key)
    ]
    assert made[0].id == made[1].id


# -- 4. VerifyApiKey denials reveal nothing of what the key may do ---------------------------------


def assert_names_only_the_key(response: pb.VerifyApiKeyResponse, org: Org, key_id: str) -> None:
    """A denial whose principal carries the key id and organization id, and nothing else."""
    assert not response.valid
    assert response.principal == pb.Principal(organization_id=org.id, api_key_id=key_id), response.principal


async def test_verify_denials_carry_no_scopes_or_reach(harness: Harness, org: Org) -> None:
    env_a = await harness.new_environment(org, "A", slug="env-a")
    env_b = await harness.new_environment(org, "B", slug="env-b")
    gone = await harness.new_environment(org, "Gone")
    member = await harness.new_member(org, "ADMIN")
    key_scopes = ["inboxes:read", "messages:write"]
    key, secret = await harness.new_key(org, key_scopes, [env_a.id, env_b.id, gone.id], member.id)
    await harness.delete_environment(org.owner_secret, gone.id)
    probes = (
        (("",), Reason.ENVIRONMENT_REQUIRED),
        (("default",), Reason.ENVIRONMENT_NOT_ALLOWED),
        ((org.default_environment.id,), Reason.ENVIRONMENT_NOT_ALLOWED),
        (("nope",), Reason.ENVIRONMENT_NOT_FOUND),
        ((gone.id,), Reason.ENVIRONMENT_DELETED),
        (("env-a", "inboxes:read", "inboxes:write"), Reason.SCOPE_MISSING),
    )
    for arguments, reason in probes:
        response = await harness.verify(secret, *arguments)
        assert response.denial_reason == reason
        assert_names_only_the_key(response, org, key.id)
    # The valid answer still says everything.
    valid = await harness.verify(secret, "env-a", "inboxes:read")
    who = valid.principal
    assert valid.valid and (who.environment_id, who.environment_slug) == (env_a.id, "env-a")
    assert (list(who.scopes), list(who.allowed_environment_ids)) == (key_scopes, sorted([env_a.id, env_b.id]))
    assert who.owner_member_id == member.id
    # Key-level denials: revoked, expired, owner removed.
    revoked, revoked_secret = await harness.new_key(org, key_scopes, [env_a.id])
    await harness.api_keys.RevokeApiKey(
        pb.RevokeApiKeyRequest(id=revoked.id), metadata=auth(org.owner_secret)
    )
    expired, expired_secret = await expired_key(harness, org, key_scopes)
    await harness.members.DeleteMember(
        member_pb2.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret)
    )
    for key_id, key_secret, reason in (
        (revoked.id, revoked_secret, Reason.REVOKED),
        (expired.id, expired_secret, Reason.EXPIRED),
        (key.id, secret, Reason.OWNER_REMOVED),
    ):
        response = await harness.verify(key_secret, "env-a", "inboxes:read")
        assert response.denial_reason == reason
        assert_names_only_the_key(response, org, key_id)
