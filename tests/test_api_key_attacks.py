"""Attacks on the API key lifecycle (SPEC §3 ApiKeyService, §4), where the other key tests do not
go: the edges of a roll's overlap (sub-microsecond durations, concurrent rolls, rolling a key in
its overlap window, the calling key, a key whose owner left), a roll, expiry, demotion and
deletion seen from another replica with and without `x-agentpost-min-revision`, update-mask
tricks and self-widening, revoke edges, far-future expiries, and VerifyApiKey inputs that look
almost right. Every call goes through the gRPC surface of real servers, on both databases."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as pb
from agentpost.environments.v1 import environment_pb2, member_pb2, resource_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from service.domain import keys, scopes
from tests.harness import Harness, Org, auth, fails, failure_of, mask, stamp
from tests.servers import Backend, serving
from tests.writes import outcome, revision_of

Code = grpc.StatusCode
Reason = pb.VerifyApiKeyResponse
ALL = list(scopes.ALL_SCOPES)
MIN_REVISION = "x-agentpost-min-revision"
RANDOM_ENV_ID = "env_01J0000000000000000000000A"
# Generous hang detectors: nothing here is timed, these only end a wait that would never end.
HANG = 10.0
WAIT_SECONDS = 10.0


@contextlib.asynccontextmanager
async def slow_replica(backend: Backend) -> AsyncIterator[Harness]:
    """Another replica on the same database whose safety-net poll is far too slow to help: on
    SQLite it learns of the other replica's writes only when a freshness demand makes it read
    the log (on PostgreSQL it also hears NOTIFY)."""
    async with serving(backend, cache_refresh_seconds=30.0) as running:
        yield running


def fresh(secret: str, revision: int, environment: str | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata for `secret` that demands at least `revision` of its organization."""
    return (*auth(secret, environment), (MIN_REVISION, str(revision)))


async def verify_at(
    server: Harness, secret: str, min_revision: int = 0, environment: str = "", *required: str
) -> pb.VerifyApiKeyResponse:
    """VerifyApiKey on `server`, demanding `min_revision` of the key's organization."""
    response: pb.VerifyApiKeyResponse = await server.api_keys.VerifyApiKey(
        pb.VerifyApiKeyRequest(
            secret=secret, environment=environment, required_scopes=list(required), min_revision=min_revision
        ),
        timeout=HANG,
    )
    return response


async def key_ids_named(harness: Harness, org: Org, name: str) -> set[str]:
    """The ids of the organization's keys (revoked ones included) called `name`."""
    listed = await harness.api_keys.ListApiKeys(
        pb.ListApiKeysRequest(show_revoked=True, page_size=500), metadata=auth(org.owner_secret)
    )
    return {key.id for key in listed.api_keys if key.name == name}


def register_request(resource_id: str) -> resource_pb2.RegisterResourceRequest:
    """A RegisterResource request for an inbox."""
    return resource_pb2.RegisterResourceRequest(
        kind=resource_pb2.ScopedResource.INBOX, resource_id=resource_id
    )


async def get_key(harness: Harness, org: Org, key_id: str) -> pb.ApiKey:
    """GetApiKey as the organization's owner."""
    got: pb.ApiKey = await harness.api_keys.GetApiKey(
        pb.GetApiKeyRequest(id=key_id), metadata=auth(org.owner_secret)
    )
    return got


def roll_call(harness: Harness, caller: str, key_id: str, ttl: duration_pb2.Duration | None = None) -> Any:
    """A RollApiKey call (not yet awaited) as `caller`."""
    request = pb.RollApiKeyRequest(id=key_id)
    if ttl is not None:
        request.previous_key_ttl.CopyFrom(ttl)
    return harness.api_keys.RollApiKey(request, metadata=auth(caller))


# -- 1. RollApiKey ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        pytest.param(0, -1, id="minus one nanosecond"),
        pytest.param(7 * 86400, 1, id="seven days and a nanosecond"),
    ],
)
async def test_a_previous_key_ttl_off_its_range_by_nanoseconds_is_refused(
    harness: Harness, org: Org, seconds: int, nanos: int
) -> None:
    """`previous_key_ttl` is "at most 7 days" and a negative one is INVALID_ARGUMENT (the proto,
    and `test_roll_without_overlap_and_bad_ttl` for whole seconds). A Duration that is negative, or
    over seven days, by less than a microsecond is still a valid Duration outside that range: it
    must be refused naming the field, and must roll nothing (the key stays usable, no successor)."""
    name = f"ttl-{uuid.uuid4().hex[:8]}"
    key, secret = await harness.new_key(org, ["inboxes:read"], name=name)
    failure = await fails(
        roll_call(harness, org.owner_secret, key.id, duration_pb2.Duration(seconds=seconds, nanos=nanos)),
        Code.INVALID_ARGUMENT,
    )
    assert "previous_key_ttl" in failure.violations
    assert (await harness.verify(secret)).valid
    assert await key_ids_named(harness, org, name) == {key.id}


