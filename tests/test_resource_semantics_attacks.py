"""Attacks on the resource semantics the contract takes from Google's AIPs, across every mutable
resource (Environment, Member, EnvironmentMember, ApiKey) and every RPC that changes one
(Update, Delete, Undelete, Revoke, Roll, Add, Remove), where the other tests do not go.

- Answers: the answer of each write is exactly what a following Get (by id and slug), every List
  that shows the resource and the write's own event show, etag, update_time and nanoseconds
  included, also for times sent with nanoseconds and for repeated, unordered scopes and
  environments; every change gives a new etag and moves update_time, create_time never moves;
  `changed_fields` names what differs and nothing else (AIP-154).
- Etags: one from before a delete and undelete, before a roll, before a revoke, of another
  resource (of the same or another type), and tags the service never issued (made up, very long,
  non-ASCII, with a NUL, quoted, the right one with a blank or in upper case) are ABORTED
  ETAG_MISMATCH; such a refusal changes nothing and commits no revision and no event. Two writes
  holding one etag: exactly one wins. A create retried after a change answers the current etag.
- Deleting a deleted environment and revoking a revoked key answer it unchanged, undeleting an
  active environment is ALREADY_EXISTS (AIP-164); an update to the current values keeps etag,
  update_time and event log in step, for every resource.
- Update masks (AIP-134, the README's one rule): paths naming output-only, immutable, nested,
  prefixed, camelCase, blank, NUL-holding, huge or unknown fields are FIELD_NOT_MUTABLE and
  change nothing; fields set outside the mask are ignored; no mask means the mutable fields set;
  `*` means all of them; a path twice means it once; nothing to change is NOTHING_TO_UPDATE.
- Errors (AIP-193): every refusal's details parse as one google.rpc.Status agreeing with the
  call, with exactly one ErrorInfo in the service's domain and an UPPER_SNAKE reason, and every
  INVALID_ARGUMENT names the offending field by its proto path in a BadRequest.
- Ids: an id of another type (the same ULID under another prefix, a slug for an id), with blanks
  around it or in another letter case names nothing, exactly like a random id; permission is
  decided before existence and before the etag, so a stale etag never tells a caller that
  something it may not touch exists.

Every call goes through the gRPC surface of a real server, on both databases.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import environment_pb2 as env_pb
from agentpost.environments.v1 import event_pb2
from agentpost.environments.v1 import member_pb2 as mem_pb
from google.protobuf import duration_pb2, timestamp_pb2

from tests.harness import Harness, Org, auth, stamp
from tests.resource_calls import (
    RANDOM_ENV,
    RANDOM_KEY,
    RANDOM_MEMBER,
    access_of,
    add_access,
    assert_history,
    delete_env,
    delete_member,
    events_of,
    get_env,
    get_key,
    get_member,
    leaves_no_trace,
    listed_env,
    listed_key,
    listed_member,
    new_deleted_env,
    new_env,
    race,
    refusal_of,
    refused,
    remove_access,
    revoke_key,
    roll_key,
    undelete_env,
    update_access,
    update_env,
    update_key,
    update_member,
    when,
    written,
)
from tests.writes import stored_revision

Code = grpc.StatusCode
Event = event_pb2.Event
ETAG_MISMATCH = (Code.ABORTED, "ETAG_MISMATCH")
FIELD_NOT_MUTABLE = "FIELD_NOT_MUTABLE"
# Enum numbers the protos do not define; an open proto3 enum carries them on the wire.
UNDEFINED_ROLE = cast(mem_pb.Member.Role, 99)
UNDEFINED_ENV_ROLE = cast(mem_pb.EnvironmentMember.Role, 99)
NEGATIVE_ENV_ROLE = cast(mem_pb.EnvironmentMember.Role, -1)
READ_EVERYTHING = [f"{area}:read" for area in ("environments", "members", "api_keys", "inboxes", "events")]


# -- 1. an answer is what Get, List and the write's event show; etags and times move -----------


async def test_each_environment_write_answers_what_get_list_and_its_event_show(
    harness: Harness, org: Org
) -> None:
    """Create, rename, re-describe, delete, undelete, rename again: each answer equals the
    following Get (by id and by slug), the List entry and the ListMemberEnvironments entry
    exactly (etag, update_time and its nanoseconds included) and the resource carried by the
    write's own event in the revision the write answered; every version has its own etag,
    update_time rises at each, create_time never moves."""
    created = await harness.environments.CreateEnvironment(
        env_pb.CreateEnvironmentRequest(name="History", description="first"), metadata=auth(org.owner_secret)
    )
    assert created.HasField("update_time") and created.etag
    secret = org.owner_secret
    versions = [created]
    actions: list[Any] = [Event.CREATED]
    for change, field in (
        (env_pb.Environment(id=created.id, name="Renamed"), "name"),
        (env_pb.Environment(id=created.id, description="second"), "description"),
    ):
        change.etag = versions[-1].etag
        answer, revision = await written(update_env(harness, secret, change, (field,)))
        versions.append(answer)
        actions.append(Event.UPDATED)
        await _agrees_with_get_list_and_event(harness, org, answer, revision, Event.UPDATED, [field])
    deleted, revision = await written(delete_env(harness, secret, created.id, versions[-1].etag))
    assert deleted.state == env_pb.Environment.DELETED and deleted.HasField("delete_time")
    await _agrees_with_get_list_and_event(harness, org, deleted, revision, Event.DELETED, [])
    restored, revision = await written(undelete_env(harness, secret, created.id, deleted.etag))
    assert restored.state == env_pb.Environment.ACTIVE and not restored.HasField("delete_time")
    await _agrees_with_get_list_and_event(harness, org, restored, revision, Event.UNDELETED, [])
    again, revision = await written(
        update_env(
            harness, secret, env_pb.Environment(id=created.id, name="Again", etag=restored.etag), ("name",)
        )
    )
    await _agrees_with_get_list_and_event(harness, org, again, revision, Event.UPDATED, ["name"])
    versions += [deleted, restored, again]
    actions += [Event.DELETED, Event.UNDELETED, Event.UPDATED]
    assert_history(versions)
    assert [event.action for event in reversed(await events_of(harness, org, created.id))] == actions


async def _agrees_with_get_list_and_event(
    harness: Harness, org: Org, answer: Any, revision: int, action: int, fields: list[str]
) -> None:
    """The answer of a write equals Get, the List entry and the newest event's resource."""
    if isinstance(answer, env_pb.Environment):
        assert await get_env(harness, org, answer.id) == answer
        assert await listed_env(harness, org, answer.id) == answer
        by_slug = await harness.environments.GetEnvironment(
            env_pb.GetEnvironmentRequest(slug=answer.slug), metadata=auth(org.owner_secret)
        )
        assert by_slug == answer
        if answer.state == env_pb.Environment.ACTIVE:
            page = await harness.members.ListMemberEnvironments(
                mem_pb.ListMemberEnvironmentsRequest(member_id=org.owner_member_id, page_size=500),
                metadata=auth(org.owner_secret),
            )
            assert next(env for env in page.environments if env.id == answer.id) == answer
    elif isinstance(answer, mem_pb.Member):
        assert await get_member(harness, org, answer.id) == answer
        assert await listed_member(harness, org, answer.id) == answer
    else:
        assert isinstance(answer, key_pb.ApiKey)
        assert await get_key(harness, org, answer.id) == answer
        assert await listed_key(harness, org, answer.id) == answer
    newest = (await events_of(harness, org, answer.id))[0]
    assert (newest.revision, newest.action) == (revision, action), newest
    carried = getattr(newest, newest.WhichOneof("resource") or "")
    assert carried == answer, (carried, answer)
    for field in fields:
        assert field in newest.changed_fields, newest.changed_fields


async def test_each_member_write_answers_what_get_list_and_its_event_show(harness: Harness, org: Org) -> None:
    """A member renamed, promoted, then both changed with `*`: each answer equals Get, the List
    entry and its event's member; etags all differ, update_time rises, create_time stays. After
    DeleteMember the member is MEMBER_NOT_FOUND and its last event is DELETED."""
    member = await harness.new_member(org, "MEMBER")
    secret = org.owner_secret
    versions = [member]
    for change, paths, fields in (
        (mem_pb.Member(id=member.id, display_name="Renamed"), ("display_name",), ["display_name"]),
        (mem_pb.Member(id=member.id, role=mem_pb.Member.ADMIN), ("role",), ["role"]),
        (
            mem_pb.Member(id=member.id, display_name="Both", role=mem_pb.Member.MEMBER),
            ("*",),
            ["display_name", "role"],
        ),
    ):
        change.etag = versions[-1].etag
        answer, revision = await written(update_member(harness, secret, change, paths))
        await _agrees_with_get_list_and_event(harness, org, answer, revision, Event.UPDATED, fields)
        versions.append(answer)
    assert_history(versions)
    assert versions[-1].email == member.email
    await written(delete_member(harness, secret, member.id, versions[-1].etag))
    await refused(get_member(harness, org, member.id), Code.NOT_FOUND, "MEMBER_NOT_FOUND")
    assert (await events_of(harness, org, member.id))[0].action == Event.DELETED
    # Gone for good: its last etag names nothing any more (NOT_FOUND, not ABORTED).
    async with leaves_no_trace(harness, org):
        await refused(
            delete_member(harness, secret, member.id, versions[-1].etag), Code.NOT_FOUND, "MEMBER_NOT_FOUND"
        )
        await refused(
            update_member(
                harness,
                secret,
                mem_pb.Member(id=member.id, display_name="Back", etag=versions[-1].etag),
                ("display_name",),
            ),
            Code.NOT_FOUND,
            "MEMBER_NOT_FOUND",
        )


