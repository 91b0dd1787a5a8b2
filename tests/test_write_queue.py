"""One organization's writers in a process take turns, and overlap only where the database orders
them: on PostgreSQL the next writer begins while the one before it commits, and waits in its
first statement for the revision row lock. Listeners (this replica's cache) must still hear each
organization's writes in revision order, with no revision missing."""

from __future__ import annotations

import asyncio
import random

import grpc
from agentpost.environments.v1 import environment_pb2, resource_pb2
from sqlalchemy import select

from service.storage.database import _WriteQueue
from service.storage.tables import ResourceRow
from tests.harness import Harness, Org, auth, failure_of

WRITERS = 60


async def test_listeners_hear_overlapping_writes_in_revision_order(harness: Harness, org: Org) -> None:
    database = harness.app.database
    heard: list[int] = []
    database.on_commit(
        lambda organization, revision, _events: heard.append(revision) if organization == org.id else None
    )
    committed: list[int] = []

    async def write() -> None:
        async with database.write(org.id) as uow:
            await asyncio.sleep(random.random() / 1000)
            assert uow.organization_id == org.id
        committed.append(1)

    async with harness.app.engine.connect():  # the pool is warm: writers overlap from the start
        pass
    first = harness.app.access.revision(org.id) or 0
    await asyncio.gather(*(write() for _ in range(WRITERS)))
    assert len(committed) == WRITERS
    assert heard == sorted(heard), heard
    assert heard[-WRITERS:] == list(range(heard[-WRITERS], heard[-WRITERS] + WRITERS)), heard
    assert heard[-1] >= first + WRITERS


async def test_a_writer_tells_its_listeners_only_after_the_one_before() -> None:
    queue = _WriteQueue()
    first = await queue.take()
    first.let_go()  # as its COMMIT is sent
    second = await asyncio.wait_for(queue.take(), 1.0)  # the next writer begins meanwhile
    second.let_go()
    waiting = asyncio.ensure_future(second.after_the_one_before())
    await asyncio.sleep(0.02)
    assert not waiting.done(), "the second writer went ahead of the first's listeners"
    first.end()
    await asyncio.wait_for(waiting, 1.0)

    # A writer whose call is cancelled while it waits leaves the turn to the next one.
    third = await asyncio.wait_for(queue.take(), 1.0)
    third.let_go()
    fourth = await asyncio.wait_for(queue.take(), 1.0)
    fourth.let_go()
    cancelled = asyncio.ensure_future(third.after_the_one_before())
    await asyncio.sleep(0.01)
    cancelled.cancel()
    third.end()
    second.end()
    await asyncio.wait_for(fourth.after_the_one_before(), 1.0)
    assert cancelled.cancelled()
    fourth.end()
    # let_go and end are safe to repeat; the queue is free again.
    fourth.let_go()
    await asyncio.wait_for(queue.take(), 1.0)


async def test_the_next_writer_begins_early_only_while_the_pool_has_room(harness: Harness) -> None:
    """A writer waiting for a row lock holds a pooled connection: it may take one only while the
    pool has one to spare, so that a busy pool serves other organizations first."""
    database = harness.app.database
    pool = harness.app.engine.sync_engine.pool
    # The server is shared with earlier tests: work they left running may hold connections.
    for _ in range(100):
        if pool.checkedout() < pool.size():  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.05)
    queue = _WriteQueue()
    turn = await queue.take()
    assert pool.checkedout() < pool.size()  # type: ignore[attr-defined]
    database._ending(turn)()
    assert not queue._lock.locked(), "the pool had room: the next writer should be let in"
    turn.end()

    turn = await queue.take()
    held = [await harness.app.engine.connect() for _ in range(pool.size() - pool.checkedout())]  # type: ignore[attr-defined]
    try:
        database._ending(turn)()
        assert queue._lock.locked(), "the pool is full: the next writer must wait for the commit"
    finally:
        for connection in held:
            await connection.close()
        turn.end()
    assert not queue._lock.locked()


async def test_a_delete_racing_registrations_is_ordered_by_revision(harness: Harness, org: Org) -> None:
    """Registrations race a DeleteEnvironment of their environment on one replica, writes of one
    organization overlapping as they do on PostgreSQL: every registration acknowledged has a
    revision before the delete's, every one after it is refused ENVIRONMENT_DELETED, and no
    registration outlives the delete in the database."""
    env = await harness.new_environment(org, "Doomed")
    answers: list[tuple[str, int | str]] = []

    async def register(number: int) -> None:
        await asyncio.sleep(random.random() / 50)
        call = harness.resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(
                kind=resource_pb2.ScopedResource.INBOX, resource_id=f"race-{number}"
            ),
            metadata=auth(org.owner_secret, env.id),
        )
        try:
            await call
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            assert (failure.code, failure.reason) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "ENVIRONMENT_DELETED",
            )
            answers.append((f"race-{number}", failure.reason))
            return
        trailers = dict(await call.trailing_metadata() or ())
        answers.append((f"race-{number}", int(trailers["x-agentpost-revision"])))

    async def delete() -> int:
        await asyncio.sleep(0.01)
        call = harness.environments.DeleteEnvironment(
            environment_pb2.DeleteEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
        )
        await call
        return int(dict(await call.trailing_metadata() or ())["x-agentpost-revision"])

    deleted_at, *_ = await asyncio.gather(delete(), *(register(number) for number in range(80)))
    assert isinstance(deleted_at, int)
    registered = {name: revision for name, revision in answers if isinstance(revision, int)}
    assert registered and len(registered) < 80, "the race did not overlap the delete; nothing was tested"
    assert all(revision < deleted_at for revision in registered.values()), (deleted_at, registered)
    async with harness.app.engine.connect() as connection:
        stored = set(
            await connection.scalars(
                select(ResourceRow.resource_id).where(
                    ResourceRow.organization_id == org.id, ResourceRow.environment_id == env.id
                )
            )
        )
    assert stored == set(registered)