async def test_concurrent_rolls_without_overlap_have_one_winner(harness: Harness, org: Org) -> None:
    """Four rolls of one key at once, none keeping the previous key: the first to commit expires
    the key, so every other one meets an expired key (FAILED_PRECONDITION API_KEY_EXPIRED). Exactly
    one successor exists, it is the one whose secret was handed out, and it works."""
    name = f"raced-{uuid.uuid4().hex[:8]}"
    key, secret = await harness.new_key(org, ["inboxes:read"], name=name)
    calls = [roll_call(harness, org.owner_secret, key.id) for _ in range(4)]
    outcomes = await asyncio.gather(*(outcome(call) for call in calls))
    assert sorted(status for status, _ in outcomes) == ["FAILED_PRECONDITION API_KEY_EXPIRED"] * 3 + ["OK"]
    winner = next(call for call, (status, _) in zip(calls, outcomes, strict=True) if status == "OK")
    rolled: pb.RollApiKeyResponse = await winner
    assert await key_ids_named(harness, org, name) == {key.id, rolled.api_key.id}
    assert (await harness.verify(rolled.secret)).valid
    assert (await harness.verify(secret)).denial_reason == Reason.EXPIRED


async def test_concurrent_rolls_with_overlap_leave_no_hidden_successor(harness: Harness, org: Org) -> None:
    """Three rolls of one key at once, each keeping the previous key for an hour. Whatever the
    outcome, every successor that exists was handed to a caller and is listed, and the previous
    key's life was only ever shortened: it ends no later than the first roll said."""
    name = f"overlap-{uuid.uuid4().hex[:8]}"
    key, secret = await harness.new_key(org, ["inboxes:read"], name=name)
    hour = duration_pb2.Duration(seconds=3600)
    before = datetime.now(UTC)
    results = await asyncio.gather(
        *(roll_call(harness, org.owner_secret, key.id, hour) for _ in range(3)),
        return_exceptions=True,
    )
    handed_out = {result.api_key.id for result in results if isinstance(result, pb.RollApiKeyResponse)}
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            failure = failure_of(result)
            assert (failure.code, failure.reason) == (Code.FAILED_PRECONDITION, "API_KEY_EXPIRED"), failure
        else:
            assert isinstance(result, pb.RollApiKeyResponse), result
    assert handed_out, "no roll succeeded"
    assert await key_ids_named(harness, org, name) == {key.id} | handed_out
    previous = await get_key(harness, org, key.id)
    assert previous.expire_time.ToDatetime(tzinfo=UTC) <= before + timedelta(hours=1, seconds=30)
    assert (await harness.verify(secret)).valid  # still inside its overlap


async def test_rolling_the_calling_key_itself(harness: Harness, org: Org) -> None:
    """A key may roll itself (it holds its own scopes and acts with its own role). With no
    overlap the call that rolled it still succeeds and answers the revision it committed; from
    the very next call its old secret is EXPIRED, on calls and in VerifyApiKey, and the new one
    works with exactly the same access."""
    env = await harness.new_environment(org, "Self roll")
    mine = ["api_keys:read", "api_keys:write", "inboxes:read"]
    key, secret = await harness.new_key(org, mine, [env.id])
    call = harness.api_keys.RollApiKey(pb.RollApiKeyRequest(id=key.id), metadata=auth(secret))
    rolled = await call
    assert await revision_of(call) > 0
    assert rolled.previous_api_key.id == key.id and rolled.previous_api_key.state == pb.ApiKey.EXPIRED
    await fails(
        harness.api_keys.GetApiKey(pb.GetApiKeyRequest(id=key.id), metadata=auth(secret)),
        Code.UNAUTHENTICATED,
        "API_KEY_EXPIRED",
    )
    assert (await harness.verify(secret, env.id)).denial_reason == Reason.EXPIRED
    answer = await harness.verify(rolled.secret, env.id, *mine)
    assert answer.valid and list(answer.principal.allowed_environment_ids) == [env.id]
    assert list(answer.principal.scopes) == sorted(mine)
    # The successor cannot roll the old key back to life either.
    await fails(
        harness.api_keys.RollApiKey(pb.RollApiKeyRequest(id=key.id), metadata=auth(rolled.secret)),
        Code.FAILED_PRECONDITION,
        "API_KEY_EXPIRED",
    )


async def test_rolling_a_key_again_inside_its_overlap_never_extends_it(harness: Harness, org: Org) -> None:
    """A key rolled with an hour of overlap is still ACTIVE, so it may be rolled again; the second
    roll must not lengthen the old key's life (its end is min(current end, now + ttl)), whatever
    ttl it asks for, and both successors are listed: nothing live is hidden from the caller."""
    name = f"twice-{uuid.uuid4().hex[:8]}"
    key, secret = await harness.new_key(org, ["inboxes:read"], name=name)
    first = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=key.id, previous_key_ttl=duration_pb2.Duration(seconds=3600)),
        metadata=auth(org.owner_secret),
    )
    first_end = first.previous_api_key.expire_time
    second = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=key.id, previous_key_ttl=duration_pb2.Duration(seconds=7 * 86400)),
        metadata=auth(org.owner_secret),
    )
    assert second.previous_api_key.expire_time.ToDatetime() <= first_end.ToDatetime()
    assert (await get_key(harness, org, key.id)).expire_time == second.previous_api_key.expire_time
    assert await key_ids_named(harness, org, name) == {key.id, first.api_key.id, second.api_key.id}
    for live in (secret, first.secret, second.secret):
        assert (await harness.verify(live)).valid
    # The first successor never expires: a second roll of its predecessor left it alone.
    assert not (await get_key(harness, org, first.api_key.id)).HasField("expire_time")