async def test_each_api_key_write_answers_what_get_list_and_its_event_show(
    harness: Harness, org: Org
) -> None:
    """A key renamed, re-scoped, moved, given an expiry, rolled with an overlap, then both keys
    revoked: each answer (the roll's two keys included) equals Get, the List entry and its own
    event's key in the revision the write answered; every version has its own etag, update_time
    rises, create_time never moves. The successor is a new resource: its own create_time."""
    env_a = await new_env(harness, org, "A")
    env_b = await new_env(harness, org, "B")
    key, _ = await harness.new_key(org, ["inboxes:read"], [env_a.id])
    secret = org.owner_secret
    soon = stamp(datetime.now(UTC).replace(microsecond=0) + timedelta(days=3))
    versions = [key]
    for change, paths in (
        (key_pb.ApiKey(id=key.id, name="renamed"), ("name",)),
        (key_pb.ApiKey(id=key.id, scopes=["inboxes:read", "inboxes:write"]), ("scopes",)),
        (key_pb.ApiKey(id=key.id, environment_ids=[env_b.id]), ("environment_ids",)),
        (key_pb.ApiKey(id=key.id, expire_time=soon), ("expire_time",)),
    ):
        change.etag = versions[-1].etag
        answer, revision = await written(update_key(harness, secret, change, paths))
        await _agrees_with_get_list_and_event(harness, org, answer, revision, Event.UPDATED, list(paths))
        versions.append(answer)
    call = roll_key(harness, secret, key.id, 3600)
    rolled, revision = await written(call)
    await _agrees_with_get_list_and_event(harness, org, rolled.previous_api_key, revision, Event.ROLLED, [])
    await _agrees_with_get_list_and_event(harness, org, rolled.api_key, revision, Event.CREATED, [])
    versions.append(rolled.previous_api_key)
    successor = rolled.api_key
    assert successor.id != key.id and successor.etag not in {version.etag for version in versions}
    assert when(successor.create_time) >= when(versions[-2].update_time)
    revoked_successor, revision = await written(revoke_key(harness, secret, successor.id, successor.etag))
    await _agrees_with_get_list_and_event(harness, org, revoked_successor, revision, Event.REVOKED, [])
    assert_history([successor, revoked_successor])
    revoked, revision = await written(revoke_key(harness, secret, key.id, versions[-1].etag))
    await _agrees_with_get_list_and_event(harness, org, revoked, revision, Event.REVOKED, [])
    versions.append(revoked)
    assert_history(versions)
    assert revoked.state == key_pb.ApiKey.REVOKED and revoked.HasField("revoke_time")


async def test_each_environment_member_write_answers_what_list_and_its_event_show(
    harness: Harness, org: Org
) -> None:
    """Add, promote, demote, remove: each answer equals the ListEnvironmentMembers entry and the
    environment member carried by its event (resource id `env/mem`); create_time stays, update_time
    rises at each change; after the removal the pair is gone and its last event is REMOVED."""
    env = await new_env(harness, org)
    member = await harness.new_member(org, "MEMBER")
    secret = org.owner_secret
    pair = f"{env.id}/{member.id}"
    added, revision = await written(add_access(harness, secret, env.id, member.id))
    assert await access_of(harness, org, env.id, member.id) == added
    first = (await events_of(harness, org, pair))[0]
    assert (first.revision, first.action, first.environment_member) == (revision, Event.ADDED, added)
    versions = [added]
    actions = [Event.ADDED]
    for role in (mem_pb.EnvironmentMember.ADMIN, mem_pb.EnvironmentMember.MEMBER):
        answer, revision = await written(update_access(harness, secret, env.id, member.id, role, ("role",)))
        assert await access_of(harness, org, env.id, member.id) == answer
        newest = (await events_of(harness, org, pair))[0]
        assert (newest.revision, newest.action, newest.environment_member) == (
            revision,
            Event.UPDATED,
            answer,
        )
        assert "role" in newest.changed_fields
        versions.append(answer)
        actions.append(Event.UPDATED)
    for before, after in itertools.pairwise(versions):
        assert when(after.update_time) > when(before.update_time)
        assert after.create_time == added.create_time
    assert all(version.etag for version in versions)
    assert len({version.etag for version in versions}) == len(versions)
    await written(remove_access(harness, secret, env.id, member.id, versions[-1].etag))
    assert await access_of(harness, org, env.id, member.id) is None
    assert [event.action for event in reversed(await events_of(harness, org, pair))] == [
        *actions,
        Event.REMOVED,
    ]


# -- 2. etags ------------------------------------------------------------------------------------


async def test_an_etag_from_before_a_delete_and_undelete_is_stale(harness: Harness, org: Org) -> None:
    """An environment read, deleted, undeleted: it is not the version that was read (ABA). The
    first etag is ABORTED on Update, Delete and Undelete; so is the deleted version's etag once the
    environment is back, and the first deletion's etag after a second deletion. Each refusal
    changes nothing; the current etag works."""
    env = await new_env(harness, org)
    secret = org.owner_secret
    deleted = await delete_env(harness, secret, env.id, env.etag)
    async with leaves_no_trace(harness, org):
        await refused(undelete_env(harness, secret, env.id, env.etag), *ETAG_MISMATCH)
    restored = await undelete_env(harness, secret, env.id, deleted.etag)
    assert restored.etag not in {env.etag, deleted.etag}
    async with leaves_no_trace(harness, org):
        for stale in (env.etag, deleted.etag):
            await refused(
                update_env(
                    harness, secret, env_pb.Environment(id=env.id, name="Stale", etag=stale), ("name",)
                ),
                *ETAG_MISMATCH,
            )
            await refused(delete_env(harness, secret, env.id, stale), *ETAG_MISMATCH)
    assert await get_env(harness, org, env.id) == restored
    deleted_again = await delete_env(harness, secret, env.id, restored.etag)
    assert deleted_again.etag not in {env.etag, deleted.etag, restored.etag}
    async with leaves_no_trace(harness, org):
        await refused(undelete_env(harness, secret, env.id, deleted.etag), *ETAG_MISMATCH)
    assert await get_env(harness, org, env.id) == deleted_again
    back = await undelete_env(harness, secret, env.id, deleted_again.etag)
    assert back.state == env_pb.Environment.ACTIVE


async def test_deleting_a_deleted_environment_and_undeleting_an_active_one(
    harness: Harness, org: Org
) -> None:
    """Deleting a deleted environment answers it unchanged (README), with no etag or with its
    current etag, and records no second DELETED event; with the etag from before the deletion it
    is ABORTED. Undeleting an active environment is ALREADY_EXISTS ENVIRONMENT_NOT_DELETED
    (AIP-164), with or without its etag, and changes nothing."""
    env = await new_env(harness, org)
    secret = org.owner_secret
    deleted = await delete_env(harness, secret, env.id, env.etag)
    for etag in ("", deleted.etag):
        again, revision = await written(delete_env(harness, secret, env.id, etag))
        assert again == deleted
        assert revision == await stored_revision(harness, org.id)
    assert [event.action for event in await events_of(harness, org, env.id)] == [Event.DELETED, Event.CREATED]
    async with leaves_no_trace(harness, org):
        await refused(delete_env(harness, secret, env.id, env.etag), *ETAG_MISMATCH)
    assert await get_env(harness, org, env.id) == deleted
    active = await new_env(harness, org, "Active")
    async with leaves_no_trace(harness, org):
        for etag in ("", active.etag):
            await refused(
                undelete_env(harness, secret, active.id, etag), Code.ALREADY_EXISTS, "ENVIRONMENT_NOT_DELETED"
            )
    assert await get_env(harness, org, active.id) == active


async def test_a_revoked_key_refuses_its_pre_revoke_etag_and_answers_its_own(
    harness: Harness, org: Org
) -> None:
    """Revoking a revoked key answers it unchanged (same etag and revoke_time) with no etag or with
    its current one, and records no second REVOKED event; with the etag read before the revoke it
    is ABORTED, and nothing changes."""
    key, _ = await harness.new_key(org, ["inboxes:read"])
    secret = org.owner_secret
    revoked = await revoke_key(harness, secret, key.id, key.etag)
    async with leaves_no_trace(harness, org):
        await refused(revoke_key(harness, secret, key.id, key.etag), *ETAG_MISMATCH)
    for etag in ("", revoked.etag):
        again = await revoke_key(harness, secret, key.id, etag)
        assert again == revoked
    assert [event.action for event in await events_of(harness, org, key.id)] == [Event.REVOKED, Event.CREATED]
    assert await get_key(harness, org, key.id) == revoked


