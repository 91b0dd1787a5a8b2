"""Attacks on the event log's read side (ListEvents, WatchEvents), through the real gRPC surface:
revision edges and type lists a watch may name, resuming from a heartbeat past hidden revisions,
other organizations' revisions and ids, reach and scope that change under a stream watched on
another replica, both sides of a reassignment (names and slugs too), secrets and their digests in
any event, the filters' and page tokens' edges, and hundreds of streams dropped at once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import (
    environment_pb2,
    event_pb2,
    event_pb2_grpc,
    member_pb2,
    organization_pb2,
    resource_pb2,
)
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Failure, Harness, Org, auth, every_event, fails, stamp
from tests.servers import Backend, start_server
from tests.watching import Watcher
from tests.writes import REVISION

Event = event_pb2.Event
INBOX, LABEL = resource_pb2.ScopedResource.INBOX, resource_pb2.ScopedResource.LABEL
HEARTBEAT_SECONDS = 0.3
# A well-formed id that names nothing.
RANDOM_ENV = "env_01J00000000000000000000000"
RANDOM_KEY = "key_01J00000000000000000000000"
WATCH_METHOD = "WatchEvents"


@pytest.fixture(scope="module")
async def replica(backend: Backend) -> AsyncIterator[Harness]:
    """Replica B: a second server on the session server's database, with fast heartbeats."""
    app, channel = await start_server(backend, watch_heartbeat_seconds=HEARTBEAT_SECONDS)
    try:
        yield Harness(app, channel, backend.name)
    finally:
        await channel.close()
        await app.stop(grace=0)


def events_stub(harness: Harness) -> event_pb2_grpc.EventServiceStub:
    return event_pb2_grpc.EventServiceStub(harness.channel)


async def listed(harness: Harness, secret: str, **filters: object) -> list[Event]:
    """Every event the key may list with `filters`, newest first."""
    return await every_event(events_stub(harness), auth(secret), filters=filters)


async def committed(call: Any) -> int:
    """Awaits a write; the revision it answered."""
    await call
    return int(dict(await call.trailing_metadata() or ())[REVISION])


async def register(
    harness: Harness, secret: str, env_id: str, resource_id: str, kind: int = INBOX, display_name: str = ""
) -> int:
    """Registers a resource in `env_id`; the revision it committed."""
    return await committed(
        harness.resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(
                kind=cast(Any, kind), resource_id=resource_id, display_name=display_name
            ),
            metadata=auth(secret, env_id),
        )
    )


async def first_message(harness: Harness, secret: str, **fields: Any) -> Any:
    """The first message of a watch (its error, if it fails first)."""
    async for message in events_stub(harness).WatchEvents(
        event_pb2.WatchEventsRequest(**fields), metadata=auth(secret)
    ):
        return message
    return None


async def backlog(harness: Harness, secret: str, after_revision: int) -> list[Event]:
    """The events a watch from `after_revision` replays before it goes live."""
    watcher = Watcher(harness.channel, secret, after_revision=after_revision)
    try:
        await watcher.live()
        live_at = next(index for index, message in enumerate(watcher.messages) if not message.events)
        return [event for message in watcher.messages[:live_at] for event in message.events]
    finally:
        await watcher.close()


def summary(events: list[Event]) -> list[tuple[str, str, str]]:
    return [
        (Event.Action.Name(e.action), Event.ResourceType.Name(e.resource_type), e.resource_id) for e in events
    ]


def registered(events: list[Event]) -> list[str]:
    return [e.scoped_resource.resource_id for e in events if e.action == Event.REGISTERED]


def same_but_for(first: Failure, second: Failure, first_id: str, second_id: str) -> None:
    """Two refusals that differ at most in the id each names."""
    assert (first.code, first.reason, first.domain) == (second.code, second.reason, second.domain)
    assert first.message.replace(first_id, "ID") == second.message.replace(second_id, "ID")
    assert {k: v.replace(first_id, "ID") for k, v in first.metadata.items()} == {
        k: v.replace(second_id, "ID") for k, v in second.metadata.items()
    }
    assert first.violations.keys() == second.violations.keys()


# 1. after_revision and resource_types edges