async def test_a_key_whose_owner_left_cannot_be_rolled(harness: Harness, org: Org) -> None:
    """Rolling hands out a secret with the key's access; a key whose owner left the organization
    acts as no one, so a roll is refused (FAILED_PRECONDITION API_KEY_OWNER_REMOVED) and creates
    nothing; the old secret keeps refusing with OWNER_REMOVED."""
    leaver = await harness.new_member(org, "ADMIN")
    name = f"orphan-{uuid.uuid4().hex[:8]}"
    key, secret = await harness.new_key(org, ["inboxes:read"], owner_member_id=leaver.id, name=name)
    await harness.members.DeleteMember(
        member_pb2.DeleteMemberRequest(id=leaver.id), metadata=auth(org.owner_secret)
    )
    await fails(
        roll_call(harness, org.owner_secret, key.id),
        Code.FAILED_PRECONDITION,
        "API_KEY_OWNER_REMOVED",
    )
    assert await key_ids_named(harness, org, name) == {key.id}
    assert (await harness.verify(secret)).denial_reason == Reason.OWNER_REMOVED


async def test_a_roll_is_read_on_another_replica_from_its_revision(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """A key warm on replica B is rolled on A. Without overlap, B asked with the roll's revision
    (the VerifyApiKey field, or the header on a call) refuses the old secret as EXPIRED at once;
    with a two-second overlap, B keeps accepting it and then refuses it by its own clock, with no
    event to tell it. The new secret works on B straight away."""
    async with slow_replica(backend) as other:
        for ttl_seconds in (0, 2):
            key, secret = await harness.new_key(org, ["environments:read"])
            assert (await verify_at(other, secret)).valid
            await other.whoami(secret)
            call = harness.api_keys.RollApiKey(
                pb.RollApiKeyRequest(id=key.id, previous_key_ttl=duration_pb2.Duration(seconds=ttl_seconds)),
                metadata=auth(org.owner_secret),
            )
            rolled = await call
            revision = await revision_of(call)
            assert (await verify_at(other, rolled.secret)).valid
            end = rolled.previous_api_key.expire_time.ToDatetime(tzinfo=UTC)
            if ttl_seconds == 0:
                assert (await verify_at(other, secret, revision)).denial_reason == Reason.EXPIRED
                await fails(
                    other.environments.ListEnvironments(
                        environment_pb2.ListEnvironmentsRequest(),
                        metadata=fresh(secret, revision),
                        timeout=HANG,
                    ),
                    Code.UNAUTHENTICATED,
                    "API_KEY_EXPIRED",
                )
                continue
            answer = await verify_at(other, secret, revision)
            assert answer.valid or datetime.now(UTC) >= end, Reason.DenialReason.Name(answer.denial_reason)
            await asyncio.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds()) + 0.05)
            assert (await verify_at(other, secret)).denial_reason == Reason.EXPIRED
            await fails(other.whoami(secret), Code.UNAUTHENTICATED, "API_KEY_EXPIRED")
            assert (await verify_at(other, rolled.secret)).valid


# -- 2. UpdateApiKey ----------------------------------------------------------------------------


async def test_update_mask_tricks(harness: Harness, org: Org) -> None:
    """The mask by AIP-134: a repeated path is that field once; `*` next to another path, an
    unknown path, and a path spelt with the resource's name in front are FIELD_NOT_MUTABLE and
    change nothing; repeated scopes and environments are kept once."""
    env = await harness.new_environment(org, "Masked")
    key, _ = await harness.new_key(org, ["inboxes:read"], [env.id])
    renamed = await harness.update_key(org.owner_secret, pb.ApiKey(id=key.id, name="twice"), "name", "name")
    assert renamed.name == "twice"
    for paths in (("*", "name"), ("name", "*"), ("nmae",), ("api_key.name",), ("",), ("name.first",)):
        failure = await fails(
            harness.update_key(org.owner_secret, pb.ApiKey(id=key.id, name="nope"), *paths),
            Code.INVALID_ARGUMENT,
            "FIELD_NOT_MUTABLE",
        )
        assert "update_mask" in failure.violations, paths
    assert (await get_key(harness, org, key.id)).name == "twice"
    doubled = await harness.update_key(
        org.owner_secret,
        pb.ApiKey(
            id=key.id,
            scopes=["inboxes:write", "inboxes:read", "inboxes:write"],
            environment_ids=[env.id, env.id],
        ),
        "scopes",
        "environment_ids",
    )
    assert list(doubled.scopes) == ["inboxes:read", "inboxes:write"]
    assert list(doubled.environment_ids) == [env.id]