async def test_a_roll_makes_the_previous_keys_etag_stale_and_etags_do_not_cross(
    harness: Harness, org: Org
) -> None:
    """A roll changes the previous key (its expiry), so the etag read before it is ABORTED on
    Update and Revoke of that key; the predecessor's etags, old or new, are ABORTED on the
    successor and the successor's on the predecessor. Nothing changes; the current etags work."""
    key, _ = await harness.new_key(org, ["inboxes:read"])
    secret = org.owner_secret
    rolled = await roll_key(harness, secret, key.id, 3600)
    previous, successor = rolled.previous_api_key, rolled.api_key
    assert previous.etag != key.etag and when(previous.update_time) > when(key.update_time)
    assert successor.etag not in {key.etag, previous.etag}
    async with leaves_no_trace(harness, org):
        await refused(
            update_key(harness, secret, key_pb.ApiKey(id=key.id, name="x", etag=key.etag), ("name",)),
            *ETAG_MISMATCH,
        )
        await refused(revoke_key(harness, secret, key.id, key.etag), *ETAG_MISMATCH)
        for etag in (key.etag, previous.etag):
            await refused(revoke_key(harness, secret, successor.id, etag), *ETAG_MISMATCH)
            await refused(
                update_key(harness, secret, key_pb.ApiKey(id=successor.id, name="x", etag=etag), ("name",)),
                *ETAG_MISMATCH,
            )
        await refused(revoke_key(harness, secret, key.id, successor.etag), *ETAG_MISMATCH)
    assert await get_key(harness, org, key.id) == previous
    assert await get_key(harness, org, successor.id) == successor
    renamed = await update_key(
        harness, secret, key_pb.ApiKey(id=successor.id, name="next", etag=successor.etag), ("name",)
    )
    assert renamed.name == "next"
    assert (await revoke_key(harness, secret, key.id, previous.etag)).state == key_pb.ApiKey.REVOKED


async def test_access_removed_and_granted_again_refuses_the_etag_read_before(
    harness: Harness, org: Org
) -> None:
    """A member's access read, removed and granted again with the same role is not the grant that
    was read (ABA): its etag is new, and the etag read before is ABORTED on Update and Remove of
    the new grant, which nothing changes. An update to the same role keeps the etag; the current
    etag works on both RPCs."""
    env = await new_env(harness, org)
    member = await harness.new_member(org, "MEMBER")
    secret = org.owner_secret
    first = await add_access(harness, secret, env.id, member.id)
    await remove_access(harness, secret, env.id, member.id, first.etag)
    again = await add_access(harness, secret, env.id, member.id)
    assert again.role == first.role and again.etag != first.etag
    async with leaves_no_trace(harness, org):
        await refused(
            update_access(
                harness, secret, env.id, member.id, mem_pb.EnvironmentMember.ADMIN, ("role",), first.etag
            ),
            *ETAG_MISMATCH,
        )
        await refused(remove_access(harness, secret, env.id, member.id, first.etag), *ETAG_MISMATCH)
    assert await access_of(harness, org, env.id, member.id) == again
    same, revision = await written(
        update_access(harness, secret, env.id, member.id, again.role, ("role",), again.etag)
    )
    assert same == again and revision == await stored_revision(harness, org.id)
    promoted = await update_access(
        harness, secret, env.id, member.id, mem_pb.EnvironmentMember.ADMIN, ("role",), again.etag
    )
    assert promoted.etag not in {first.etag, again.etag}
    async with leaves_no_trace(harness, org):
        await refused(remove_access(harness, secret, env.id, member.id, again.etag), *ETAG_MISMATCH)
    await remove_access(harness, secret, env.id, member.id, promoted.etag)
    assert await access_of(harness, org, env.id, member.id) is None


async def test_a_roll_holding_a_stale_etag_rolls_nothing(harness: Harness, org: Org) -> None:
    """RollApiKey with the etag read before the key was renamed is ABORTED ETAG_MISMATCH: no new
    key, no secret, no revision and no event; with the current etag it rolls, and the etag of the
    key before that roll is then stale for a second roll."""
    key, _ = await harness.new_key(org, ["inboxes:read"])
    secret = org.owner_secret
    renamed = await update_key(
        harness, secret, key_pb.ApiKey(id=key.id, name="renamed", etag=key.etag), ("name",)
    )
    before = await harness.api_keys.ListApiKeys(
        key_pb.ListApiKeysRequest(page_size=500), metadata=auth(secret)
    )
    async with leaves_no_trace(harness, org):
        await refused(roll_key(harness, secret, key.id, 3600, key.etag), *ETAG_MISMATCH)
    after = await harness.api_keys.ListApiKeys(
        key_pb.ListApiKeysRequest(page_size=500), metadata=auth(secret)
    )
    assert [item.id for item in after.api_keys] == [item.id for item in before.api_keys]
    rolled = await roll_key(harness, secret, key.id, 3600, renamed.etag)
    assert rolled.previous_api_key.id == key.id and rolled.api_key.name == "renamed"
    async with leaves_no_trace(harness, org):
        await refused(roll_key(harness, secret, key.id, 3600, renamed.etag), *ETAG_MISMATCH)


async def _as_before(
    harness: Harness,
    org: Org,
    env: env_pb.Environment,
    member: mem_pb.Member,
    key: key_pb.ApiKey,
    access: mem_pb.EnvironmentMember | None,
    gone: env_pb.Environment | None = None,
) -> None:
    """Each resource (and the member's access to `env`) reads back exactly as it was read before."""
    assert await get_env(harness, org, env.id) == env
    if gone is not None:
        assert await get_env(harness, org, gone.id) == gone
    assert await get_member(harness, org, member.id) == member
    assert await get_key(harness, org, key.id) == key
    assert await access_of(harness, org, env.id, member.id) == access


async def test_an_etag_of_another_resource_is_stale_everywhere(harness: Harness, org: Org) -> None:
    """An etag belongs to one resource: another environment's, a member's, a member's access or a
    key's current etag sent to any Update, Delete, Undelete, Remove, Revoke or Roll of another
    resource is ABORTED ETAG_MISMATCH, and nothing changes anywhere."""
    env = await new_env(harness, org, "Target")
    other_env = await new_env(harness, org, "Other")
    gone = await new_deleted_env(harness, org)
    member = await harness.new_member(org, "MEMBER")
    other_member = await harness.new_member(org, "MEMBER")
    key, _ = await harness.new_key(org, ["inboxes:read"])
    other_key, _ = await harness.new_key(org, ["inboxes:read"])
    secret = org.owner_secret
    access = await add_access(harness, secret, env.id, member.id)
    # The same member in another environment, another member in the same one.
    other_access = await add_access(harness, secret, other_env.id, member.id)
    neighbour = await add_access(harness, secret, env.id, other_member.id)
    foreign = (other_env.etag, gone.etag, member.etag, key.etag)
    async with leaves_no_trace(harness, org):
        for etag in foreign:
            await refused(
                update_env(
                    harness, secret, env_pb.Environment(id=env.id, name="Hijacked", etag=etag), ("name",)
                ),
                *ETAG_MISMATCH,
            )
            await refused(delete_env(harness, secret, env.id, etag), *ETAG_MISMATCH)
        for etag in (env.etag, other_env.etag, member.etag):
            await refused(undelete_env(harness, secret, gone.id, etag), *ETAG_MISMATCH)
        for etag in (other_member.etag, env.etag, key.etag):
            await refused(
                update_member(
                    harness,
                    secret,
                    mem_pb.Member(id=member.id, display_name="x", etag=etag),
                    ("display_name",),
                ),
                *ETAG_MISMATCH,
            )
            await refused(delete_member(harness, secret, member.id, etag), *ETAG_MISMATCH)
        for etag in (other_key.etag, env.etag, member.etag):
            await refused(
                update_key(harness, secret, key_pb.ApiKey(id=key.id, name="x", etag=etag), ("name",)),
                *ETAG_MISMATCH,
            )
            await refused(revoke_key(harness, secret, key.id, etag), *ETAG_MISMATCH)
            await refused(roll_key(harness, secret, key.id, 60, etag), *ETAG_MISMATCH)
        for etag in (other_access.etag, neighbour.etag, member.etag, env.etag, key.etag):
            await refused(
                update_access(
                    harness, secret, env.id, member.id, mem_pb.EnvironmentMember.ADMIN, ("role",), etag
                ),
                *ETAG_MISMATCH,
            )
            await refused(remove_access(harness, secret, env.id, member.id, etag), *ETAG_MISMATCH)
        await refused(roll_key(harness, secret, key.id, 60, access.etag), *ETAG_MISMATCH)
    await _as_before(harness, org, env, member, key, access, gone)


