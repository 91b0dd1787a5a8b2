"""WatchEvents: the backlog after a revision, then live writes in revision order; resuming from
the last revision received loses and repeats nothing, even when a consumer disconnects under
writes; heartbeats carry the revision reached; an expired or invalid revision is refused; a slow
consumer's buffer is bounded; a revoked or expired key ends its stream and a shrunken reach stops
what left it; another replica's writes arrive; shutdown ends streams with a revision to resume
from. Retention prunes old events (whole revisions, oldest first)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import environment_pb2, event_pb2, event_pb2_grpc, member_pb2, resource_pb2
from google.protobuf import field_mask_pb2, timestamp_pb2
from sqlalchemy import func, select, update

from service.storage.tables import EventRow
from tests.harness import Harness, Org, auth, fails, failure_of
from tests.servers import Backend, start_server
from tests.watching import Watcher

Event = event_pb2.Event
INBOX = resource_pb2.ScopedResource.INBOX
REVISION = "x-agentpost-revision"
HEARTBEAT_SECONDS = 0.3
BUFFER_REVISIONS = 4


@pytest.fixture(scope="module")
async def quick(backend: Backend) -> AsyncIterator[Harness]:
    """A server of its own with fast heartbeats and a small per-stream buffer."""
    app, channel = await start_server(
        backend, watch_heartbeat_seconds=HEARTBEAT_SECONDS, watch_buffer_revisions=BUFFER_REVISIONS
    )
    try:
        yield Harness(app, channel, backend.name)
    finally:
        await channel.close()
        await app.stop(grace=0)


async def revision_of(call: Any) -> int:
    """The revision a finished write answered."""
    await call
    return int(dict(await call.trailing_metadata() or ())[REVISION])


async def register(harness: Harness, secret: str, env_id: str, resource_id: str) -> int:
    """Registers an inbox; the revision it committed."""
    return await revision_of(
        harness.resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(kind=INBOX, resource_id=resource_id),
            metadata=auth(secret, env_id),
        )
    )


def registered(watcher: Watcher) -> list[str]:
    """The resource ids of the REGISTERED events received, in order."""
    return [e.scoped_resource.resource_id for e in watcher.events if e.action == Event.REGISTERED]


async def test_live_writes_arrive_in_revision_order(harness: Harness, org: Org) -> None:
    watcher = Watcher(harness.channel, org.owner_secret)
    try:
        start = await watcher.live()
        assert start == 1  # CreateOrganization committed revision 1
        env = await harness.new_environment(org, "Live")
        revisions = [await register(harness, org.owner_secret, env.id, f"live-{index}") for index in range(3)]
        assert revisions == [3, 4, 5]
        await watcher.reached(5)
        with_events = [message for message in watcher.messages if message.events]
        assert [message.revision for message in with_events] == [2, 3, 4, 5]
        assert [e.revision for e in watcher.events] == [2, 3, 4, 5]
        assert watcher.events[0].environment.id == env.id
        assert registered(watcher) == ["live-0", "live-1", "live-2"]
    finally:
        await watcher.close()


async def test_a_watch_from_a_revision_replays_the_log_then_goes_live(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Replay")
    for index in range(3):
        await register(harness, org.owner_secret, env.id, f"old-{index}")
    watcher = Watcher(harness.channel, org.owner_secret, after_revision=3)
    try:
        assert await watcher.live() == 5
        assert registered(watcher) == ["old-1", "old-2"]
        await register(harness, org.owner_secret, env.id, "new")
        await watcher.reached(6)
        assert registered(watcher) == ["old-1", "old-2", "new"]
        # Only the types asked for.
        only_envs = Watcher(
            harness.channel, org.owner_secret, after_revision=1, resource_types=[Event.ENVIRONMENT]
        )
        await only_envs.live()
        assert [(e.action, e.resource_id) for e in only_envs.events] == [(Event.CREATED, env.id)]
        await only_envs.close()
    finally:
        await watcher.close()


async def test_resuming_under_writes_loses_and_repeats_nothing(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Busy")
    names = [f"busy-{index}" for index in range(40)]
    last_revision = 0

    async def write() -> None:
        nonlocal last_revision
        for name in names:
            last_revision = await register(harness, org.owner_secret, env.id, name)
            await asyncio.sleep(0.01)

    async def watch_a_little(resume_from: int, wanted: int) -> Watcher:
        """A consumer that reads about `wanted` events from `resume_from`, then disconnects."""
        watcher = Watcher(harness.channel, org.owner_secret, after_revision=resume_from)
        try:
            await watcher.until(
                lambda: len(watcher.events) >= wanted or (writer.done() and watcher.revision >= last_revision)
            )
        finally:
            await watcher.close()
        return watcher

    writer = asyncio.ensure_future(write())
    received: list[str] = []
    resume_from = 2  # the environment's creation
    disconnects_under_writes = 0
    try:
        while not (writer.done() and resume_from >= last_revision):
            writing = not writer.done()
            watcher = await watch_a_little(resume_from, 3)
            disconnects_under_writes += writing and not writer.done()
            revisions = [message.revision for message in watcher.messages]
            assert revisions == sorted(revisions)
            received += [e.scoped_resource.resource_id for e in watcher.events]
            resume_from = watcher.revision or resume_from
        assert disconnects_under_writes >= 2
        assert received == names  # in commit order, none lost, none twice
    finally:
        await writer


async def test_heartbeats_carry_the_revision_reached(quick: Harness) -> None:
    org = await quick.new_org()
    env = await quick.new_environment(org, "Quiet")
    _, secret = await quick.new_key(org, ["events:read", "inboxes:read"], [env.id])
    watcher = Watcher(quick.channel, secret)
    try:
        start = await watcher.live()
        await watcher.until(lambda: len(watcher.messages) >= 3)
        assert all(not m.events and m.revision == start for m in watcher.messages[:3])
        # A write the key may not see is not sent, but heartbeats move past it.
        hidden = await revision_of(
            quick.environments.CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name="Hidden"),
                metadata=auth(org.owner_secret),
            )
        )
        await watcher.reached(hidden)
        assert watcher.events == []
    finally:
        await watcher.close()


async def test_bad_watch_requests_get_clear_codes(harness: Harness, org: Org) -> None:
    async def first(secret: str, **fields: Any) -> Any:
        stub = event_pb2_grpc.EventServiceStub(harness.channel)
        async for message in stub.WatchEvents(event_pb2.WatchEventsRequest(**fields), metadata=auth(secret)):
            return message
        return None

    await fails(
        first(org.owner_secret, after_revision=-1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REVISION"
    )
    await fails(
        first(org.owner_secret, after_revision=10**9), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REVISION"
    )
    failure = await fails(first(org.owner_secret, resource_types=[0]), grpc.StatusCode.INVALID_ARGUMENT)
    assert "resource_types[0]" in failure.violations
    await fails(first(org.owner_secret, resource_types=[42]), grpc.StatusCode.INVALID_ARGUMENT)
    _, no_scope = await harness.new_key(org, ["inboxes:read"])
    failure = await fails(first(no_scope), grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")
    assert failure.trailers.get("x-request-id")
    await fails(first("ap_sk_live_malformed"), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MALFORMED")


async def test_retention_prunes_old_revisions_and_an_expired_revision_is_refused(
    harness: Harness, org: Org
) -> None:
    env = await harness.new_environment(org, "Old")
    for index in range(3):
        await register(harness, org.owner_secret, env.id, f"aged-{index}")  # revisions 3, 4, 5
    # Revisions 1 to 4 happened long ago: older than the retention period.
    async with harness.app.engine.begin() as connection:
        await connection.execute(
            update(EventRow)
            .where(EventRow.organization_id == org.id, EventRow.revision <= 4)
            .values(create_time=datetime.now(UTC) - timedelta(days=400))
        )
    assert await harness.app.retention.prune() >= 6
    async with harness.app.engine.connect() as connection:
        oldest = await connection.scalar(
            select(func.min(EventRow.revision)).where(EventRow.organization_id == org.id)
        )
    assert oldest == 5

    stub = event_pb2_grpc.EventServiceStub(harness.channel)
    listed = await stub.ListEvents(event_pb2.ListEventsRequest(), metadata=auth(org.owner_secret))
    assert [e.revision for e in listed.events] == [5]

    async def first(after: int) -> Any:
        async for message in stub.WatchEvents(
            event_pb2.WatchEventsRequest(after_revision=after), metadata=auth(org.owner_secret)
        ):
            return message
        return None

    failure = await fails(first(3), grpc.StatusCode.FAILED_PRECONDITION, "REVISION_EXPIRED")
    assert failure.metadata == {"oldestRevision": "4"}
    message = await first(4)  # the oldest revision one may still resume from
    assert [e.scoped_resource.resource_id for e in message.events] == ["aged-2"]
    assert (await first(0)).revision == 5


async def test_a_slow_consumer_is_cut_off_and_resumes_from_its_revision(
    quick: Harness, backend: Backend
) -> None:
    org = await quick.new_org()
    env_a = await quick.new_environment(org, "A")
    env_b = await quick.new_environment(org, "B")
    for index in range(40):
        start = await revision_of(
            quick.resources.RegisterResource(
                resource_pb2.RegisterResourceRequest(
                    kind=INBOX, resource_id=f"heavy-{index}", display_name="x" * 150
                ),
                metadata=auth(org.owner_secret, env_a.id),
            )
        )
    # A consumer that does not read, on a connection whose flow-control window stays small.
    slow_channel = grpc.aio.insecure_channel(
        quick.address, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    )
    try:
        call = event_pb2_grpc.EventServiceStub(slow_channel).WatchEvents(
            event_pb2.WatchEventsRequest(after_revision=start), metadata=auth(org.owner_secret)
        )
        moves = 12
        for index in range(moves):  # each revision moves 40 resources: 40 events
            source, target = (env_a, env_b) if index % 2 == 0 else (env_b, env_a)
            last = await revision_of(
                quick.resources.ReassignResources(
                    resource_pb2.ReassignResourcesRequest(
                        from_environment_id=source.id, to_environment_id=target.id
                    ),
                    metadata=auth(org.owner_secret),
                )
            )
        seen: list[int] = []
        failure = None
        try:
            async for message in call:
                seen += [e.revision for e in message.events]
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
        assert failure is not None and failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert failure.reason == "WATCH_BUFFER_OVERFLOW"
        reached = int(failure.trailers[REVISION])
        assert failure.metadata == {"revision": str(reached)}
        assert reached < last
        resumed = Watcher(quick.channel, org.owner_secret, after_revision=reached)
        await resumed.reached(last)
        await resumed.close()
        seen += [e.revision for e in resumed.events]
        # Every moved resource once per revision, across both streams.
        assert sorted(set(seen)) == list(range(start + 1, last + 1))
        assert all(seen.count(revision) == 40 for revision in set(seen))
    finally:
        await slow_channel.close()


async def test_revoking_the_key_ends_its_stream(harness: Harness, org: Org) -> None:
    key, secret = await harness.new_key(org, ["events:read", "inboxes:read"])
    watcher = Watcher(harness.channel, secret)
    await watcher.live()
    await harness.api_keys.RevokeApiKey(
        key_pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
    )
    failure = await watcher.ended_with()
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
    assert failure.trailers.get(REVISION)


async def test_removing_the_keys_owner_ends_its_stream(harness: Harness, org: Org) -> None:
    member = await harness.new_member(org, "ADMIN")
    _, secret = await harness.new_key(org, ["events:read"], owner_member_id=member.id)
    watcher = Watcher(harness.channel, secret)
    await watcher.live()
    await harness.members.DeleteMember(
        member_pb2.DeleteMemberRequest(id=member.id), metadata=auth(org.owner_secret)
    )
    failure = await watcher.ended_with()
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_OWNER_REMOVED")


async def test_an_expiring_key_ends_its_stream_at_a_heartbeat(quick: Harness) -> None:
    org = await quick.new_org()
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(seconds=1.5))
    created = await quick.api_keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(name="short", scopes=["events:read"], expire_time=expire),
        metadata=auth(org.owner_secret),
    )
    watcher = Watcher(quick.channel, created.secret)
    await watcher.live()
    failure = await watcher.ended_with()
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_EXPIRED")


async def test_a_shrunken_reach_stops_what_left_it(harness: Harness, org: Org) -> None:
    env_a = await harness.new_environment(org, "Kept")
    env_b = await harness.new_environment(org, "Lost")
    key, secret = await harness.new_key(org, ["events:read", "inboxes:read"], [env_a.id, env_b.id])
    watcher = Watcher(harness.channel, secret)
    try:
        await watcher.live()
        await register(harness, org.owner_secret, env_b.id, "b-before")
        await harness.api_keys.UpdateApiKey(
            key_pb.UpdateApiKeyRequest(
                api_key=key_pb.ApiKey(id=key.id, environment_ids=[env_a.id]),
                update_mask=field_mask_pb2.FieldMask(paths=["environment_ids"]),
            ),
            metadata=auth(org.owner_secret),
        )
        await register(harness, org.owner_secret, env_b.id, "b-after")
        last = await register(harness, org.owner_secret, env_a.id, "a-after")
        await watcher.reached(last)
        assert registered(watcher) == ["b-before", "a-after"]
        assert not watcher.ended
    finally:
        await watcher.close()


async def test_a_watch_on_one_replica_sees_writes_on_another(
    harness: Harness, backend: Backend, org: Org
) -> None:
    app_b, channel_b = await start_server(backend)
    watcher = Watcher(channel_b, org.owner_secret)
    try:
        await watcher.live()
        delays = []
        for index in range(5):
            started = time.monotonic()
            revision = await register(
                harness, org.owner_secret, org.default_environment.id, f"remote-{index}"
            )
            await watcher.reached(revision)
            delays.append(time.monotonic() - started)
        assert registered(watcher) == [f"remote-{index}" for index in range(5)]
        print(f"\n[{backend.name}] write on A to watcher on B: max {max(delays) * 1000:.0f} ms")
    finally:
        await watcher.close()
        await channel_b.close()
        await app_b.stop(grace=0)


async def test_shutdown_ends_streams_with_the_revision_to_resume_from(
    harness: Harness, backend: Backend
) -> None:
    app_b, channel_b = await start_server(backend)
    org = await Harness(app_b, channel_b, backend.name).new_org()
    watcher = Watcher(channel_b, org.owner_secret)
    try:
        await watcher.live()
        revision = await register(harness, org.owner_secret, org.default_environment.id, "before-stop")
        await watcher.reached(revision)
        stopping = asyncio.ensure_future(app_b.stop(grace=5))
        failure = await watcher.ended_with()
        assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
        assert failure.trailers[REVISION] == str(revision)
        assert failure.metadata == {"revision": str(revision)}
        started = time.monotonic()
        await stopping
        assert time.monotonic() - started < 4, "the stream held the shutdown for its whole grace"
    finally:
        await channel_b.close()
    # Resuming elsewhere from that revision misses nothing written meanwhile.
    after = await register(harness, org.owner_secret, org.default_environment.id, "after-stop")
    resumed = Watcher(harness.channel, org.owner_secret, after_revision=revision)
    await resumed.reached(after)
    await resumed.close()
    assert registered(resumed) == ["after-stop"]