async def test_a_star_mask_from_a_narrower_key_cannot_widen(harness: Harness, org: Org) -> None:
    """`*` means every mutable field, unset ones included: sent with only a name and scopes by an
    environment-scoped caller, it would make the key organization-wide (ORGANIZATION_KEY_REQUIRED);
    by an organization-level caller lacking one of the key's scopes it would clear the key's
    expiry (SCOPE_ESCALATION). Either way the key is left exactly as it was."""
    env = await harness.new_environment(org, "Star")
    soon = stamp(datetime.now(UTC) + timedelta(hours=1))
    target = (
        await harness.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(
                name="target",
                scopes=["inboxes:read", "inboxes:write"],
                environment_ids=[env.id],
                expire_time=soon,
            ),
            metadata=auth(org.owner_secret),
        )
    ).api_key
    _, local = await harness.new_key(org, ["api_keys:write", "inboxes:read", "inboxes:write"], [env.id])
    await fails(
        harness.update_key(local, pb.ApiKey(id=target.id, name="wide", scopes=["inboxes:read"]), "*"),
        Code.PERMISSION_DENIED,
        "ORGANIZATION_KEY_REQUIRED",
    )
    _, wide_but_narrow = await harness.new_key(org, ["api_keys:write", "inboxes:read"])
    await fails(
        harness.update_key(
            wide_but_narrow,
            pb.ApiKey(
                id=target.id,
                name="forever",
                scopes=["inboxes:read", "inboxes:write"],
                environment_ids=[env.id],
            ),
            "*",
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_ESCALATION",
    )
    got = await get_key(harness, org, target.id)
    assert (got.name, list(got.environment_ids), got.expire_time, got.etag) == (
        "target",
        [env.id],
        soon,
        target.etag,
    )


async def test_a_key_cannot_widen_itself_nor_reach_the_key_that_made_it(harness: Harness, org: Org) -> None:
    """A member-owned key in A (its member ADMIN of A, MEMBER of B, in no C) tries to widen
    itself: adding B (its member's, but outside the key's own reach) or C is ENVIRONMENT_NOT_FOUND
    like a random id; organization-wide is ORGANIZATION_KEY_REQUIRED; a scope it lacks is
    SCOPE_ESCALATION. Once the OWNER gives it B
    as well, it cannot change itself at all (its member does not administer B), and a child it
    made in A cannot see it: NOT_FOUND API_KEY_NOT_FOUND, for Get, Update, Revoke and Roll alike.
    The key is left as it was."""
    env_a = await harness.new_environment(org, "A")
    env_b = await harness.new_environment(org, "B")
    env_c = await harness.new_environment(org, "C")
    member = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(
        org.owner_secret, env_a.id, member.id, member_pb2.EnvironmentMember.ADMIN
    )
    await harness.add_environment_member(org.owner_secret, env_b.id, member.id)
    parent_scopes = ["api_keys:read", "api_keys:write", "inboxes:read"]
    parent, secret = await harness.new_key(org, parent_scopes, [env_a.id], member.id)
    attempts = (
        (pb.ApiKey(id=parent.id, environment_ids=[env_a.id, env_b.id]), "environment_ids"),
        (pb.ApiKey(id=parent.id, environment_ids=[env_a.id, env_c.id]), "environment_ids"),
        (pb.ApiKey(id=parent.id), "environment_ids"),
        (pb.ApiKey(id=parent.id, scopes=[*parent_scopes, "inboxes:write"]), "scopes"),
    )
    expected = (
        (Code.NOT_FOUND, "ENVIRONMENT_NOT_FOUND"),
        (Code.NOT_FOUND, "ENVIRONMENT_NOT_FOUND"),
        (Code.PERMISSION_DENIED, "ORGANIZATION_KEY_REQUIRED"),
        (Code.PERMISSION_DENIED, "SCOPE_ESCALATION"),
    )
    for (change, path), (code, reason) in zip(attempts, expected, strict=True):
        await fails(harness.update_key(secret, change, path), code, reason)
    assert (await get_key(harness, org, parent.id)).etag == parent.etag
    # Given B as well (by the OWNER), it is out of its own member's hands.
    parent = await harness.update_key(
        org.owner_secret, pb.ApiKey(id=parent.id, environment_ids=[env_a.id, env_b.id]), "environment_ids"
    )
    await fails(
        harness.update_key(secret, pb.ApiKey(id=parent.id, environment_ids=[env_a.id]), "environment_ids"),
        Code.PERMISSION_DENIED,
        "ENVIRONMENT_ADMIN_REQUIRED",
    )
    child = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(name="child", scopes=parent_scopes, environment_ids=[env_a.id]),
        metadata=auth(secret),
    )
    calls = (
        harness.api_keys.GetApiKey(pb.GetApiKeyRequest(id=parent.id), metadata=auth(child.secret)),
        harness.update_key(child.secret, pb.ApiKey(id=parent.id, name="hijacked"), "name"),
        harness.api_keys.RevokeApiKey(pb.RevokeApiKeyRequest(id=parent.id), metadata=auth(child.secret)),
        harness.api_keys.RollApiKey(pb.RollApiKeyRequest(id=parent.id), metadata=auth(child.secret)),
    )
    for call in calls:
        await fails(call, Code.NOT_FOUND, "API_KEY_NOT_FOUND")
    got = await get_key(harness, org, parent.id)
    assert (got.name, got.state, got.etag) == (parent.name, pb.ApiKey.ACTIVE, parent.etag)