# Tags the service never issued, some built from the right one. The README calls etags opaque:
# compared as they are, so none of these is the current etag, and each is simply stale.
MALFORMED_ETAGS: dict[str, Callable[[str], str]] = {
    "garbage": lambda current: "garbage",
    "sixteen zeros": lambda current: "0" * 16,
    "upper case": lambda current: current.upper() if current.upper() != current else current + "A",
    "trailing space": lambda current: current + " ",
    "leading space": lambda current: " " + current,
    "one digit short": lambda current: current[:-1],
    "quoted": lambda current: f'"{current}"',
    "weak": lambda current: f'W/"{current}"',
    "with a NUL": lambda current: current + "\x00",
    "non-ASCII": lambda current: "é" * 16,
    "very long": lambda current: current * 4096,
}


@pytest.mark.parametrize("variant", list(MALFORMED_ETAGS))
async def test_malformed_etags_are_stale_and_change_nothing(harness: Harness, org: Org, variant: str) -> None:
    """Each of the ten RPCs that take an etag (UpdateEnvironment, DeleteEnvironment,
    UndeleteEnvironment, UpdateMember, DeleteMember, UpdateEnvironmentMember,
    RemoveEnvironmentMember, UpdateApiKey, RevokeApiKey, RollApiKey), sent a tag the
    service never issued: ABORTED ETAG_MISMATCH (a stale tag, as the proto comments say;
    never INVALID_ARGUMENT, INTERNAL or success), no revision, no event, nothing changed."""
    tag = MALFORMED_ETAGS[variant]
    env = await new_env(harness, org)
    gone = await new_deleted_env(harness, org)
    member = await harness.new_member(org, "MEMBER")
    key, _ = await harness.new_key(org, ["inboxes:read"])
    secret = org.owner_secret
    access = await add_access(harness, secret, env.id, member.id)
    async with leaves_no_trace(harness, org):
        await refused(
            update_env(
                harness, secret, env_pb.Environment(id=env.id, name="Changed", etag=tag(env.etag)), ("name",)
            ),
            *ETAG_MISMATCH,
        )
        await refused(delete_env(harness, secret, env.id, tag(env.etag)), *ETAG_MISMATCH)
        await refused(undelete_env(harness, secret, gone.id, tag(gone.etag)), *ETAG_MISMATCH)
        await refused(
            update_member(
                harness,
                secret,
                mem_pb.Member(id=member.id, display_name="x", etag=tag(member.etag)),
                ("display_name",),
            ),
            *ETAG_MISMATCH,
        )
        await refused(delete_member(harness, secret, member.id, tag(member.etag)), *ETAG_MISMATCH)
        await refused(
            update_key(harness, secret, key_pb.ApiKey(id=key.id, name="x", etag=tag(key.etag)), ("name",)),
            *ETAG_MISMATCH,
        )
        await refused(revoke_key(harness, secret, key.id, tag(key.etag)), *ETAG_MISMATCH)
        await refused(roll_key(harness, secret, key.id, 60, tag(key.etag)), *ETAG_MISMATCH)
        await refused(
            update_access(
                harness,
                secret,
                env.id,
                member.id,
                mem_pb.EnvironmentMember.ADMIN,
                ("role",),
                tag(access.etag),
            ),
            *ETAG_MISMATCH,
        )
        await refused(remove_access(harness, secret, env.id, member.id, tag(access.etag)), *ETAG_MISMATCH)
    await _as_before(harness, org, env, member, key, access, gone)


async def test_an_environment_update_to_its_current_values_changes_nothing(
    harness: Harness, org: Org
) -> None:
    """An environment update whose values equal the current ones is answered as it was: same etag
    and update_time (README, proto comment), no event, an empty revision answered (README: "as an
    update that changes nothing does"), and the etag read before still works afterwards."""
    secret = org.owner_secret
    env = await new_env(harness, org, "Same", "as before")
    for change, paths in (
        (env_pb.Environment(id=env.id, name=env.name, etag=env.etag), ("name",)),
        (env_pb.Environment(id=env.id, name=env.name, description=env.description), ("name", "description")),
        (env_pb.Environment(id=env.id, name=env.name, description=env.description), None),
    ):
        same, revision = await written(update_env(harness, secret, change, paths))
        assert same == env == await get_env(harness, org, env.id)
        assert revision == await stored_revision(harness, org.id)
    assert [event.action for event in await events_of(harness, org, env.id)] == [Event.CREATED]
    renamed = await update_env(
        harness, secret, env_pb.Environment(id=env.id, name="Different", etag=env.etag), ("name",)
    )
    assert renamed.etag != env.etag


@pytest.mark.parametrize("resource", ["member", "api key", "environment member"])
async def test_an_update_to_the_current_values_keeps_etag_update_time_and_log_in_step(
    harness: Harness, org: Org, resource: str
) -> None:
    """An update of a member, a key or an environment member whose values equal the current ones.
    The README decides this only for environments (answered as it was); whichever way the
    service goes here, it must go whole: etag, update_time and event log either all stay or all
    move, and an UPDATED event must name what differs (SPEC section 6 records an event per changed
    resource, and the README's UPDATED row says `changed_fields` names what differs: an UPDATED
    event naming nothing tells every consumer that something changed when nothing did). The
    answer equals what Get or List shows."""
    secret = org.owner_secret
    if resource == "member":
        member = await harness.new_member(org, "MEMBER")
        answer = await update_member(
            harness, secret, mem_pb.Member(id=member.id, display_name=member.display_name), ("display_name",)
        )
        assert answer == await get_member(harness, org, member.id)
        await _in_step(harness, org, member.id, member, answer)
    elif resource == "api key":
        key, _ = await harness.new_key(org, ["inboxes:read"])
        answer = await update_key(harness, secret, key_pb.ApiKey(id=key.id, name=key.name), ("name",))
        assert answer == await get_key(harness, org, key.id)
        await _in_step(harness, org, key.id, key, answer)
    else:
        env = await new_env(harness, org)
        member = await harness.new_member(org, "MEMBER")
        added = await add_access(harness, secret, env.id, member.id)
        answer = await update_access(harness, secret, env.id, member.id, added.role, ("role",))
        assert answer == await access_of(harness, org, env.id, member.id)
        await _in_step(harness, org, f"{env.id}/{member.id}", added, answer)


async def _in_step(harness: Harness, org: Org, resource_id: str, before: Any, after: Any) -> None:
    """Etag, update_time and the resource's newest event tell one story about an update."""
    events = await events_of(harness, org, resource_id)
    unchanged_etag = getattr(before, "etag", "") == getattr(after, "etag", "")
    unchanged_time = before.update_time == after.update_time
    no_event = events[0].action != Event.UPDATED
    assert unchanged_time == no_event, (before, after, events[0])
    if hasattr(before, "etag"):
        assert unchanged_etag == unchanged_time, (before, after)
    if not no_event:
        assert list(events[0].changed_fields), events[0]


async def test_changed_fields_name_only_what_differs(harness: Harness, org: Org) -> None:
    """An update whose mask names two fields of which only one gets a new value records an UPDATED
    event whose `changed_fields` names that one among the mutable fields, not the one left as
    it was (README: `changed_fields` names what differs), for environments, members and keys."""
    secret = org.owner_secret
    env = await new_env(harness, org, "Fields", "kept")
    await update_env(
        harness,
        secret,
        env_pb.Environment(id=env.id, name="Fields renamed", description="kept"),
        ("name", "description"),
    )
    member = await harness.new_member(org, "MEMBER")
    await update_member(
        harness,
        secret,
        mem_pb.Member(id=member.id, display_name="Renamed", role=mem_pb.Member.MEMBER),
        ("display_name", "role"),
    )
    key, _ = await harness.new_key(org, ["inboxes:read"])
    await update_key(
        harness, secret, key_pb.ApiKey(id=key.id, name="renamed", scopes=["inboxes:read"]), ("name", "scopes")
    )
    for resource_id, mutable, expected in (
        (env.id, {"name", "description"}, {"name"}),
        (member.id, {"display_name", "role"}, {"display_name"}),
        (key.id, {"name", "scopes", "environment_ids", "expire_time"}, {"name"}),
    ):
        newest = (await events_of(harness, org, resource_id))[0]
        assert newest.action == Event.UPDATED
        assert set(newest.changed_fields) & mutable == expected, list(newest.changed_fields)


def _one_winner(outcomes: list[tuple[str, Any]], *losers: str) -> tuple[int, Any]:
    """Exactly one call succeeded and every other lost in one of the `losers` ways."""
    winners = [index for index, (status, _) in enumerate(outcomes) if status == "OK"]
    assert len(winners) == 1, outcomes
    for index, (status, _) in enumerate(outcomes):
        if index != winners[0]:
            assert status in losers, outcomes
    return winners[0], outcomes[winners[0]][1]


