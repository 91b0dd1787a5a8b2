"""ListEvents, the audit log: every write of every service with its actor, request id, changed
fields and resource (never a secret); newest first, keyset pages bound to query and caller; the
filters of SPEC §6; and each event shown only to a caller who could read its resource, including
both sides of a reassignment."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import grpc
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import (
    environment_pb2,
    event_pb2,
    event_pb2_grpc,
    member_pb2,
    resource_pb2,
    resource_pb2_grpc,
)
from google.protobuf import field_mask_pb2, timestamp_pb2

from tests.harness import Harness, Org, auth, every_event, fails

Event = event_pb2.Event
INBOX, LABEL = resource_pb2.ScopedResource.INBOX, resource_pb2.ScopedResource.LABEL


def events_stub(harness: Harness) -> event_pb2_grpc.EventServiceStub:
    """A stub of EventService on the harness channel."""
    return event_pb2_grpc.EventServiceStub(harness.channel)


async def all_events(harness: Harness, secret: str, page_size: int = 500, **filters: object) -> list[Event]:
    """Every event the key may list, page by page, newest first."""
    return await every_event(events_stub(harness), auth(secret), page_size, filters=filters)


def summary(events: list[Event]) -> list[tuple[str, str, str]]:
    """(action, resource type, resource id) of each event, in order."""
    return [
        (Event.Action.Name(e.action), Event.ResourceType.Name(e.resource_type), e.resource_id) for e in events
    ]


async def register(harness: Harness, secret: str, env_id: str, resource_id: str, kind: int = INBOX) -> None:
    await harness.resources.RegisterResource(
        resource_pb2.RegisterResourceRequest(kind=cast(Any, kind), resource_id=resource_id),
        metadata=auth(secret, env_id),
    )


async def test_every_write_is_listed_newest_first_with_actor_request_and_resource(
    harness: Harness, org: Org
) -> None:
    request_id = f"audit-{uuid.uuid4().hex[:8]}"
    env = await harness.new_environment(org, "Staging")
    await harness.environments.UpdateEnvironment(
        environment_pb2.UpdateEnvironmentRequest(
            environment=environment_pb2.Environment(id=env.id, description="the staging one"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
        metadata=auth(org.owner_secret, request_id=request_id),
    )
    member = await harness.new_member(org, "MEMBER")
    await harness.members.AddEnvironmentMember(
        member_pb2.AddEnvironmentMemberRequest(
            environment_id=env.id, member_id=member.id, role=member_pb2.EnvironmentMember.MEMBER
        ),
        metadata=auth(org.owner_secret),
    )
    created = await harness.api_keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(name="worker", scopes=["inboxes:read"], environment_ids=[env.id]),
        metadata=auth(org.owner_secret),
    )
    await harness.api_keys.RevokeApiKey(
        key_pb.RevokeApiKeyRequest(id=created.api_key.id), metadata=auth(org.owner_secret)
    )
    await register(harness, org.owner_secret, env.id, "inbox-1")

    events = await all_events(harness, org.owner_secret)
    assert summary(events) == [
        ("REGISTERED", "SCOPED_RESOURCE", "INBOX:inbox-1"),
        ("REVOKED", "API_KEY", created.api_key.id),
        ("CREATED", "API_KEY", created.api_key.id),
        ("ADDED", "ENVIRONMENT_MEMBER", f"{env.id}/{member.id}"),
        ("CREATED", "MEMBER", member.id),
        ("UPDATED", "ENVIRONMENT", env.id),
        ("CREATED", "ENVIRONMENT", env.id),
        ("CREATED", "API_KEY", org.owner_key_id),
        ("CREATED", "MEMBER", org.owner_member_id),
        ("CREATED", "ENVIRONMENT", org.default_environment.id),
        ("CREATED", "ORGANIZATION", org.id),
    ]
    assert [e.revision for e in events] == [8, 7, 6, 5, 4, 3, 2, 1, 1, 1, 1]
    assert all(e.id.startswith("evt_") and e.organization_id == org.id for e in events)
    update = events[5]
    assert update.actor == Event.Actor(api_key_id=org.owner_key_id, member_id=org.owner_member_id)
    assert update.request_id == request_id
    assert list(update.changed_fields) == ["description"]
    assert update.WhichOneof("resource") == "environment"
    assert update.environment.description == "the staging one" and update.environment_id == env.id
    revoked = events[1]
    assert revoked.api_key.state == key_pb.ApiKey.REVOKED and "revoke_time" in revoked.changed_fields
    assert created.secret not in revoked.SerializeToString().decode("latin-1")
    assert events[-1].actor.operator and not events[-1].actor.api_key_id
    assert events[-1].organization.name == "Acme"
    assert events[0].scoped_resource.environment_id == env.id
    assert events[0].create_time.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)


async def test_pages_are_keyset_and_bound_to_query_and_caller(harness: Harness, org: Org) -> None:
    for index in range(7):
        await register(harness, org.owner_secret, org.default_environment.id, f"paged-{index}")
    everything = await all_events(harness, org.owner_secret)
    for size in (1, 2, 3, 5):
        assert summary(await all_events(harness, org.owner_secret, page_size=size)) == summary(everything)
    stub = events_stub(harness)
    first = await stub.ListEvents(event_pb2.ListEventsRequest(page_size=2), metadata=auth(org.owner_secret))
    assert len(first.events) == 2 and first.next_page_token
    # A write between pages neither shifts nor repeats anything (keyset, newest first).
    await register(harness, org.owner_secret, org.default_environment.id, "late")
    rest = await all_events(harness, org.owner_secret)  # fresh listing sees it first
    assert rest[0].resource_id == "INBOX:late"
    second = await stub.ListEvents(
        event_pb2.ListEventsRequest(page_size=2, page_token=first.next_page_token),
        metadata=auth(org.owner_secret),
    )
    assert summary(list(second.events)) == summary(everything[2:4])
    # The token of another query, or presented by another key, is refused.
    await fails(
        stub.ListEvents(
            event_pb2.ListEventsRequest(
                page_size=2, page_token=first.next_page_token, resource_type=Event.SCOPED_RESOURCE
            ),
            metadata=auth(org.owner_secret),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    _, other = await harness.new_key(org, ["events:read", "environments:read"])
    await fails(
        stub.ListEvents(
            event_pb2.ListEventsRequest(page_size=2, page_token=first.next_page_token), metadata=auth(other)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    await fails(
        stub.ListEvents(event_pb2.ListEventsRequest(page_size=-1), metadata=auth(org.owner_secret)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_filters(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Filtered")
    key, secret = await harness.new_key(org, ["inboxes:write", "labels:write"], [env.id])
    await register(harness, secret, env.id, "by-key")
    await register(harness, secret, env.id, "label-1", LABEL)
    await register(harness, org.owner_secret, org.default_environment.id, "by-owner")
    between = datetime.now(UTC)
    await harness.resources.DeregisterResource(
        resource_pb2.DeregisterResourceRequest(kind=INBOX, resource_id="by-key"),
        metadata=auth(secret, env.id),
    )
    owner = org.owner_secret

    in_env = await all_events(harness, owner, environment_id=env.id)
    assert summary(in_env) == [
        ("DEREGISTERED", "SCOPED_RESOURCE", "INBOX:by-key"),
        ("REGISTERED", "SCOPED_RESOURCE", "LABEL:label-1"),
        ("REGISTERED", "SCOPED_RESOURCE", "INBOX:by-key"),
        ("CREATED", "API_KEY", key.id),
        ("CREATED", "ENVIRONMENT", env.id),
    ]
    by_type = await all_events(harness, owner, resource_type=Event.ENVIRONMENT)
    assert summary(by_type) == [
        ("CREATED", "ENVIRONMENT", env.id),
        ("CREATED", "ENVIRONMENT", org.default_environment.id),
    ]
    by_resource = await all_events(harness, owner, resource_id="INBOX:by-key")
    assert [e.action for e in by_resource] == [Event.DEREGISTERED, Event.REGISTERED]
    by_actor = await all_events(harness, owner, actor_api_key_id=key.id)
    assert summary(by_actor) == summary(in_env[:3])
    assert all(e.actor.api_key_id == key.id for e in by_actor)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(between)
    assert summary(await all_events(harness, owner, start_time=stamp)) == summary(in_env[:1])
    before = await all_events(harness, owner, end_time=stamp)
    assert summary(before)[0] == ("REGISTERED", "SCOPED_RESOURCE", "INBOX:by-owner")
    assert await all_events(harness, owner, resource_id="INBOX:never") == []

    stub = events_stub(harness)
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(between + timedelta(seconds=1))
    await fails(
        stub.ListEvents(event_pb2.ListEventsRequest(start_time=later, end_time=stamp), metadata=auth(owner)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await fails(
        stub.ListEvents(event_pb2.ListEventsRequest(resource_type=99), metadata=auth(owner)),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    other = await harness.new_org()
    await fails(
        stub.ListEvents(
            event_pb2.ListEventsRequest(environment_id=other.default_environment.id), metadata=auth(owner)
        ),
        grpc.StatusCode.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )


async def test_a_caller_sees_only_events_of_resources_it_may_read(harness: Harness, org: Org) -> None:
    env_a = await harness.new_environment(org, "A")
    env_b = await harness.new_environment(org, "B")
    await register(harness, org.owner_secret, env_a.id, "a-1")
    await register(harness, org.owner_secret, env_b.id, "b-1")
    await register(harness, org.owner_secret, env_a.id, "a-label", LABEL)
    key_b, _ = await harness.new_key(org, ["inboxes:read"], [env_b.id])
    _, inboxes_a = await harness.new_key(org, ["events:read", "inboxes:read"], [env_a.id])
    _, admin_a = await harness.new_key(
        org, ["events:read", "environments:read", "members:read", "api_keys:read"], [env_a.id]
    )
    other = await harness.new_org()
    await register(harness, other.owner_secret, other.default_environment.id, "a-1")

    assert summary(await all_events(harness, inboxes_a)) == [("REGISTERED", "SCOPED_RESOURCE", "INBOX:a-1")]
    admin_view = summary(await all_events(harness, admin_a))
    assert ("CREATED", "ENVIRONMENT", env_a.id) in admin_view
    assert all(env_b.id not in resource_id for _, _, resource_id in admin_view)
    assert ("CREATED", "API_KEY", key_b.id) not in admin_view  # a key of B
    assert not any(kind in ("ORGANIZATION", "MEMBER", "SCOPED_RESOURCE") for _, kind, _ in admin_view)
    assert ("CREATED", "API_KEY", org.owner_key_id) not in admin_view  # organization-wide
    # The other organization's owner sees none of this organization's events.
    assert all(e.organization_id == other.id for e in await all_events(harness, other.owner_secret))

    # A key that is not organization-level sees no organization-level events, whatever its scopes.
    member = await harness.new_member(org, "MEMBER")
    _, member_owned = await harness.new_key(
        org, ["events:read", "members:read", "environments:read"], owner_member_id=member.id
    )
    assert await all_events(harness, member_owned) == []  # the member reaches no environment yet


async def test_a_reassignment_never_shows_its_other_side(harness: Harness, org: Org) -> None:
    env_a = await harness.new_environment(org, "Source")
    env_b = await harness.new_environment(org, "Target")
    await register(harness, org.owner_secret, env_a.id, "moving")
    _, in_a = await harness.new_key(org, ["events:read", "inboxes:read"], [env_a.id])
    _, in_b = await harness.new_key(org, ["events:read", "inboxes:read"], [env_b.id])
    _, in_both = await harness.new_key(org, ["events:read", "inboxes:read"], [env_a.id, env_b.id])
    await harness.resources.ReassignResources(
        resource_pb2.ReassignResourcesRequest(from_environment_id=env_a.id, to_environment_id=env_b.id),
        metadata=auth(org.owner_secret),
    )

    leaving = (await all_events(harness, in_a))[0]
    assert (leaving.action, leaving.environment_id) == (Event.REASSIGNED, env_a.id)
    assert leaving.scoped_resource.resource_id == "moving" and leaving.scoped_resource.environment_id == ""
    assert env_b.id not in leaving.SerializeToString().decode("latin-1")
    arriving = (await all_events(harness, in_b))[0]
    assert (arriving.action, arriving.environment_id) == (Event.REASSIGNED, env_b.id)
    assert arriving.scoped_resource.environment_id == env_b.id
    assert env_a.id not in arriving.SerializeToString().decode("latin-1")
    assert summary(await all_events(harness, in_b)) == [("REASSIGNED", "SCOPED_RESOURCE", "INBOX:moving")]
    both = await all_events(harness, in_both)
    assert [(e.action, e.environment_id) for e in both] == [
        (Event.REASSIGNED, env_b.id),
        (Event.REGISTERED, env_a.id),
    ]
    # Filtering by the environment it left finds the event too, as that caller sees it.
    filtered = await all_events(harness, in_a, environment_id=env_a.id)
    assert [(e.action, e.scoped_resource.environment_id) for e in filtered] == [
        (Event.REASSIGNED, ""),
        (Event.REGISTERED, env_a.id),
    ]


async def test_events_need_their_scope_which_is_read_only(harness: Harness, org: Org) -> None:
    _, secret = await harness.new_key(org, ["inboxes:read", "environments:read"])
    stub = events_stub(harness)
    await fails(
        stub.ListEvents(event_pb2.ListEventsRequest(), metadata=auth(secret)),
        grpc.StatusCode.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    await fails(
        harness.api_keys.CreateApiKey(
            key_pb.CreateApiKeyRequest(name="w", scopes=["events:write"]), metadata=auth(org.owner_secret)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_SCOPE",
    )
    await fails(
        stub.ListEvents(event_pb2.ListEventsRequest(), metadata=auth("ap_sk_live_nonsense")),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_writes_their_callers_gave_up_on_are_whole_or_absent(harness: Harness, org: Org) -> None:
    """Callers that give up mid-write (deadlines of a few milliseconds, so some land while the
    commit runs) leave nothing half done: the log stays gapless, each registration it records is
    registered and each acknowledged one is in it, and the writer is free for the next write."""
    stub = resource_pb2_grpc.ResourceServiceStub(harness.channel)

    async def register(index: int, deadline: float) -> str:
        try:
            await stub.RegisterResource(
                resource_pb2.RegisterResourceRequest(kind=INBOX, resource_id=f"gave-up-{index}"),
                metadata=auth(org.owner_secret),
                timeout=deadline,
            )
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
        return "OK"

    # Deadlines from 1 to 117 ms, and every tenth caller a patient one, so that some writes are
    # acknowledged however slow the machine is.
    codes = await asyncio.gather(
        *(register(index, 5.0 if index % 10 == 0 else 0.001 + (index % 30) * 0.004) for index in range(90))
    )
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, codes
    assert "DEADLINE_EXCEEDED" in codes, "no caller gave up: the deadlines are too long to test this"
    acknowledged = {f"gave-up-{index}" for index, code in enumerate(codes) if code == "OK"}

    call = stub.RegisterResource(
        resource_pb2.RegisterResourceRequest(kind=INBOX, resource_id="after"),
        metadata=auth(org.owner_secret),
        timeout=10,
    )
    await call
    revision = int(dict(await call.trailing_metadata())["x-agentpost-revision"])
    events = await all_events(harness, org.owner_secret)
    assert sorted({event.revision for event in events}) == list(range(1, revision + 1))
    # A registration's event names it `KIND:resource_id`.
    logged = {event.resource_id.split(":", 1)[1] for event in events if event.action == Event.REGISTERED}
    assert acknowledged | {"after"} <= logged
    assert acknowledged, "every caller gave up: the deadlines are too short to test this"
    for resource_id in logged:
        got = await stub.GetResource(
            resource_pb2.GetResourceRequest(kind=INBOX, resource_id=resource_id),
            metadata=auth(org.owner_secret),
        )
        assert got.resource_id == resource_id