async def test_update_to_a_deleted_or_foreign_environment(harness: Harness, org: Org) -> None:
    """Moving a key to a deleted environment is FAILED_PRECONDITION ENVIRONMENT_DELETED; to
    another organization's environment NOT_FOUND ENVIRONMENT_NOT_FOUND, answered exactly as for a
    random id (same message but for the id). Nothing changes."""
    env = await harness.new_environment(org, "Kept")
    gone = await harness.new_environment(org, "Gone")
    await harness.delete_environment(org.owner_secret, gone.id)
    other = await harness.new_org("Other")
    theirs = await harness.new_environment(other, "Theirs")
    key, _ = await harness.new_key(org, ["inboxes:read"], [env.id])
    await fails(
        harness.update_key(
            org.owner_secret, pb.ApiKey(id=key.id, environment_ids=[gone.id]), "environment_ids"
        ),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_DELETED",
    )
    messages = []
    for env_id in (theirs.id, RANDOM_ENV_ID):
        failure = await fails(
            harness.update_key(
                org.owner_secret, pb.ApiKey(id=key.id, environment_ids=[env.id, env_id]), "environment_ids"
            ),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
        messages.append((failure.message.replace(env_id, "<id>"), failure.metadata, failure.violations))
    assert messages[0] == messages[1]
    assert (await get_key(harness, org, key.id)).etag == key.etag


async def test_a_key_narrowed_on_one_replica_is_narrowed_on_another_from_its_revision(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """A key granted on replica B (a warm, memoised answer) is narrowed on A: a scope dropped,
    then an environment dropped. B, asked with each update's revision, answers from the new key:
    SCOPE_MISSING for the dropped scope, ENVIRONMENT_NOT_ALLOWED for the dropped environment, and
    a granted answer listing only what is left."""
    env_a = await harness.new_environment(org, "Left")
    env_b = await harness.new_environment(org, "Dropped")
    key, secret = await harness.new_key(org, ["inboxes:read", "inboxes:write"], [env_a.id, env_b.id])
    async with slow_replica(backend) as other:
        for _ in range(2):  # the second answer comes from B's memo
            assert (await verify_at(other, secret, 0, env_b.id, "inboxes:write")).valid
        narrow = harness.api_keys.UpdateApiKey(
            pb.UpdateApiKeyRequest(
                api_key=pb.ApiKey(id=key.id, scopes=["inboxes:read"]), update_mask=mask("scopes")
            ),
            metadata=auth(org.owner_secret),
        )
        await narrow
        revision = await revision_of(narrow)
        answer = await verify_at(other, secret, revision, env_b.id, "inboxes:write")
        assert answer.denial_reason == Reason.SCOPE_MISSING
        shrink = harness.api_keys.UpdateApiKey(
            pb.UpdateApiKeyRequest(
                api_key=pb.ApiKey(id=key.id, environment_ids=[env_a.id]), update_mask=mask("environment_ids")
            ),
            metadata=auth(org.owner_secret),
        )
        await shrink
        revision = await revision_of(shrink)
        assert (
            await verify_at(other, secret, revision, env_b.id)
        ).denial_reason == Reason.ENVIRONMENT_NOT_ALLOWED
        left = await verify_at(other, secret, revision, env_a.id, "inboxes:read")
        assert left.valid
        assert (list(left.principal.scopes), list(left.principal.allowed_environment_ids)) == (
            ["inboxes:read"],
            [env_a.id],
        )
        await fails(
            other.resources.ListResources(
                resource_pb2.ListResourcesRequest(kind=resource_pb2.ScopedResource.INBOX),
                metadata=fresh(secret, revision, env_b.id),
                timeout=HANG,
            ),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )


# -- 3. Expiry ----------------------------------------------------------------------------------


async def test_a_far_future_expiry_round_trips(harness: Harness, org: Org) -> None:
    """An expiry at the last instant a Timestamp can hold (9999-12-31T23:59:59.999999999Z) is
    accepted by Create and Update, read back (to the microsecond), listed, verified, and survives
    a roll whose previous key then ends after its overlap. Nothing is INTERNAL."""
    last = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    created = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(name="forever-ish", scopes=["inboxes:read"], expire_time=last),
        metadata=auth(org.owner_secret),
    )
    assert created.api_key.expire_time.seconds == last.seconds
    assert created.api_key.state == pb.ApiKey.ACTIVE
    assert (await harness.verify(created.secret)).valid
    got = await get_key(harness, org, created.api_key.id)
    assert got.expire_time == created.api_key.expire_time
    rolled = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=got.id, previous_key_ttl=duration_pb2.Duration(seconds=7 * 86400)),
        metadata=auth(org.owner_secret),
    )
    assert rolled.api_key.expire_time == got.expire_time
    assert rolled.previous_api_key.expire_time.ToDatetime(tzinfo=UTC) < datetime.now(UTC) + timedelta(days=8)
    other, other_secret = await harness.new_key(org, ["inboxes:read"])
    updated = await harness.update_key(
        org.owner_secret, pb.ApiKey(id=other.id, expire_time=last), "expire_time"
    )
    assert updated.expire_time.seconds == last.seconds and updated.state == pb.ApiKey.ACTIVE
    assert (await harness.verify(other_secret)).valid
    listed = await harness.api_keys.ListApiKeys(
        pb.ListApiKeysRequest(page_size=500), metadata=auth(org.owner_secret)
    )
    assert {rolled.api_key.id, other.id} <= {key.id for key in listed.api_keys}