async def test_two_writes_holding_one_etag_exactly_one_wins(harness: Harness, org: Org) -> None:
    """Two writes sent at once with the same etag, for members and keys (environments are raced in
    test_environment_resource_attacks): exactly one commits; the other is ABORTED ETAG_MISMATCH,
    or, when the winner removed or revoked the resource, the answer for that; what is stored is
    the winner's answer. An update racing a roll (which takes no etag) either came first and was
    handed on to both keys, or is ABORTED."""
    secret = org.owner_secret
    stale = "ABORTED ETAG_MISMATCH"
    for _ in range(3):
        member = await harness.new_member(org, "MEMBER")
        outcomes = await race(
            *(
                update_member(
                    harness,
                    secret,
                    mem_pb.Member(id=member.id, display_name=name, etag=member.etag),
                    ("display_name",),
                )
                for name in ("Left", "Right")
            )
        )
        _, winner = _one_winner(outcomes, stale)
        assert await get_member(harness, org, member.id) == winner
        outcomes = await race(
            update_member(
                harness,
                secret,
                mem_pb.Member(id=member.id, display_name="Late", etag=winner.etag),
                ("display_name",),
            ),
            delete_member(harness, secret, member.id, winner.etag),
        )
        index, answer = _one_winner(outcomes, stale, "NOT_FOUND MEMBER_NOT_FOUND")
        if index == 0:
            assert await get_member(harness, org, member.id) == answer
        else:
            await refused(get_member(harness, org, member.id), Code.NOT_FOUND, "MEMBER_NOT_FOUND")

        key, _ = await harness.new_key(org, ["inboxes:read"])
        outcomes = await race(
            *(
                update_key(harness, secret, key_pb.ApiKey(id=key.id, name=name, etag=key.etag), ("name",))
                for name in ("left", "right")
            )
        )
        _, winner = _one_winner(outcomes, stale)
        assert await get_key(harness, org, key.id) == winner
        outcomes = await race(
            update_key(harness, secret, key_pb.ApiKey(id=key.id, name="late", etag=winner.etag), ("name",)),
            revoke_key(harness, secret, key.id, winner.etag),
        )
        _, answer = _one_winner(outcomes, stale, "FAILED_PRECONDITION API_KEY_REVOKED")
        assert await get_key(harness, org, key.id) == answer

        # A roll takes no etag but changes the key: an update holding the etag read before it
        # commits only if it came first, and then the roll handed on the updated key.
        key, _ = await harness.new_key(org, ["inboxes:read"])
        renaming = update_key(
            harness, secret, key_pb.ApiKey(id=key.id, name="renamed", etag=key.etag), ("name",)
        )
        rolling = roll_key(harness, secret, key.id, 3600)
        (renamed, _), (rolled_status, rolled) = await race(renaming, rolling)
        assert rolled_status == "OK" and renamed in ("OK", stale), (renamed, rolled_status)
        expected_name = "renamed" if renamed == "OK" else key.name
        assert (rolled.previous_api_key.name, rolled.api_key.name) == (expected_name, expected_name)
        assert await get_key(harness, org, key.id) == rolled.previous_api_key

        # A roll holding the same etag as an update: exactly one of them commits.
        key, _ = await harness.new_key(org, ["inboxes:read"])
        outcomes = await race(
            update_key(harness, secret, key_pb.ApiKey(id=key.id, name="renamed", etag=key.etag), ("name",)),
            roll_key(harness, secret, key.id, 3600, key.etag),
        )
        index, answer = _one_winner(outcomes, stale)
        stored = await get_key(harness, org, key.id)
        assert stored == (answer if index == 0 else answer.previous_api_key)

        # An update and a removal of a member's access holding one etag: exactly one commits.
        env = await new_env(harness, org)
        access = await add_access(harness, secret, env.id, member.id)
        outcomes = await race(
            update_access(
                harness, secret, env.id, member.id, mem_pb.EnvironmentMember.ADMIN, ("role",), access.etag
            ),
            remove_access(harness, secret, env.id, member.id, access.etag),
        )
        index, answer = _one_winner(outcomes, stale, "NOT_FOUND ENVIRONMENT_MEMBER_NOT_FOUND")
        assert await access_of(harness, org, env.id, member.id) == (answer if index == 0 else None)


async def test_a_create_retry_answers_the_resource_as_it_now_stands(harness: Harness, org: Org) -> None:
    """A create retried with its request id after the resource changed answers it as Get shows it
    now (AIP-155 with AIP-154): its current etag, which a following update may use; never the
    first answer's stale etag passed off as current."""
    secret = org.owner_secret
    request_id = str(uuid.uuid4())
    name = f"Retried {uuid.uuid4().hex[:6]}"
    create = env_pb.CreateEnvironmentRequest(name=name, request_id=request_id)
    first = await harness.environments.CreateEnvironment(create, metadata=auth(secret))
    renamed = await update_env(
        harness, secret, env_pb.Environment(id=first.id, description="since"), ("description",)
    )
    retried = await harness.environments.CreateEnvironment(create, metadata=auth(secret))
    assert retried == renamed == await get_env(harness, org, first.id)
    again = await update_env(
        harness,
        secret,
        env_pb.Environment(id=first.id, description="after", etag=retried.etag),
        ("description",),
    )
    assert again.description == "after"

    member_request = mem_pb.CreateMemberRequest(
        email=f"retried-{uuid.uuid4().hex[:8]}@example.com",
        display_name="First",
        role=mem_pb.Member.MEMBER,
        request_id=str(uuid.uuid4()),
    )
    member = await harness.members.CreateMember(member_request, metadata=auth(secret))
    promoted = await update_member(
        harness, secret, mem_pb.Member(id=member.id, role=mem_pb.Member.ADMIN), ("role",)
    )
    retried_member = await harness.members.CreateMember(member_request, metadata=auth(secret))
    assert retried_member == promoted == await get_member(harness, org, member.id)


# -- 3. update masks ----------------------------------------------------------------------------


ENV_PATHS_REFUSED = (
    ("id",),
    ("organization_id",),
    ("is_default",),
    ("state",),
    ("create_time",),
    ("update_time",),
    ("delete_time",),
    ("etag",),
    ("environment.name",),
    ("name.first",),
    ("Name",),
    ("name ",),
    ("name,description",),
    ("",),
    ("name", "state"),
    ("*", "name"),
    ("**",),
    ("no_such_field",),
    ("name\x00",),
    ("n" * 10_000,),
)
MEMBER_PATHS_REFUSED = (
    ("displayName",),
    ("display_name.text",),
    ("role", "organization_id"),
    ("update_time",),
)
KEY_PATHS_REFUSED = (
    ("id",),
    ("organization_id",),
    ("owner_member_id",),
    ("mode",),
    ("prefix",),
    ("state",),
    ("create_time",),
    ("update_time",),
    ("last_used_time",),
    ("revoke_time",),
    ("etag",),
    ("expireTime",),
    ("environmentIds",),
    ("expire_time.seconds",),
    ("scopes.0",),
    ("api_key.name",),
    ("secret",),
    ("name", "mode"),
    ("*", "scopes"),
)
ACCESS_PATHS_REFUSED = (
    ("environment_id",),
    ("member_id",),
    ("create_time",),
    ("update_time",),
    ("Role",),
    ("role", "member_id"),
)


async def test_mask_paths_naming_no_mutable_field_are_refused_and_change_nothing(
    harness: Harness, org: Org
) -> None:
    """Every Update, sent a mask path that is output-only, immutable, nested, prefixed with the
    message's name, camelCase (the JSON spelling, not the proto path), blank, comma-joined or
    unknown, alone or beside a good path: INVALID_ARGUMENT FIELD_NOT_MUTABLE naming `update_mask`
    (the README's one rule), nothing changed, nothing committed. `slug` beside `name` is
    SLUG_IMMUTABLE and the name stays."""
    secret = org.owner_secret
    env = await new_env(harness, org)
    member = await harness.new_member(org, "MEMBER")
    key, _ = await harness.new_key(org, ["inboxes:read"], [env.id])
    await add_access(harness, secret, env.id, member.id)
    access = await access_of(harness, org, env.id, member.id)
    everything_env = env_pb.Environment(
        id=env.id,
        name="Changed",
        description="changed",
        organization_id="org_x",
        state=env_pb.Environment.DELETED,
    )
    everything_key = key_pb.ApiKey(
        id=key.id,
        name="changed",
        scopes=["inboxes:write"],
        mode=key_pb.ApiKey.DEV,
        owner_member_id=member.id,
        prefix="ap_sk_dev_xx",
        state=key_pb.ApiKey.REVOKED,
    )
    not_mutable = (Code.INVALID_ARGUMENT, FIELD_NOT_MUTABLE, "update_mask")
    async with leaves_no_trace(harness, org):
        for paths in ENV_PATHS_REFUSED:
            await refused(update_env(harness, secret, everything_env, paths), *not_mutable)
        await refused(
            update_env(
                harness,
                secret,
                env_pb.Environment(id=env.id, name="Changed", slug="changed"),
                ("name", "slug"),
            ),
            Code.INVALID_ARGUMENT,
            "SLUG_IMMUTABLE",
            "update_mask",
        )
        for paths in MEMBER_PATHS_REFUSED:
            await refused(
                update_member(
                    harness,
                    secret,
                    mem_pb.Member(id=member.id, display_name="Changed", role=mem_pb.Member.ADMIN),
                    paths,
                ),
                *not_mutable,
            )
        for paths in KEY_PATHS_REFUSED:
            await refused(update_key(harness, secret, everything_key, paths), *not_mutable)
        for paths in ACCESS_PATHS_REFUSED:
            await refused(
                update_access(harness, secret, env.id, member.id, mem_pb.EnvironmentMember.ADMIN, paths),
                *not_mutable,
            )
    await _as_before(harness, org, env, member, key, access)