async def test_watch_revision_edges_and_type_lists(harness: Harness, org: Org) -> None:
    """A watch from exactly the current revision replays nothing and goes live there; from the one
    before, exactly that revision; duplicated types deliver each event once; another organization's
    (higher) revision, int64 extremes, and an unspecified or unknown type anywhere in the list are
    INVALID_ARGUMENT naming the field."""
    env = await harness.new_environment(org, "Edges")
    current = await register(harness, org.owner_secret, env.id, "edge-1")
    assert current == 3

    watcher = Watcher(harness.channel, org.owner_secret, after_revision=current)
    try:
        assert await watcher.live() == current
        assert watcher.events == []
    finally:
        await watcher.close()
    assert summary(await backlog(harness, org.owner_secret, current - 1)) == [
        ("REGISTERED", "SCOPED_RESOURCE", "INBOX:edge-1")
    ]
    doubled = Watcher(
        harness.channel,
        org.owner_secret,
        after_revision=1,
        resource_types=[Event.SCOPED_RESOURCE, Event.ENVIRONMENT, Event.SCOPED_RESOURCE, Event.ENVIRONMENT],
    )
    try:
        assert await doubled.live() == current
        assert summary(doubled.events) == [
            ("CREATED", "ENVIRONMENT", env.id),
            ("REGISTERED", "SCOPED_RESOURCE", "INBOX:edge-1"),
        ]
    finally:
        await doubled.close()

    other = await harness.new_org()
    for index in range(4):
        other_revision = await register(
            harness, other.owner_secret, other.default_environment.id, f"theirs-{index}"
        )
    assert other_revision > current
    failure = await fails(
        first_message(harness, org.owner_secret, after_revision=other_revision),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REVISION",
    )
    assert "after_revision" in failure.violations
    for extreme in (2**63 - 1, -(2**63)):
        await fails(
            first_message(harness, org.owner_secret, after_revision=extreme),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REVISION",
        )
    for bad in (0, 7, -1, 2**31 - 1):
        failure = await fails(
            first_message(harness, org.owner_secret, resource_types=[Event.ENVIRONMENT, bad]),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "resource_types[1]" in failure.violations, (bad, failure.violations)


# 2. resuming from a heartbeat, across replicas


async def test_resuming_from_a_heartbeat_past_hidden_revisions_loses_and_repeats_nothing(
    harness: Harness, replica: Harness, org: Org
) -> None:
    """A scoped key watching on replica B while A commits revisions it may not see: heartbeats
    move past them, and watching again from a heartbeat's revision delivers exactly the visible
    events committed after it, none before it again."""
    seen = await harness.new_environment(org, "Seen")
    unseen = await harness.new_environment(org, "Unseen")
    _, secret = await harness.new_key(org, ["events:read", "inboxes:read"], [seen.id])
    watcher = Watcher(replica.channel, secret)
    try:
        await watcher.live()
        await register(harness, org.owner_secret, seen.id, "seen-1")
        for index in range(3):
            hidden = await register(harness, org.owner_secret, unseen.id, f"hidden-{index}")
        await watcher.reached(hidden)
        beat = next(message for message in watcher.messages if message.revision >= hidden)
        assert not beat.events and beat.revision == hidden
        assert registered(watcher.events) == ["seen-1"]
        resume_from = watcher.revision
    finally:
        await watcher.close()
    await register(harness, org.owner_secret, unseen.id, "hidden-late")
    last = await register(harness, org.owner_secret, seen.id, "seen-2")
    resumed = Watcher(replica.channel, secret, after_revision=resume_from)
    try:
        await resumed.reached(last)
        assert registered(resumed.events) == ["seen-2"]
        assert all(e.environment_id == seen.id for e in resumed.events)
    finally:
        await resumed.close()


# 3. other organizations


async def test_another_organizations_writes_never_reach_a_watch_nor_its_revisions(
    harness: Harness, replica: Harness
) -> None:
    """While another organization writes far past this one's revision, a watch on replica B sees
    none of its events, and no message (heartbeats included) carries a revision beyond this
    organization's own."""
    mine = await harness.new_org()
    theirs = await harness.new_org()
    watcher = Watcher(replica.channel, mine.owner_secret)
    try:
        await watcher.live()
        for index in range(6):
            their_last = await register(
                harness, theirs.owner_secret, theirs.default_environment.id, f"noise-{index}"
            )
        mine_last = await register(harness, mine.owner_secret, mine.default_environment.id, "mine-1")
        assert their_last > mine_last
        await watcher.reached(mine_last)
        count = len(watcher.messages)
        await watcher.until(lambda: len(watcher.messages) >= count + 2)  # two heartbeats more
        assert all(e.organization_id == mine.id for e in watcher.events)
        assert registered(watcher.events) == ["mine-1"]
        assert max(message.revision for message in watcher.messages) == mine_last
    finally:
        await watcher.close()


async def test_another_organizations_ids_in_filters_reveal_nothing(harness: Harness, org: Org) -> None:
    """ListEvents filters naming another organization's environment (live or deleted), key or
    resource answer exactly as for ids that name nothing: the same refusal for an environment, an
    empty log for a key or resource."""
    other = await harness.new_org()
    theirs = await harness.new_environment(other, "Theirs")
    gone = await harness.new_environment(other, "Gone")
    await harness.delete_environment(other.owner_secret, gone.id)
    their_key, _ = await harness.new_key(other, ["inboxes:read"], [theirs.id])
    await register(harness, other.owner_secret, theirs.id, "theirs-1")
    stub = events_stub(harness)

    async def refused(env_id: str) -> Failure:
        return await fails(
            stub.ListEvents(
                event_pb2.ListEventsRequest(environment_id=env_id), metadata=auth(org.owner_secret)
            ),
            grpc.StatusCode.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )

    random_failure = await refused(RANDOM_ENV)
    for env_id in (theirs.id, gone.id, other.default_environment.id):
        same_but_for(await refused(env_id), random_failure, env_id, RANDOM_ENV)

    owner = org.owner_secret
    for actor in (their_key.id, other.owner_key_id, RANDOM_KEY):
        assert await listed(harness, owner, actor_api_key_id=actor) == []
    assert await listed(harness, owner, resource_id="INBOX:theirs-1") == []
    assert await listed(harness, owner, resource_id=their_key.id) == []
    assert await listed(harness, owner, resource_id=other.id) == []
    assert all(e.organization_id == org.id for e in await listed(harness, owner))
    # The other organization's own owner does see them: the filters work.
    assert summary(await listed(harness, other.owner_secret, resource_id="INBOX:theirs-1")) == [
        ("REGISTERED", "SCOPED_RESOURCE", "INBOX:theirs-1")
    ]


# 4. reach and scope changes under a stream on another replica


async def test_removing_the_owner_from_an_environment_stops_its_events_on_another_replica(
    harness: Harness, replica: Harness, org: Org
) -> None:
    """A member-owned key watching on replica B; on A its member is removed from one of its two
    environments: nothing of that environment committed afterwards reaches the stream, the other
    environment's events still do."""
    kept = await harness.new_environment(org, "Kept")
    dropped = await harness.new_environment(org, "Dropped")
    member = await harness.new_member(org, "MEMBER")
    for env in (kept, dropped):
        await harness.add_environment_member(org.owner_secret, env.id, member.id)
    _, secret = await harness.new_key(
        org, ["events:read", "inboxes:read"], [kept.id, dropped.id], owner_member_id=member.id
    )
    watcher = Watcher(replica.channel, secret)
    try:
        await watcher.live()
        before = await register(harness, org.owner_secret, dropped.id, "dropped-before")
        await watcher.reached(before)
        removed = await committed(
            harness.members.RemoveEnvironmentMember(
                member_pb2.RemoveEnvironmentMemberRequest(environment_id=dropped.id, member_id=member.id),
                metadata=auth(org.owner_secret),
            )
        )
        await register(harness, org.owner_secret, dropped.id, "dropped-after")
        last = await register(harness, org.owner_secret, kept.id, "kept-after")
        await watcher.reached(last)
        assert registered(watcher.events) == ["dropped-before", "kept-after"]
        assert not any(e.environment_id == dropped.id and e.revision >= removed for e in watcher.events)
        assert not watcher.ended
    finally:
        await watcher.close()


async def test_a_stream_stops_delivering_a_deleted_environment(
    harness: Harness, replica: Harness, org: Org
) -> None:
    """A key of two environments watching on replica B; on A one of them is deleted (SPEC §4:
    deleted environments are out of reach; §3: its resources stay inaccessible, keys lose access
    to it). Afterwards the stream delivers none of the deleted environment's resources (here:
    moved out of it), while the environment it keeps still streams. (A key of the deleted
    environment being revoked may still be shown: GetApiKey still answers it.)"""
    kept = await harness.new_environment(org, "Still here")
    doomed = await harness.new_environment(org, "Doomed")
    elsewhere = await harness.new_environment(org, "Elsewhere")
    doomed_key, _ = await harness.new_key(org, ["inboxes:read"], [doomed.id], name="doomed worker")
    await register(harness, org.owner_secret, doomed.id, "doomed-inbox")
    _, secret = await harness.new_key(
        org, ["events:read", "inboxes:read", "api_keys:read"], [kept.id, doomed.id]
    )
    watcher = Watcher(replica.channel, secret)
    try:
        await watcher.live()
        deleted = await committed(
            harness.environments.DeleteEnvironment(
                environment_pb2.DeleteEnvironmentRequest(id=doomed.id), metadata=auth(org.owner_secret)
            )
        )
        await committed(
            harness.api_keys.RevokeApiKey(
                key_pb.RevokeApiKeyRequest(id=doomed_key.id), metadata=auth(org.owner_secret)
            )
        )
        await committed(
            harness.resources.ReassignResources(
                resource_pb2.ReassignResourcesRequest(
                    from_environment_id=doomed.id, to_environment_id=elsewhere.id
                ),
                metadata=auth(org.owner_secret),
            )
        )
        last = await register(harness, org.owner_secret, kept.id, "kept-after")
        await watcher.reached(last)
        late = [
            e for e in watcher.events if e.revision > deleted and e.resource_type == Event.SCOPED_RESOURCE
        ]
        assert summary(late) == [("REGISTERED", "SCOPED_RESOURCE", "INBOX:kept-after")], summary(late)
    finally:
        await watcher.close()


async def test_lost_scopes_stop_their_events_and_losing_events_read_ends_the_stream(
    harness: Harness, replica: Harness, org: Org
) -> None:
    """A key watching on replica B loses `inboxes:read` on A: inbox events stop, label events go
    on; then it loses `events:read`: the stream ends with a refusal carrying the revision reached,
    and nothing committed after that change was delivered."""
    key, secret = await harness.new_key(org, ["events:read", "inboxes:read", "labels:read"])
    env_id = org.default_environment.id
    watcher = Watcher(replica.channel, secret)
    try:
        await watcher.live()
        # Delivered before the scope changes: an event is judged with the access at delivery.
        await watcher.reached(await register(harness, org.owner_secret, env_id, "inbox-before"))
        narrowed = await committed(
            harness.api_keys.UpdateApiKey(
                key_pb.UpdateApiKeyRequest(
                    api_key=key_pb.ApiKey(id=key.id, scopes=["events:read", "labels:read"]),
                    update_mask=field_mask_pb2.FieldMask(paths=["scopes"]),
                ),
                metadata=auth(org.owner_secret),
            )
        )
        await register(harness, org.owner_secret, env_id, "inbox-after")
        label = await register(harness, org.owner_secret, env_id, "label-after", LABEL)
        await watcher.reached(label)
        assert registered(watcher.events) == ["inbox-before", "label-after"]
        assert all(e.scoped_resource.kind == LABEL for e in watcher.events if e.revision > narrowed)

        cut = await committed(
            harness.api_keys.UpdateApiKey(
                key_pb.UpdateApiKeyRequest(
                    api_key=key_pb.ApiKey(id=key.id, scopes=["labels:read"]),
                    update_mask=field_mask_pb2.FieldMask(paths=["scopes"]),
                ),
                metadata=auth(org.owner_secret),
            )
        )
        await register(harness, org.owner_secret, env_id, "label-too-late", LABEL)
        failure = await watcher.ended_with()
        assert failure.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
        assert failure.reason == "SCOPE_MISSING" or failure.code == grpc.StatusCode.UNAUTHENTICATED
        assert int(failure.trailers[REVISION]) < cut + 2
        assert "label-too-late" not in registered(watcher.events)
        assert not any(e.revision >= cut for e in watcher.events)
    finally:
        await watcher.close()


async def test_a_key_revoked_on_one_replica_ends_its_stream_on_another(
    harness: Harness, replica: Harness, org: Org
) -> None:
    """Revoked on A, a key's stream on B ends UNAUTHENTICATED API_KEY_REVOKED with the revision it
    reached, having delivered nothing committed from the revoke on."""
    key, secret = await harness.new_key(org, ["events:read", "inboxes:read"])
    watcher = Watcher(replica.channel, secret)
    try:
        await watcher.live()
        before = await register(harness, org.owner_secret, org.default_environment.id, "before-revoke")
        await watcher.reached(before)
        revoked = await committed(
            harness.api_keys.RevokeApiKey(
                key_pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
            )
        )
        await register(harness, org.owner_secret, org.default_environment.id, "after-revoke")
        failure = await watcher.ended_with()
        assert (failure.code, failure.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
        assert before <= int(failure.trailers[REVISION]) < revoked
        assert registered(watcher.events) == ["before-revoke"]
    finally:
        await watcher.close()


async def test_a_deleted_environments_resources_are_not_shown_to_a_key_that_cannot_read_them(
    harness: Harness, org: Org
) -> None:
    """Once its environment is deleted, a resource is hidden from every key (README "Isolation
    guarantees"), and a key of that environment cannot read it in any way. Events are shown only to
    a caller who could read their resource now (README "Who sees what"), so neither ListEvents nor
    a watch replaying the log shows that key the deleted environment's resources."""
    doomed = await harness.new_environment(org, "Payroll")
    _, secret = await harness.new_key(org, ["events:read", "inboxes:read"], [doomed.id])
    await register(harness, org.owner_secret, doomed.id, "payroll-inbox", display_name="Payroll inbox")
    assert registered(await listed(harness, secret)) == ["payroll-inbox"]  # readable: shown
    await harness.delete_environment(org.owner_secret, doomed.id)
    with pytest.raises(grpc.aio.AioRpcError):
        await harness.resources.GetResource(
            resource_pb2.GetResourceRequest(kind=INBOX, resource_id="payroll-inbox"),
            metadata=auth(secret, doomed.id),
        )
    with pytest.raises(grpc.aio.AioRpcError):
        await harness.resources.ListResources(
            resource_pb2.ListResourcesRequest(kind=INBOX), metadata=auth(secret, doomed.id)
        )
    shown = await listed(harness, secret)
    assert registered(shown) == [], summary(shown)
    assert registered(await backlog(harness, secret, 1)) == []


# 5. reassignments: names and slugs of the other side too


async def test_a_reassignment_reveals_no_name_slug_or_id_of_its_other_side(
    harness: Harness, replica: Harness, org: Org
) -> None:
    """Resources moved from a source (later deleted) to a target: keys of each side, listing and
    watching on replica B with every read scope, never receive the other side's id, name or slug
    anywhere in an event's bytes. The source's key sees the move made while the source was active
    leave (the resource's environment blank); once the source is deleted its resources are out of
    that key's reach, so the later move, and the log listed afterwards, show it nothing of them."""
    tag = uuid.uuid4().hex[:6]
    source = await harness.new_environment(org, f"Source Alpha {tag}", f"src-alpha-{tag}")
    target = await harness.new_environment(org, f"Target Omega {tag}", f"dst-omega-{tag}")
    scopes = ["events:read", "inboxes:read", "environments:read", "members:read", "api_keys:read"]
    _, in_source = await harness.new_key(org, scopes, [source.id])
    _, in_target = await harness.new_key(org, scopes, [target.id])
    await register(harness, org.owner_secret, source.id, "moving-1", display_name="Box one")
    await register(harness, org.owner_secret, source.id, "moving-2", display_name="Box two")
    watchers = {
        in_source: Watcher(replica.channel, in_source),
        in_target: Watcher(replica.channel, in_target),
    }
    try:
        for watcher in watchers.values():
            await watcher.live()
        first = await committed(
            harness.resources.ReassignResources(
                resource_pb2.ReassignResourcesRequest(
                    from_environment_id=source.id,
                    to_environment_id=target.id,
                    resources=[resource_pb2.ResourceRef(kind=INBOX, resource_id="moving-1")],
                ),
                metadata=auth(org.owner_secret),
            )
        )
        # Delivered before the delete: an event is judged with the access its key has when it
        # is delivered, and a replica that polls (SQLite) may learn of both at once.
        await watchers[in_source].reached(first)
        await harness.delete_environment(org.owner_secret, source.id)
        last = await committed(
            harness.resources.ReassignResources(
                resource_pb2.ReassignResourcesRequest(
                    from_environment_id=source.id, to_environment_id=target.id
                ),
                metadata=auth(org.owner_secret),
            )
        )
        for watcher in watchers.values():
            await watcher.reached(last)

        def secrets_of(env: environment_pb2.Environment) -> list[bytes]:
            return [env.id.encode(), env.name.encode(), env.slug.encode()]

        for secret, hidden, seen in ((in_source, target, 1), (in_target, source, 4)):
            events = await listed(harness, secret) + watchers[secret].events
            moves = [e for e in events if e.action == Event.REASSIGNED]
            # The target's key: each move, listed and watched. The source's: the first, watched.
            assert len(moves) == seen, summary(events)
            for event in events:
                body = event.SerializeToString()
                for needle in secrets_of(hidden):
                    assert needle not in body, (needle, event)
                assert all(hidden.id not in field for field in event.changed_fields)
            for message in watchers[secret].messages:
                assert hidden.id.encode() not in message.SerializeToString()
        leaving = [e for e in watchers[in_source].events if e.action == Event.REASSIGNED]
        assert [(e.environment_id, e.scoped_resource.environment_id) for e in leaving] == [(source.id, "")]
        assert [e for e in await listed(harness, in_source) if e.action == Event.REASSIGNED] == []
        arriving = [e for e in await listed(harness, in_target) if e.action == Event.REASSIGNED]
        assert {(e.environment_id, e.scoped_resource.environment_id) for e in arriving} == {
            (target.id, target.id)
        }
    finally:
        for watcher in watchers.values():
            await watcher.close()


# 6. secrets


def needles(secret: str) -> list[bytes]:
    """What of a secret must never be in an event: itself, its random part, pieces of it, and its
    SHA-256 digest in the usual spellings."""
    body = secret[12:]
    found: list[bytes] = [secret.encode(), body.encode(), secret[-38:].encode(), body[:16].encode()]
    for material in (secret, body):
        digest = hashlib.sha256(material.encode()).digest()
        found += [
            digest,
            digest.hex().encode(),
            digest.hex().upper().encode(),
            base64.b64encode(digest),
            base64.urlsafe_b64encode(digest).rstrip(b"="),
        ]
    return found


async def test_no_event_carries_a_secret_or_its_digest(harness: Harness, replica: Harness, org: Org) -> None:
    """After CreateApiKey and two RollApiKey calls (with and without an overlap), no listed or
    watched event, nor any watch message, holds any secret, its random part, its tail or its
    SHA-256 digest (raw, hex, base64); the events themselves are there."""
    watcher = Watcher(replica.channel, org.owner_secret)
    try:
        await watcher.live()
        created = await harness.api_keys.CreateApiKey(
            key_pb.CreateApiKeyRequest(
                name="secretive", scopes=["inboxes:read"], environment_ids=[org.default_environment.id]
            ),
            metadata=auth(org.owner_secret),
        )
        roll = harness.api_keys.RollApiKey(
            key_pb.RollApiKeyRequest(
                id=created.api_key.id, previous_key_ttl=duration_pb2.Duration(seconds=60)
            ),
            metadata=auth(org.owner_secret),
        )
        rolled = await roll
        roll_again = harness.api_keys.RollApiKey(
            key_pb.RollApiKeyRequest(id=rolled.api_key.id), metadata=auth(org.owner_secret)
        )
        again = await roll_again
        last = await committed(roll_again)
        await watcher.reached(last)
        events = await listed(harness, org.owner_secret) + watcher.events
        kinds = {(Event.Action.Name(e.action), e.resource_id) for e in events}
        assert {
            ("CREATED", created.api_key.id),
            ("ROLLED", created.api_key.id),
            ("CREATED", rolled.api_key.id),
            ("ROLLED", rolled.api_key.id),
            ("CREATED", again.api_key.id),
        } <= kinds
        blobs = [e.SerializeToString() for e in events] + [m.SerializeToString() for m in watcher.messages]
        for secret in (created.secret, rolled.secret, again.secret):
            for needle in needles(secret):
                assert not any(needle in blob for blob in blobs), needle
    finally:
        await watcher.close()


# 7. ListEvents filters and page tokens


async def test_time_filters_at_their_edges(harness: Harness, org: Org) -> None:
    """start_time equal to end_time is refused; the widest valid range lists everything; a range
    wholly in the future or the far past lists nothing and ends the log; a time outside what a
    Timestamp may hold (seconds or nanos) is INVALID_ARGUMENT naming the field, never INTERNAL."""
    for index in range(3):
        await register(harness, org.owner_secret, org.default_environment.id, f"timed-{index}")
    owner = org.owner_secret
    everything = await listed(harness, owner)
    stub = events_stub(harness)
    now = stamp(datetime.now(UTC))
    failure = await fails(
        stub.ListEvents(event_pb2.ListEventsRequest(start_time=now, end_time=now), metadata=auth(owner)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "end_time" in failure.violations
    earliest = timestamp_pb2.Timestamp(seconds=-62135596800)  # 0001-01-01
    latest = timestamp_pb2.Timestamp(seconds=253402300799, nanos=999_999_999)  # 9999-12-31
    assert summary(await listed(harness, owner, start_time=earliest, end_time=latest)) == summary(everything)
    assert summary(await listed(harness, owner, start_time=earliest)) == summary(everything)
    assert summary(await listed(harness, owner, end_time=latest)) == summary(everything)
    future = stamp(datetime.now(UTC) + timedelta(days=1))
    page = await stub.ListEvents(event_pb2.ListEventsRequest(start_time=future), metadata=auth(owner))
    assert list(page.events) == [] and page.next_page_token == ""
    past = stamp(datetime(1971, 1, 1, tzinfo=UTC))
    page = await stub.ListEvents(event_pb2.ListEventsRequest(end_time=past), metadata=auth(owner))
    assert list(page.events) == [] and page.next_page_token == ""
    page = await stub.ListEvents(
        event_pb2.ListEventsRequest(start_time=earliest, end_time=past), metadata=auth(owner)
    )
    assert list(page.events) == []
    bad_times = {
        "start_time": [
            timestamp_pb2.Timestamp(seconds=253402300800),
            timestamp_pb2.Timestamp(seconds=-62135596801),
            timestamp_pb2.Timestamp(seconds=0, nanos=-1),
            timestamp_pb2.Timestamp(seconds=2**62),
        ],
        "end_time": [timestamp_pb2.Timestamp(seconds=1, nanos=1_000_000_000)],
    }
    for field, values in bad_times.items():
        for bad in values:
            failure = await fails(
                stub.ListEvents(event_pb2.ListEventsRequest(**{field: bad}), metadata=auth(owner)),  # type: ignore[arg-type]
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert field in failure.violations, (bad, failure)


async def test_page_tokens_and_sizes_at_their_edges(harness: Harness, org: Org) -> None:
    """The largest int32 page size is clamped, the smallest refused; a token answers the same page
    twice; a token is refused (INVALID_PAGE_TOKEN) with any filter changed (a time moved by a
    microsecond, an environment or type added), when it is garbage, when it comes from another
    List method, or is altered by one character; long or unprintable filters are refused."""
    env = await harness.new_environment(org, "Paged")
    for index in range(5):
        await register(harness, org.owner_secret, env.id, f"paged-{index}")
    owner = org.owner_secret
    stub = events_stub(harness)
    everything = await listed(harness, owner)
    huge = await stub.ListEvents(event_pb2.ListEventsRequest(page_size=2**31 - 1), metadata=auth(owner))
    assert summary(list(huge.events)) == summary(everything) and huge.next_page_token == ""
    await fails(
        stub.ListEvents(event_pb2.ListEventsRequest(page_size=-(2**31)), metadata=auth(owner)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    since = datetime.now(UTC) - timedelta(hours=1)
    base = {"page_size": 2, "start_time": stamp(since)}
    first = await stub.ListEvents(event_pb2.ListEventsRequest(**base), metadata=auth(owner))  # type: ignore[arg-type]
    token = first.next_page_token
    assert token
    pages = [
        await stub.ListEvents(event_pb2.ListEventsRequest(page_token=token, **base), metadata=auth(owner))  # type: ignore[arg-type]
        for _ in range(2)
    ]
    assert summary(list(pages[0].events)) == summary(list(pages[1].events)) == summary(everything[2:4])
    assert pages[0].next_page_token == pages[1].next_page_token

    environments = await harness.environments.ListEnvironments(
        environment_pb2.ListEnvironmentsRequest(page_size=1), metadata=auth(owner)
    )
    assert environments.next_page_token
    altered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    changed: list[dict[str, Any]] = [
        {**base, "start_time": stamp(since + timedelta(microseconds=1))},
        {**base, "end_time": stamp(datetime.now(UTC) + timedelta(days=1))},
        {**base, "environment_id": env.id},
        {**base, "resource_type": Event.SCOPED_RESOURCE},
        {**base, "resource_id": "INBOX:paged-1"},
        {**base, "actor_api_key_id": org.owner_key_id},
        {"page_size": 2},
    ]
    for fields in changed:
        await fails(
            stub.ListEvents(event_pb2.ListEventsRequest(page_token=token, **fields), metadata=auth(owner)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        )
    for bad_token in ("garbage", "x" * 5000, environments.next_page_token, altered, token + "A"):
        await fails(
            stub.ListEvents(event_pb2.ListEventsRequest(page_token=bad_token, **base), metadata=auth(owner)),  # type: ignore[arg-type]
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        )
    for filters in (
        {"resource_id": "x" * 301},
        {"resource_id": "INBOX:bad\nid"},
        {"actor_api_key_id": "key_\x00"},
        {"actor_api_key_id": "k" * 201},
        {"environment_id": "env_\x7f"},
    ):
        failure = await fails(
            stub.ListEvents(event_pb2.ListEventsRequest(**filters), metadata=auth(owner)),  # type: ignore[arg-type]
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert next(iter(filters)) in failure.violations, failure
    # A type no caller below organization level may see filters to nothing, not to an error.
    _, scoped = await harness.new_key(org, ["events:read", "inboxes:read"], [env.id])
    assert await listed(harness, scoped, resource_type=Event.ORGANIZATION) == []
    assert await listed(harness, scoped, resource_type=Event.MEMBER) == []
    assert len(await listed(harness, scoped, resource_type=Event.SCOPED_RESOURCE)) == 5


async def test_time_bounds_are_inclusive_and_exclusive_at_an_events_own_time(
    harness: Harness, org: Org
) -> None:
    """An event's own create_time, as ListEvents answered it, used as start_time includes that
    event and as end_time excludes it (README: start inclusive, end exclusive), on both databases."""
    for index in range(3):
        await register(harness, org.owner_secret, org.default_environment.id, f"bound-{index}")
        await asyncio.sleep(0.01)
    owner = org.owner_secret
    everything = await listed(harness, owner)
    middle = next(e for e in everything if e.resource_id == "INBOX:bound-1")
    from_middle = await listed(harness, owner, start_time=middle.create_time)
    assert summary(from_middle)[-1] == ("REGISTERED", "SCOPED_RESOURCE", "INBOX:bound-1"), summary(
        from_middle
    )
    before_middle = await listed(harness, owner, end_time=middle.create_time)
    assert ("REGISTERED", "SCOPED_RESOURCE", "INBOX:bound-1") not in summary(before_middle)
    assert summary(before_middle)[0] == ("REGISTERED", "SCOPED_RESOURCE", "INBOX:bound-0")
    just_after = timestamp_pb2.Timestamp(
        seconds=middle.create_time.seconds, nanos=middle.create_time.nanos + 1000
    )
    if just_after.nanos >= 1_000_000_000:
        just_after = timestamp_pb2.Timestamp(seconds=middle.create_time.seconds + 1)
    only_middle = await listed(harness, owner, start_time=middle.create_time, end_time=just_after)
    assert summary(only_middle) == [("REGISTERED", "SCOPED_RESOURCE", "INBOX:bound-1")]


async def test_huge_revisions_and_sparse_logs_are_delivered_whole_and_once(
    harness: Harness, replica: Harness, org: Org
) -> None:
    """520 resources moved four times (revisions of more events than one watch message or one log
    chunk holds; more events than ListEvents examines per page). A watch replaying them and one
    receiving the last move live get every event exactly once in commit order, a message holding
    part of a revision carries the revision before it; a key that may see only two labels among
    them lists exactly those two, through short pages, losing none."""
    count = 520
    source = await harness.new_environment(org, "Big A")
    target = await harness.new_environment(org, "Big B")
    await register(harness, org.owner_secret, org.default_environment.id, "label-before", LABEL)
    for start in range(0, count, 40):
        await asyncio.gather(
            *(
                register(harness, org.owner_secret, source.id, f"bulk-{index}")
                for index in range(start, min(start + 40, count))
            )
        )
    _, labels_only = await harness.new_key(org, ["events:read", "labels:read"])

    async def move(from_env: str, to_env: str) -> int:
        return await committed(
            harness.resources.ReassignResources(
                resource_pb2.ReassignResourcesRequest(from_environment_id=from_env, to_environment_id=to_env),
                metadata=auth(org.owner_secret),
            )
        )

    first_move = await move(source.id, target.id) - 1
    await move(target.id, source.id)
    third = await move(source.id, target.id)
    live = Watcher(replica.channel, org.owner_secret)
    replay = Watcher(replica.channel, org.owner_secret, after_revision=first_move)
    try:
        await live.live()
        last = await move(target.id, source.id)
        await register(harness, org.owner_secret, org.default_environment.id, "label-after", LABEL)
        last += 1
        for watcher in (live, replay):
            await watcher.reached(last, seconds=30)
        moves = [e for e in replay.events if e.action == Event.REASSIGNED]
        assert [e.revision for e in moves] == sorted(e.revision for e in moves)
        for revision in range(first_move + 1, last):
            ids = [e.resource_id for e in moves if e.revision == revision]
            assert len(ids) == count and len(set(ids)) == count, (revision, len(ids), len(set(ids)))
        live_moves = [e for e in live.events if e.action == Event.REASSIGNED]
        assert {e.revision for e in live_moves} == {last - 1}
        assert len({e.id for e in live_moves}) == len(live_moves) == count
        for watcher in (live, replay):
            previous = 0
            for message in watcher.messages:
                assert message.revision >= previous
                previous = message.revision
                if message.events:
                    newest = max(e.revision for e in message.events)
                    assert message.revision in (newest, newest - 1), (message.revision, newest)
                    assert len(message.events) <= 500
        assert third < last
    finally:
        await live.close()
        await replay.close()

    stub = events_stub(harness)
    pages = 0
    token = ""
    seen: list[Event] = []
    while True:
        page = await stub.ListEvents(
            event_pb2.ListEventsRequest(page_size=1, page_token=token), metadata=auth(labels_only)
        )
        pages += 1
        seen += list(page.events)
        token = page.next_page_token
        if not token:
            break
        assert pages < 50, "the pages do not end"
    assert registered(seen) == ["label-after", "label-before"]
    assert pages >= 2  # the first page stopped examining before the log's end
    assert summary(await listed(harness, labels_only)) == summary(seen)


# 8. many streams dropped at once


async def scrape(harness: Harness) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the server's /metrics, by name and labels."""
    assert harness.app.metrics is not None
    url = f"http://127.0.0.1:{harness.app.metrics.port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def subscribers(harness: Harness) -> float:
    return (await scrape(harness)).get(("agentpost_event_stream_subscribers", frozenset()), -1.0)


async def wait_for(check: Callable[[], Any], seconds: float) -> Any:
    """Polls an async check until it returns something true; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        outcome = await check()
        if outcome:
            return outcome
        assert time.monotonic() < deadline, f"not reached within {seconds} s"
        await asyncio.sleep(0.05)


async def test_hundreds_of_streams_dropped_under_writes_leave_no_subscriber_behind(backend: Backend) -> None:
    """200 streams (from now, and replaying the log) opened on four connections while writes go
    on, then dropped abruptly: half cancelled, the rest by closing their connections. The server
    stays responsive throughout, clients see no error but CANCELLED, the server counts no
    WatchEvents call as UNKNOWN or INTERNAL, and the subscriber gauge returns to its baseline."""
    app, channel = await start_server(
        backend, metrics_address="127.0.0.1:0", watch_heartbeat_seconds=HEARTBEAT_SECONDS
    )
    server = Harness(app, channel, backend.name)
    channels = [grpc.aio.insecure_channel(server.address) for _ in range(4)]
    watchers: list[Watcher] = []
    writing = True

    async def write() -> int:
        count = 0
        while writing:
            await register(server, org.owner_secret, org.default_environment.id, f"churn-{count}")
            count += 1
            await asyncio.sleep(0.01)
        return count

    try:
        org = await server.new_org()
        _, scoped = await server.new_key(org, ["events:read", "inboxes:read"], [org.default_environment.id])
        baseline = await subscribers(server)
        assert baseline == 0
        writer = asyncio.ensure_future(write())
        for index in range(200):
            secret = scoped if index % 2 else org.owner_secret
            watchers.append(Watcher(channels[index % 4], secret, after_revision=1 if index % 3 == 0 else 0))
        await asyncio.wait_for(asyncio.gather(*(watcher.live() for watcher in watchers)), 60)
        assert await wait_for(lambda: _at_least(server, 200), 20)
        probe = await asyncio.wait_for(
            server.organizations.GetOrganization(
                organization_pb2.GetOrganizationRequest(), metadata=auth(scoped)
            ),
            10,
        )
        assert probe.id == org.id
        # 50 more, cancelled at once: while they authenticate or read the log.
        hasty = [Watcher(channels[index % 4], org.owner_secret, after_revision=1) for index in range(50)]
        for watcher in hasty:
            watcher.call.cancel()
        watchers += hasty
        for watcher in watchers[:100]:
            watcher.call.cancel()  # abruptly, without waiting for the end
        for dropped in channels[:2]:
            await dropped.close(grace=None)
        for dropped in channels[2:]:
            await dropped.close(grace=None)
        writing = False
        writes = await writer
        assert writes > 0
        await asyncio.wait([watcher._task for watcher in watchers], timeout=20)
        assert all(watcher.ended for watcher in watchers), "a dropped stream did not end on the client"
        failures = [watcher.failure for watcher in watchers if watcher.failure is not None]
        assert failures == [], failures[:3]
        assert await wait_for(lambda: _exactly(server, baseline), 15)
        # Still serving: a new stream goes live and hears a new write.
        fresh = Watcher(server.channel, scoped)
        try:
            await fresh.live()
            last = await register(server, org.owner_secret, org.default_environment.id, "after-churn")
            await fresh.reached(last)
            assert registered(fresh.events) == ["after-churn"]
        finally:
            await fresh.close()
        samples = await scrape(server)
        bad = {
            dict(labels).get("grpc_code"): count
            for (name, labels), count in samples.items()
            if name == "grpc_server_handled_total"
            and dict(labels).get("grpc_method") == WATCH_METHOD
            and dict(labels).get("grpc_code") in ("UNKNOWN", "INTERNAL")
        }
        assert not bad, bad
    finally:
        writing = False
        for watcher in watchers:
            with contextlib.suppress(Exception):
                await watcher.close()
        for each in channels:
            await each.close()
        await channel.close()
        await app.stop(grace=0)


async def _at_least(harness: Harness, count: int) -> bool:
    return await subscribers(harness) >= count


async def _exactly(harness: Harness, count: float) -> bool:
    return await subscribers(harness) == count