async def test_an_expiry_is_honoured_by_every_replica_without_an_event(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """A key that expires by its own `expire_time`, warm (verified and used) on two replicas, is
    EXPIRED on both once the time has passed: no event announces it, so each replica must compare
    with its clock on every call, VerifyApiKey and ordinary calls alike."""
    async with slow_replica(backend) as other:
        expire = datetime.now(UTC) + timedelta(seconds=2)
        created = await harness.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(name="short", scopes=["inboxes:read"], expire_time=stamp(expire)),
            metadata=auth(org.owner_secret),
        )
        for server in (harness, other):
            assert (await verify_at(server, created.secret, 0, "", "inboxes:read")).valid
            await server.whoami(created.secret)
        await asyncio.sleep(max(0.0, (expire - datetime.now(UTC)).total_seconds()) + 0.05)
        for server in (harness, other):
            answer = await verify_at(server, created.secret, 0, "", "inboxes:read")
            assert not answer.valid and answer.denial_reason == Reason.EXPIRED
            assert answer.principal == pb.Principal(organization_id=org.id, api_key_id=created.api_key.id)
            await fails(server.whoami(created.secret), Code.UNAUTHENTICATED, "API_KEY_EXPIRED")
            got = await server.api_keys.GetApiKey(
                pb.GetApiKeyRequest(id=created.api_key.id), metadata=auth(org.owner_secret)
            )
            assert got.state == pb.ApiKey.EXPIRED


# -- 4. Owners ----------------------------------------------------------------------------------


async def test_a_demoted_owner_is_honoured_on_another_replica_from_its_revision(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """An ADMIN's organization-wide key, warm on replica B, is used on B right after its member
    is demoted to MEMBER (of staging only) on A, with the demotion's revision in the header: it is
    no longer organization-level (CreateEnvironment, an organization-wide CreateApiKey:
    ORGANIZATION_KEY_REQUIRED), cannot register in prod (NOT_FOUND, as if prod did not exist) and
    VerifyApiKey says ENVIRONMENT_NOT_ALLOWED for prod; staging still works."""
    staging = await harness.new_environment(org, "Staging")
    prod = await harness.new_environment(org, "Prod")
    admin = await harness.new_member(org, "ADMIN")
    await harness.add_environment_member(org.owner_secret, staging.id, admin.id)
    _, secret = await harness.new_key(org, ALL, owner_member_id=admin.id)
    async with slow_replica(backend) as other:
        assert (await verify_at(other, secret, 0, prod.id)).valid
        await other.members.ListMembers(member_pb2.ListMembersRequest(), metadata=auth(secret))
        demote = harness.members.UpdateMember(
            member_pb2.UpdateMemberRequest(
                member=member_pb2.Member(id=admin.id, role=member_pb2.Member.MEMBER),
                update_mask=mask("role"),
            ),
            metadata=auth(org.owner_secret),
        )
        await demote
        revision = await revision_of(demote)
        await fails(
            other.environments.CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name="Sneaky"),
                metadata=fresh(secret, revision),
                timeout=HANG,
            ),
            Code.PERMISSION_DENIED,
            "ORGANIZATION_KEY_REQUIRED",
        )
        await fails(
            other.api_keys.CreateApiKey(
                pb.CreateApiKeyRequest(name="wide", scopes=["inboxes:read"]),
                metadata=fresh(secret, revision),
                timeout=HANG,
            ),
            Code.PERMISSION_DENIED,
            "ORGANIZATION_KEY_REQUIRED",
        )
        await fails(
            other.resources.RegisterResource(
                register_request("in-prod"), metadata=fresh(secret, revision, prod.id), timeout=HANG
            ),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
        assert (
            await verify_at(other, secret, revision, prod.id)
        ).denial_reason == Reason.ENVIRONMENT_NOT_ALLOWED
        await other.resources.RegisterResource(
            register_request("in-staging"), metadata=fresh(secret, revision, staging.id), timeout=HANG
        )


async def test_a_deleted_owner_disables_its_key_on_another_replica_from_its_revision(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """The key of a member deleted on A, warm on B, is refused on B with the deletion's revision:
    UNAUTHENTICATED API_KEY_OWNER_REMOVED for a call (a write included, which must not land), and
    OWNER_REMOVED from VerifyApiKey, naming only the key."""
    member = await harness.new_member(org, "ADMIN")
    key, secret = await harness.new_key(org, ALL, owner_member_id=member.id)
    async with slow_replica(backend) as other:
        await other.whoami(secret)
        assert (await verify_at(other, secret)).valid
        delete = harness.members.DeleteMember(
            member_pb2.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret)
        )
        await delete
        revision = await revision_of(delete)
        slug = f"after-{uuid.uuid4().hex[:8]}"
        await fails(
            other.environments.CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name="After", slug=slug),
                metadata=fresh(secret, revision),
                timeout=HANG,
            ),
            Code.UNAUTHENTICATED,
            "API_KEY_OWNER_REMOVED",
        )
        answer = await verify_at(other, secret, revision)
        assert answer.denial_reason == Reason.OWNER_REMOVED
        assert answer.principal == pb.Principal(organization_id=org.id, api_key_id=key.id)
        await fails(
            harness.environments.GetEnvironment(
                environment_pb2.GetEnvironmentRequest(slug=slug), metadata=auth(org.owner_secret)
            ),
            Code.NOT_FOUND,
        )