async def _expiring_key(
    harness: Harness, secret: str, name: str, env_id: str
) -> tuple[key_pb.CreateApiKeyResponse, timestamp_pb2.Timestamp]:
    """A new key reading inboxes in one environment, expiring in two days: the answer, the expiry."""
    expiry = stamp(datetime.now(UTC).replace(microsecond=0) + timedelta(days=2))
    created = await harness.api_keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(
            name=name, scopes=["inboxes:read"], environment_ids=[env_id], expire_time=expiry
        ),
        metadata=auth(secret),
    )
    return created, expiry


async def test_fields_set_outside_the_mask_are_ignored(harness: Harness, org: Org) -> None:
    """A resource sent with every field set, output-only and immutable ones included, and a mask
    naming one field: only that field changes (AIP-134). The key stays ACTIVE, LIVE, in its
    environment, with its owner, prefix, scopes and expiry; the environment keeps its slug, state
    and name; the member keeps its email and role."""
    secret = org.owner_secret
    env = await new_env(harness, org, "Kept", "old")
    other = await new_env(harness, org, "Elsewhere")
    member = await harness.new_member(org, "MEMBER")
    created, _ = await _expiring_key(harness, secret, "kept", env.id)
    key = created.api_key
    past = stamp(datetime(2001, 1, 1, tzinfo=UTC))

    changed_env = await update_env(
        harness,
        secret,
        env_pb.Environment(
            id=env.id,
            name="Not this",
            slug="not-this",
            description="new",
            organization_id="org_01J0000000000000000000000A",
            is_default=True,
            state=env_pb.Environment.DELETED,
            create_time=past,
            update_time=past,
            delete_time=past,
        ),
        ("description",),
    )
    expected_env = env_pb.Environment()
    expected_env.CopyFrom(env)
    expected_env.description = "new"
    for volatile in ("update_time", "etag"):
        expected_env.ClearField(volatile)
    for volatile in ("update_time", "etag"):
        changed_env.ClearField(volatile)
    assert changed_env == expected_env

    changed_member = await update_member(
        harness,
        secret,
        mem_pb.Member(
            id=member.id,
            email="other@example.com",
            display_name="New name",
            role=mem_pb.Member.OWNER,
            organization_id="org_01J0000000000000000000000A",
            create_time=past,
        ),
        ("display_name",),
    )
    assert (
        changed_member.email,
        changed_member.role,
        changed_member.create_time,
        changed_member.organization_id,
    ) == (
        member.email,
        member.role,
        member.create_time,
        org.id,
    )
    assert changed_member.display_name == "New name"

    changed_key = await update_key(
        harness,
        secret,
        key_pb.ApiKey(
            id=key.id,
            name="renamed",
            scopes=["inboxes:read", "inboxes:write"],
            environment_ids=[other.id],
            owner_member_id=member.id,
            mode=key_pb.ApiKey.DEV,
            prefix="ap_sk_dev_xx",
            state=key_pb.ApiKey.REVOKED,
            organization_id="org_01J0000000000000000000000A",
            create_time=past,
            revoke_time=past,
            last_used_time=past,
        ),
        ("name",),
    )
    assert changed_key.name == "renamed"
    kept = ("scopes", "environment_ids", "owner_member_id", "mode", "prefix", "state", "organization_id")
    for field in (*kept, "create_time", "expire_time"):
        assert getattr(changed_key, field) == getattr(key, field), field
    assert not changed_key.HasField("revoke_time") and not changed_key.HasField("last_used_time")
    assert (await harness.verify(created.secret, env.id, "inboxes:read")).valid


async def test_without_a_mask_only_the_mutable_fields_set_change(harness: Harness, org: Org) -> None:
    """No mask means every mutable field the request sets (README, proto comments): a key sent
    with only a name keeps its scopes, environments and expiry (an empty `environment_ids` never
    makes it organization-wide, an unset expiry never clears it), and output-only fields set
    beside it (state REVOKED, mode DEV) are ignored; an environment sent with only a description
    keeps its name, and a slug set beside it is ignored, not applied."""
    secret = org.owner_secret
    env = await new_env(harness, org, "Scoped", "old")
    created, expiry = await _expiring_key(harness, secret, "scoped", env.id)
    key = created.api_key
    renamed = await update_key(
        harness,
        secret,
        key_pb.ApiKey(id=key.id, name="renamed", state=key_pb.ApiKey.REVOKED, mode=key_pb.ApiKey.DEV),
    )
    assert (renamed.name, list(renamed.scopes), list(renamed.environment_ids), renamed.expire_time) == (
        "renamed",
        ["inboxes:read"],
        [env.id],
        expiry,
    )
    assert (renamed.state, renamed.mode) == (key_pb.ApiKey.ACTIVE, key_pb.ApiKey.LIVE)
    assert (await harness.verify(created.secret, org.default_environment.id)).denial_reason == (
        key_pb.VerifyApiKeyResponse.ENVIRONMENT_NOT_ALLOWED
    )
    described = await update_env(
        harness, secret, env_pb.Environment(id=env.id, description="new", slug="sneaky")
    )
    assert (described.name, described.description, described.slug) == (env.name, "new", env.slug)
    assert described == await get_env(harness, org, env.id)


async def test_a_request_that_sets_nothing_mutable_is_nothing_to_update(harness: Harness, org: Org) -> None:
    """An Update with no mask whose resource sets no mutable field (only its id and etag, or only
    output-only fields) is INVALID_ARGUMENT NOTHING_TO_UPDATE naming `update_mask`, on every
    Update RPC, and commits nothing; so is an empty mask object."""
    secret = org.owner_secret
    env = await new_env(harness, org)
    member = await harness.new_member(org, "MEMBER")
    key, _ = await harness.new_key(org, ["inboxes:read"])
    await add_access(harness, secret, env.id, member.id)
    nothing = (Code.INVALID_ARGUMENT, "NOTHING_TO_UPDATE", "update_mask")
    async with leaves_no_trace(harness, org):
        for paths in (None, ()):
            await refused(
                update_env(harness, secret, env_pb.Environment(id=env.id, etag=env.etag), paths), *nothing
            )
            await refused(
                update_env(
                    harness,
                    secret,
                    env_pb.Environment(id=env.id, is_default=True, state=env_pb.Environment.DELETED),
                    paths,
                ),
                *nothing,
            )
            await refused(
                update_member(harness, secret, mem_pb.Member(id=member.id, etag=member.etag), paths), *nothing
            )
            await refused(
                update_member(harness, secret, mem_pb.Member(id=member.id, email="x@example.com"), paths),
                *nothing,
            )
            await refused(
                update_key(harness, secret, key_pb.ApiKey(id=key.id, etag=key.etag), paths), *nothing
            )
            await refused(
                update_key(
                    harness,
                    secret,
                    key_pb.ApiKey(id=key.id, state=key_pb.ApiKey.REVOKED, prefix="x", mode=key_pb.ApiKey.DEV),
                    paths,
                ),
                *nothing,
            )
            await refused(
                update_access(
                    harness, secret, env.id, member.id, mem_pb.EnvironmentMember.ROLE_UNSPECIFIED, paths
                ),
                *nothing,
            )
    assert (await get_key(harness, org, key.id)).state == key_pb.ApiKey.ACTIVE


async def test_star_means_every_mutable_field_and_repeated_paths_mean_one(harness: Harness, org: Org) -> None:
    """`*` alone means every mutable field, unset ones included (README): an environment's unset
    description is cleared and its unset name refused naming `environment.name`; a key's unset
    environments make it organization-wide and its unset expiry is cleared; its unset scopes are
    refused naming `api_key.scopes`; an environment member's unset role is refused naming
    `environment_member.role`. A path named twice means the field once, on every Update."""
    secret = org.owner_secret
    env = await new_env(harness, org, "Star", "to be cleared")
    async with leaves_no_trace(harness, org):
        await refused(
            update_env(harness, secret, env_pb.Environment(id=env.id, description="x"), ("*",)),
            Code.INVALID_ARGUMENT,
            None,
            "environment.name",
        )
    cleared = await update_env(harness, secret, env_pb.Environment(id=env.id, name="Starred"), ("*",))
    assert (cleared.name, cleared.description) == ("Starred", "")

    created, _ = await _expiring_key(harness, secret, "star", env.id)
    key = created.api_key
    async with leaves_no_trace(harness, org):
        await refused(
            update_key(harness, secret, key_pb.ApiKey(id=key.id, name="no scopes"), ("*",)),
            Code.INVALID_ARGUMENT,
            None,
            "api_key.scopes",
        )
    wide = await update_key(
        harness, secret, key_pb.ApiKey(id=key.id, name="wide", scopes=["inboxes:read"]), ("*",)
    )
    assert (list(wide.environment_ids), wide.HasField("expire_time")) == ([], False)
    assert (await harness.verify(created.secret, org.default_environment.id, "inboxes:read")).valid

    member = await harness.new_member(org, "MEMBER")
    await add_access(harness, secret, env.id, member.id)
    async with leaves_no_trace(harness, org):
        await refused(
            update_access(
                harness, secret, env.id, member.id, mem_pb.EnvironmentMember.ROLE_UNSPECIFIED, ("*",)
            ),
            Code.INVALID_ARGUMENT,
            None,
            "environment_member.role",
        )
    promoted = await update_access(harness, secret, env.id, member.id, mem_pb.EnvironmentMember.ADMIN, ("*",))
    assert promoted.role == mem_pb.EnvironmentMember.ADMIN

    twice_env = await update_env(
        harness, secret, env_pb.Environment(id=env.id, name="Twice"), ("name", "name")
    )
    assert (twice_env.name, twice_env.description) == ("Twice", "")
    twice_key = await update_key(
        harness,
        secret,
        key_pb.ApiKey(id=key.id, scopes=["inboxes:write"], name="ignored"),
        ("scopes", "scopes"),
    )
    assert (list(twice_key.scopes), twice_key.name) == (["inboxes:write"], "wide")
    twice_access = await update_access(
        harness, secret, env.id, member.id, mem_pb.EnvironmentMember.MEMBER, ("role", "role")
    )
    assert twice_access.role == mem_pb.EnvironmentMember.MEMBER


async def test_times_with_nanoseconds_answer_what_get_and_the_event_show(harness: Harness, org: Org) -> None:
    """Timestamps and durations carrying nanoseconds (an expiry set at 999,999,999 ns on create,
    one nanosecond on update, an overlap of 3600 s and 1,500 ns on roll): the write's answer equals
    Get, the List entry and its event exactly, so a client comparing what it was told with what
    it reads back sees no drift below a microsecond, on either database."""
    secret = org.owner_secret
    base = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    expiry = stamp(base)
    expiry.nanos = 999_999_999
    created = await harness.api_keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(name="nanos", scopes=["inboxes:read"], expire_time=expiry),
        metadata=auth(secret),
    )
    assert await get_key(harness, org, created.api_key.id) == created.api_key
    assert await listed_key(harness, org, created.api_key.id) == created.api_key
    assert (await events_of(harness, org, created.api_key.id))[0].api_key == created.api_key
    one_nanosecond = stamp(base + timedelta(days=1))
    one_nanosecond.nanos = 1
    answer, revision = await written(
        update_key(
            harness,
            secret,
            key_pb.ApiKey(id=created.api_key.id, expire_time=one_nanosecond),
            ("expire_time",),
        )
    )
    await _agrees_with_get_list_and_event(harness, org, answer, revision, Event.UPDATED, ["expire_time"])
    key, _ = await harness.new_key(org, ["inboxes:read"])
    call = harness.api_keys.RollApiKey(
        key_pb.RollApiKeyRequest(id=key.id, previous_key_ttl=duration_pb2.Duration(seconds=3600, nanos=1500)),
        metadata=auth(secret),
    )
    rolled, revision = await written(call)
    await _agrees_with_get_list_and_event(harness, org, rolled.previous_api_key, revision, Event.ROLLED, [])
    await _agrees_with_get_list_and_event(harness, org, rolled.api_key, revision, Event.CREATED, [])


async def test_repeated_fields_answer_as_get_stores_them(harness: Harness, org: Org) -> None:
    """Scopes and environment ids sent unordered and repeated, on create and on update: whatever
    order and deduplication the service applies, the write's answer shows exactly what Get, List
    and the event show, so an answer never disagrees with the stored key; an update naming the
    key's own sets in another order changes nothing."""
    secret = org.owner_secret
    env_a = await new_env(harness, org, "A")
    env_b = await new_env(harness, org, "B")
    created = await harness.api_keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(
            name="unordered",
            scopes=["inboxes:write", "inboxes:read", "inboxes:write"],
            environment_ids=[*sorted([env_a.id, env_b.id], reverse=True), env_a.id],
        ),
        metadata=auth(secret),
    )
    key = created.api_key
    assert sorted(set(key.scopes)) == ["inboxes:read", "inboxes:write"]
    assert sorted(set(key.environment_ids)) == sorted([env_a.id, env_b.id])
    assert await get_key(harness, org, key.id) == key == await listed_key(harness, org, key.id)
    assert (await events_of(harness, org, key.id))[0].api_key == key
    answer, revision = await written(
        update_key(
            harness,
            secret,
            key_pb.ApiKey(
                id=key.id,
                scopes=["inboxes:write", "inboxes:write", "inboxes:read"],
                environment_ids=[env_b.id, env_b.id, env_a.id],
            ),
            ("scopes", "environment_ids"),
        )
    )
    # The same sets in another order and with repeats change nothing: the answer is the key as
    # it was (etag and update_time too), and the update records no event.
    assert revision > 0
    assert answer == key == await get_key(harness, org, key.id)
    assert [event.action for event in await events_of(harness, org, key.id)] == [Event.CREATED]


# -- 4. errors name their fields ------------------------------------------------------------------


async def test_invalid_values_and_missing_ids_name_their_proto_path(harness: Harness, org: Org) -> None:
    """Every INVALID_ARGUMENT of a changing RPC names the offending field by its path in the
    request: `environment.name`, `member.display_name`, `api_key.scopes`, `environment.id`,
    `id`, `environment_member.member_id`, ... (as the existing `api_key.expire_time` and
    `member.role` do), and commits nothing. Enum numbers the proto does not define (an open enum
    carries them on the wire) are refused the same way, never INTERNAL."""
    secret = org.owner_secret
    env = await new_env(harness, org)
    member = await harness.new_member(org, "MEMBER")
    key, _ = await harness.new_key(org, ["inboxes:read"])
    await add_access(harness, secret, env.id, member.id)
    cases: list[tuple[Any, str]] = [
        (update_env(harness, secret, env_pb.Environment(id=env.id, name=""), ("name",)), "environment.name"),
        (
            update_env(harness, secret, env_pb.Environment(id=env.id, name="x" * 101), ("name",)),
            "environment.name",
        ),
        (
            update_env(harness, secret, env_pb.Environment(id=env.id, name=" padded"), ("name",)),
            "environment.name",
        ),
        (
            update_env(
                harness, secret, env_pb.Environment(id=env.id, description="x" * 1001), ("description",)
            ),
            "environment.description",
        ),
        (update_env(harness, secret, env_pb.Environment(name="x"), ("name",)), "environment.id"),
        (delete_env(harness, secret, ""), "id"),
        (undelete_env(harness, secret, ""), "id"),
        (
            update_member(
                harness, secret, mem_pb.Member(id=member.id, display_name="x" * 101), ("display_name",)
            ),
            "member.display_name",
        ),
        (update_member(harness, secret, mem_pb.Member(display_name="x"), ("display_name",)), "member.id"),
        (delete_member(harness, secret, ""), "id"),
        (update_key(harness, secret, key_pb.ApiKey(id=key.id, name="x" * 101), ("name",)), "api_key.name"),
        (update_key(harness, secret, key_pb.ApiKey(id=key.id, name="\u202egnp"), ("name",)), "api_key.name"),
        (update_key(harness, secret, key_pb.ApiKey(id=key.id, scopes=[]), ("scopes",)), "api_key.scopes"),
        (update_key(harness, secret, key_pb.ApiKey(name="x"), ("name",)), "api_key.id"),
        (revoke_key(harness, secret, ""), "id"),
        (roll_key(harness, secret, ""), "id"),
        (
            update_access(harness, secret, env.id, "", mem_pb.EnvironmentMember.ADMIN, ("role",)),
            "environment_member.member_id",
        ),
        (
            update_access(harness, secret, "", member.id, mem_pb.EnvironmentMember.ADMIN, ("role",)),
            "environment_member.environment_id",
        ),
        (
            update_access(
                harness, secret, env.id, member.id, mem_pb.EnvironmentMember.ROLE_UNSPECIFIED, ("role",)
            ),
            "environment_member.role",
        ),
        (
            update_member(harness, secret, mem_pb.Member(id=member.id, role=UNDEFINED_ROLE), ("role",)),
            "member.role",
        ),
        (
            update_access(harness, secret, env.id, member.id, UNDEFINED_ENV_ROLE, ("role",)),
            "environment_member.role",
        ),
        (add_access(harness, secret, env.id, member.id, NEGATIVE_ENV_ROLE), "role"),
        (remove_access(harness, secret, env.id, ""), "member_id"),
        (remove_access(harness, secret, "", member.id), "environment_id"),
        (add_access(harness, secret, env.id, ""), "member_id"),
    ]
    async with leaves_no_trace(harness, org):
        for call, field in cases:
            await refused(call, Code.INVALID_ARGUMENT, None, field)
        await refused(
            update_key(
                harness, secret, key_pb.ApiKey(id=key.id, scopes=["inboxes:read", "bogus:read"]), ("scopes",)
            ),
            Code.INVALID_ARGUMENT,
            "UNKNOWN_SCOPE",
            "api_key.scopes",
        )