# -- 5. Revoke ----------------------------------------------------------------------------------


async def test_revoke_edges(harness: Harness, org: Org) -> None:
    """Revoking an expired key makes it REVOKED (VerifyApiKey then says REVOKED, not EXPIRED);
    revoking it again returns it unchanged (same etag, same revoke_time) with a revision; an expired or revoked key
    is listed only as the contract says (expired shown, revoked only with show_revoked)."""
    name = f"revoked-{uuid.uuid4().hex[:8]}"
    key, secret = await harness.new_key(org, ["inboxes:read"], name=name)
    rolled = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
    )
    assert rolled.previous_api_key.state == pb.ApiKey.EXPIRED
    listed = await harness.api_keys.ListApiKeys(
        pb.ListApiKeysRequest(page_size=500), metadata=auth(org.owner_secret)
    )
    assert key.id in {listed_key.id for listed_key in listed.api_keys}
    revoked = await harness.api_keys.RevokeApiKey(
        pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
    )
    assert revoked.state == pb.ApiKey.REVOKED and revoked.HasField("revoke_time")
    assert (await harness.verify(secret)).denial_reason == Reason.REVOKED
    again_call = harness.api_keys.RevokeApiKey(
        pb.RevokeApiKeyRequest(id=key.id, etag=revoked.etag), metadata=auth(org.owner_secret)
    )
    again = await again_call
    assert await revision_of(again_call) > 0  # every successful write answers its revision
    assert (again.etag, again.revoke_time, again.state) == (revoked.etag, revoked.revoke_time, revoked.state)
    listed = await harness.api_keys.ListApiKeys(
        pb.ListApiKeysRequest(page_size=500), metadata=auth(org.owner_secret)
    )
    assert key.id not in {listed_key.id for listed_key in listed.api_keys}
    assert await key_ids_named(harness, org, name) == {key.id, rolled.api_key.id}


async def test_revoking_the_calling_owner_key_itself(harness: Harness, org: Org) -> None:
    """The organization's own owner key revokes itself: the call succeeds (REVOKED, with the
    revision it committed) and the very next call with it is UNAUTHENTICATED API_KEY_REVOKED,
    while a key made before it stays usable."""
    _, spare = await harness.new_key(org, ALL)
    call = harness.api_keys.RevokeApiKey(
        pb.RevokeApiKeyRequest(id=org.owner_key_id), metadata=auth(org.owner_secret)
    )
    revoked = await call
    assert revoked.state == pb.ApiKey.REVOKED and await revision_of(call) > 0
    await fails(harness.whoami(org.owner_secret), Code.UNAUTHENTICATED, "API_KEY_REVOKED")
    got = await harness.api_keys.GetApiKey(pb.GetApiKeyRequest(id=org.owner_key_id), metadata=auth(spare))
    assert got.state == pb.ApiKey.REVOKED


async def test_list_api_keys_filter_by_a_foreign_environment_looks_random(harness: Harness, org: Org) -> None:
    """ListApiKeys filtered by another organization's environment id is answered exactly as for a
    random id (code, reason, metadata, message but for the id): no existence leak."""
    other = await harness.new_org("Other")
    theirs = await harness.new_environment(other, "Theirs")
    answers = []
    for env_id in (theirs.id, RANDOM_ENV_ID):
        failure = await fails(
            harness.api_keys.ListApiKeys(
                pb.ListApiKeysRequest(environment_id=env_id), metadata=auth(org.owner_secret)
            ),
            Code.NOT_FOUND,
        )
        answers.append((failure.reason, failure.metadata, failure.message.replace(env_id, "<id>")))
    assert answers[0] == answers[1]


# -- 6. VerifyApiKey inputs ---------------------------------------------------------------------


async def test_verify_secrets_that_look_almost_right(harness: Harness, org: Org) -> None:
    """A live secret with its mode swapped to dev (checksum recomputed, so well-formed) names no
    key: NOT_FOUND with no principal, as for any unknown secret; the same secret with white space
    around it, upper-cased, or inside a `Bearer ` prefix is MALFORMED. None is ever valid."""
    live_body = org.owner_secret[len("ap_sk_live_") : -6]
    swapped = f"ap_sk_dev_{live_body}"
    swapped += keys._checksum(swapped)  # the format's checksum, as any client can compute it
    assert keys.parse(swapped) is not None
    answer = await harness.verify(swapped, org.default_environment.id)
    assert (answer.valid, answer.denial_reason, answer.HasField("principal")) == (
        False,
        Reason.NOT_FOUND,
        False,
    )
    for bad in (
        f" {org.owner_secret}",
        f"{org.owner_secret} ",
        f"\t{org.owner_secret}",
        org.owner_secret.upper(),
        f"Bearer {org.owner_secret}",
        org.owner_secret + "\x00",
    ):
        answer = await harness.verify(bad, org.default_environment.id)
        assert (answer.valid, answer.denial_reason, answer.HasField("principal")) == (
            False,
            Reason.MALFORMED,
            False,
        )
    assert (await harness.verify(org.owner_secret, org.default_environment.id)).valid