# -- 5. ids and the order of checks ---------------------------------------------------------------


def _swap(identifier: str, prefix: str) -> str:
    """The same ULID under another type's prefix."""
    return prefix + identifier.split("_", 1)[1]


def _altered(identifier: str, other_types: list[str], prefixes: list[str]) -> list[str]:
    """Ids that resemble `identifier` but are not it: other resources' ids, its ULID under other
    prefixes, surrounding blanks, its letters in another case."""
    head, ulid = identifier.split("_", 1)
    return [
        *other_types,
        *(_swap(identifier, prefix) for prefix in prefixes),
        identifier + " ",
        " " + identifier,
        identifier + "\u00a0",
        identifier.lower(),
        head.upper() + "_" + ulid,
        ulid,
        identifier + identifier,
    ]


async def test_ids_of_another_type_or_altered_name_nothing(harness: Harness, org: Org) -> None:
    """Each changing RPC, sent an id of another type (an environment's id as a member's, the same
    ULID under another prefix, an environment's slug where its id is asked for), the right id
    with a blank around it, lower-cased, with its prefix upper-cased or dropped, or doubled:
    exactly the refusal a random well-formed id of the right
    type gets (NOT_FOUND with the same reason), never the resource, never another resource; and
    nothing changes."""
    secret = org.owner_secret
    env = await new_env(harness, org)
    gone = await new_deleted_env(harness, org)
    member = await harness.new_member(org, "MEMBER")
    key, _ = await harness.new_key(org, ["inboxes:read"])
    await add_access(harness, secret, env.id, member.id)
    access = await access_of(harness, org, env.id, member.id)

    calls: list[tuple[str, str, list[str], Callable[[str], Any]]] = [
        (
            RANDOM_ENV,
            env.id,
            [member.id, key.id, env.slug],
            lambda i: update_env(harness, secret, env_pb.Environment(id=i, name="Hit"), ("name",)),
        ),
        (RANDOM_ENV, env.id, [member.id, key.id, env.slug], lambda i: delete_env(harness, secret, i)),
        (RANDOM_ENV, gone.id, [member.id, key.id, gone.slug], lambda i: undelete_env(harness, secret, i)),
        (
            RANDOM_MEMBER,
            member.id,
            [env.id, key.id],
            lambda i: update_member(
                harness, secret, mem_pb.Member(id=i, display_name="Hit"), ("display_name",)
            ),
        ),
        (RANDOM_MEMBER, member.id, [env.id, key.id], lambda i: delete_member(harness, secret, i)),
        (
            RANDOM_KEY,
            key.id,
            [env.id, member.id],
            lambda i: update_key(harness, secret, key_pb.ApiKey(id=i, name="hit"), ("name",)),
        ),
        (RANDOM_KEY, key.id, [env.id, member.id], lambda i: revoke_key(harness, secret, i)),
        (RANDOM_KEY, key.id, [env.id, member.id], lambda i: roll_key(harness, secret, i)),
        (
            RANDOM_ENV,
            env.id,
            [member.id, key.id, env.slug],
            lambda i: update_access(harness, secret, i, member.id, mem_pb.EnvironmentMember.ADMIN, ("role",)),
        ),
        (
            RANDOM_ENV,
            env.id,
            [member.id, key.id, env.slug],
            lambda i: remove_access(harness, secret, i, member.id),
        ),
        (
            RANDOM_MEMBER,
            member.id,
            [env.id, key.id],
            lambda i: update_access(harness, secret, env.id, i, mem_pb.EnvironmentMember.ADMIN, ("role",)),
        ),
        (RANDOM_MEMBER, member.id, [env.id, key.id], lambda i: remove_access(harness, secret, env.id, i)),
    ]
    prefixes = ["env_", "mem_", "key_", "org_", "evt_"]
    async with leaves_no_trace(harness, org):
        for random_id, real_id, other_types, make in calls:
            first = await refusal_of(make(random_id))
            baseline = (first.code, first.reason)
            assert first.code == Code.NOT_FOUND, first
            own = real_id.split("_", 1)[0] + "_"
            for candidate in _altered(real_id, other_types, [p for p in prefixes if p != own]):
                refusal = await refusal_of(make(candidate))
                got = (refusal.code, refusal.reason)
                assert got == baseline, (candidate, got, baseline)
    await _as_before(harness, org, env, member, key, access, gone)


async def test_permission_is_decided_before_existence_and_before_the_etag(harness: Harness, org: Org) -> None:
    """A stale etag must not tell a caller that a resource it may not touch exists. A key that
    reads everything but writes nothing is PERMISSION_DENIED SCOPE_MISSING on every changing RPC,
    for a real id with a stale etag exactly as for a random id. A key of environment A with every
    write scope, naming environment B (outside its reach) or an organization-wide key with a stale
    etag, gets exactly what it gets for a random id (NOT_FOUND, never ABORTED); its
    organization-level calls are refused for lack of level whatever the id and etag."""
    secret = org.owner_secret
    env_a = await new_env(harness, org, "A")
    env_b = await new_env(harness, org, "B")
    gone = await new_deleted_env(harness, org)
    member = await harness.new_member(org, "MEMBER")
    await add_access(harness, secret, env_b.id, member.id)
    wide_key, _ = await harness.new_key(org, ["inboxes:read"])
    _, reader = await harness.new_key(org, READ_EVERYTHING)
    all_writes = [
        f"{area}:{access}"
        for area in ("environments", "members", "api_keys", "inboxes")
        for access in ("read", "write")
    ]
    _, local = await harness.new_key(org, all_writes, [env_a.id])
    stale = "0" * 16

    def every_call(caller: str, env_id: str, deleted_id: str, member_id: str, key_id: str) -> list[Any]:
        return [
            update_env(harness, caller, env_pb.Environment(id=env_id, name="x", etag=stale), ("name",)),
            delete_env(harness, caller, env_id, stale),
            undelete_env(harness, caller, deleted_id, stale),
            update_member(
                harness, caller, mem_pb.Member(id=member_id, display_name="x", etag=stale), ("display_name",)
            ),
            delete_member(harness, caller, member_id, stale),
            update_key(harness, caller, key_pb.ApiKey(id=key_id, name="x", etag=stale), ("name",)),
            revoke_key(harness, caller, key_id, stale),
            roll_key(harness, caller, key_id),
            update_access(harness, caller, env_id, member_id, mem_pb.EnvironmentMember.ADMIN, ("role",)),
            remove_access(harness, caller, env_id, member_id),
            add_access(harness, caller, env_id, member_id),
        ]

    async with leaves_no_trace(harness, org):
        for call in every_call(reader, env_b.id, gone.id, member.id, wide_key.id):
            await refused(call, Code.PERMISSION_DENIED, "SCOPE_MISSING")
        for call in every_call(reader, RANDOM_ENV, RANDOM_ENV, RANDOM_MEMBER, RANDOM_KEY):
            await refused(call, Code.PERMISSION_DENIED, "SCOPE_MISSING")
        real = [
            ((r := await refusal_of(call)).code, r.reason)
            for call in every_call(local, env_b.id, gone.id, member.id, wide_key.id)
        ]
        random = [
            ((r := await refusal_of(call)).code, r.reason)
            for call in every_call(local, RANDOM_ENV, RANDOM_ENV, RANDOM_MEMBER, RANDOM_KEY)
        ]
    assert real == random
    assert all(code in (Code.NOT_FOUND, Code.PERMISSION_DENIED) for code, _ in real), real
    assert real[0] == (Code.NOT_FOUND, "ENVIRONMENT_NOT_FOUND")
    assert real[5] == real[6] == (Code.NOT_FOUND, "API_KEY_NOT_FOUND")
    assert real[1] == real[2] == real[3] == real[4] == (Code.PERMISSION_DENIED, "ORGANIZATION_KEY_REQUIRED")
    assert await get_env(harness, org, env_b.id) == env_b
    assert await get_key(harness, org, wide_key.id) == wide_key