async def test_verify_of_a_dead_foreign_key_naming_this_environment(harness: Harness, org: Org) -> None:
    """Another organization's revoked key, naming this organization's environment, is REVOKED
    (the key is judged before any environment) and its denial names only that key: nothing of this
    organization. Its live key naming this environment is ENVIRONMENT_NOT_FOUND, like a random id."""
    other = await harness.new_org("Other")
    theirs, their_secret = await harness.new_key(other, ["inboxes:read"])
    live = await harness.verify(their_secret, org.default_environment.id, "inboxes:read")
    assert live.denial_reason == Reason.ENVIRONMENT_NOT_FOUND
    assert live.principal == pb.Principal(organization_id=other.id, api_key_id=theirs.id)
    assert (await harness.verify(their_secret, RANDOM_ENV_ID)).denial_reason == Reason.ENVIRONMENT_NOT_FOUND
    await harness.api_keys.RevokeApiKey(
        pb.RevokeApiKeyRequest(id=theirs.id), metadata=auth(other.owner_secret)
    )
    dead = await harness.verify(their_secret, org.default_environment.id, "inboxes:read")
    assert dead.denial_reason == Reason.REVOKED
    assert dead.principal == pb.Principal(organization_id=other.id, api_key_id=theirs.id)


async def test_a_key_that_expires_never_gives_a_key_a_longer_life(harness: Harness, org: Org) -> None:
    """A key handed out for an hour, with `api_keys:write` and every scope, must not leave a
    lasting key behind: creating a key that never expires or expires after it, clearing or
    extending its own expiry, extending another key's past its own, or rolling a key that lives
    longer (whose successor's secret it would get) are PERMISSION_DENIED EXPIRY_ESCALATION and
    change nothing. Within its own life it may still do all of these, and roll itself."""
    now = datetime.now(UTC)
    hour = now + timedelta(hours=1)
    temporary = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(name="for an hour", scopes=ALL, expire_time=stamp(hour)),
        metadata=auth(org.owner_secret),
    )
    secret = temporary.secret

    def create(expire_time: datetime | None) -> Any:
        request = pb.CreateApiKeyRequest(name="minted", scopes=["inboxes:read"])
        if expire_time is not None:
            request.expire_time.CopyFrom(stamp(expire_time))
        return harness.api_keys.CreateApiKey(request, metadata=auth(secret))

    def extend(key_id: str, expire_time: datetime | None) -> Any:
        key = pb.ApiKey(id=key_id)
        if expire_time is not None:
            key.expire_time.CopyFrom(stamp(expire_time))
        return harness.api_keys.UpdateApiKey(
            pb.UpdateApiKeyRequest(api_key=key, update_mask=mask("expire_time")), metadata=auth(secret)
        )

    for refused in (create(None), create(hour + timedelta(seconds=1)), extend(temporary.api_key.id, None)):
        await fails(refused, Code.PERMISSION_DENIED, "EXPIRY_ESCALATION")
    await fails(
        extend(temporary.api_key.id, now + timedelta(days=1)), Code.PERMISSION_DENIED, "EXPIRY_ESCALATION"
    )
    minted = await create(now + timedelta(minutes=30))
    await fails(extend(minted.api_key.id, None), Code.PERMISSION_DENIED, "EXPIRY_ESCALATION")
    await fails(
        extend(minted.api_key.id, hour + timedelta(minutes=1)), Code.PERMISSION_DENIED, "EXPIRY_ESCALATION"
    )
    assert (await extend(minted.api_key.id, hour)).expire_time == stamp(hour)
    shorter = now + timedelta(minutes=45)
    assert (await extend(temporary.api_key.id, shorter)).expire_time == stamp(shorter)
    stored = await harness.api_keys.GetApiKey(
        pb.GetApiKeyRequest(id=temporary.api_key.id), metadata=auth(org.owner_secret)
    )
    assert stored.expire_time == stamp(shorter)
    listed = await harness.api_keys.ListApiKeys(
        pb.ListApiKeysRequest(page_size=500), metadata=auth(org.owner_secret)
    )
    assert [key.name for key in listed.api_keys].count("minted") == 1
    roll = harness.api_keys.RollApiKey(pb.RollApiKeyRequest(id=org.owner_key_id), metadata=auth(secret))
    await fails(roll, Code.PERMISSION_DENIED, "EXPIRY_ESCALATION")
    # `minted` expires at the hour, now after the caller, which shortened its own life.
    await fails(
        harness.api_keys.RollApiKey(pb.RollApiKeyRequest(id=minted.api_key.id), metadata=auth(secret)),
        Code.PERMISSION_DENIED,
        "EXPIRY_ESCALATION",
    )
    itself = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=temporary.api_key.id), metadata=auth(secret)
    )
    assert itself.api_key.expire_time == stamp(shorter)
    # The organization's owner key, which never expires, still may.
    forever = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(name="forever", scopes=["inboxes:read"]), metadata=auth(org.owner_secret)
    )
    assert not forever.api_key.HasField("expire_time")
