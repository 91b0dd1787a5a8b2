"""ResourceService end to end: registration in the environment context, reads confined to it,
per-kind scopes, pagination, deletion semantics, orphans and reassignment."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import environment_pb2
from agentpost.environments.v1 import resource_pb2 as pb
from sqlalchemy import func, select, text, update

from service.storage.tables import EnvironmentRow, EventRow, OrganizationRow, ResourceRow
from tests.harness import Harness, Org, auth, fails

Code = grpc.StatusCode
Kind = pb.ScopedResource.Kind
INBOX, MESSAGE, LABEL, DOMAIN = (
    pb.ScopedResource.INBOX,
    pb.ScopedResource.MESSAGE,
    pb.ScopedResource.LABEL,
    pb.ScopedResource.DOMAIN,
)


async def register(
    harness: Harness,
    secret: str,
    kind: pb.ScopedResource.Kind,
    resource_id: str,
    environment: str | None = None,
    display_name: str = "",
    request_id: str = "",
) -> pb.ScopedResource:
    """Registers a resource as `secret` in `environment` (the key's default context when None)."""
    resource: pb.ScopedResource = await harness.resources.RegisterResource(
        pb.RegisterResourceRequest(
            kind=kind, resource_id=resource_id, display_name=display_name, request_id=request_id
        ),
        metadata=auth(secret, environment),
    )
    return resource


async def listed(
    harness: Harness,
    secret: str,
    environment: str | None,
    kind: pb.ScopedResource.Kind = Kind.KIND_UNSPECIFIED,
) -> list[tuple[int, str]]:
    """Every (kind, resource_id) ListResources returns in the context, following page tokens."""
    found: list[tuple[int, str]] = []
    token = ""
    while True:
        page = await harness.resources.ListResources(
            pb.ListResourcesRequest(kind=kind, page_size=2, page_token=token),
            metadata=auth(secret, environment),
        )
        found += [(item.kind, item.resource_id) for item in page.resources]
        token = page.next_page_token
        if not token:
            return found


async def orphans(harness: Harness, secret: str, environment_id: str) -> list[tuple[int, str]]:
    """Every (kind, resource_id) ListOrphanedResources returns, following page tokens."""
    found: list[tuple[int, str]] = []
    token = ""
    while True:
        page = await harness.resources.ListOrphanedResources(
            pb.ListOrphanedResourcesRequest(environment_id=environment_id, page_size=2, page_token=token),
            metadata=auth(secret),
        )
        found += [(item.kind, item.resource_id) for item in page.resources]
        token = page.next_page_token
        if not token:
            return found


async def test_register_defaults_to_the_default_environment_and_get_returns_it(
    harness: Harness, org: Org
) -> None:
    created = await register(harness, org.owner_secret, INBOX, "inbox_1", display_name="Support inbox")
    assert created.kind == INBOX
    assert created.resource_id == "inbox_1"
    assert created.organization_id == org.id
    assert created.environment_id == org.default_environment.id
    assert created.display_name == "Support inbox"
    assert created.create_time == created.update_time and created.create_time.seconds > 0
    got = await harness.resources.GetResource(
        pb.GetResourceRequest(kind=INBOX, resource_id="inbox_1"), metadata=auth(org.owner_secret)
    )
    assert got == created


async def test_the_context_header_takes_an_id_or_a_slug(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    by_slug = await register(harness, org.owner_secret, LABEL, "lbl.a", environment="staging")
    by_id = await register(harness, org.owner_secret, LABEL, "lbl.b", environment=staging.id)
    assert by_slug.environment_id == by_id.environment_id == staging.id
    assert await listed(harness, org.owner_secret, "staging") == [(LABEL, "lbl.a"), (LABEL, "lbl.b")]
    assert await listed(harness, org.owner_secret, None) == []


async def test_a_resource_of_another_environment_is_not_found_like_a_random_id(
    harness: Harness, org: Org
) -> None:
    staging = await harness.new_environment(org, "Staging")
    await register(harness, org.owner_secret, INBOX, "shared-name", environment=staging.id)
    failures = []
    for resource_id in ("shared-name", "never-registered"):
        for call in (harness.resources.GetResource, harness.resources.DeregisterResource):
            failure = await fails(
                call(
                    pb.GetResourceRequest(kind=INBOX, resource_id=resource_id)
                    if call is harness.resources.GetResource
                    else pb.DeregisterResourceRequest(kind=INBOX, resource_id=resource_id),
                    metadata=auth(org.owner_secret),
                ),
                Code.NOT_FOUND,
                "RESOURCE_NOT_FOUND",
            )
            failures.append(failure.message.replace(resource_id, "<id>"))
    assert len(set(failures)) == 1
    # Deregistering from the wrong context left it in place.
    still = await harness.resources.GetResource(
        pb.GetResourceRequest(kind=INBOX, resource_id="shared-name"),
        metadata=auth(org.owner_secret, "staging"),
    )
    assert still.environment_id == staging.id


async def test_resource_ids_are_unique_per_org_and_kind_across_environments(
    harness: Harness, org: Org
) -> None:
    staging = await harness.new_environment(org, "Staging")
    await register(harness, org.owner_secret, INBOX, "inb-1", environment=staging.id)
    failure = await fails(
        register(harness, org.owner_secret, INBOX, "inb-1"), Code.ALREADY_EXISTS, "RESOURCE_EXISTS"
    )
    assert staging.id not in failure.message and "staging" not in failure.message.lower()
    assert not failure.metadata
    # Another kind, or another organization, may use the same id.
    other_kind = await register(harness, org.owner_secret, MESSAGE, "inb-1")
    assert other_kind.environment_id == org.default_environment.id
    other = await harness.new_org("Other")
    theirs = await register(harness, other.owner_secret, INBOX, "inb-1")
    assert theirs.organization_id == other.id


async def test_concurrent_registrations_of_one_id_create_exactly_one(harness: Harness, org: Org) -> None:
    outcomes = await asyncio.gather(
        *(register(harness, org.owner_secret, DOMAIN, "example.com") for _ in range(6)),
        return_exceptions=True,
    )
    created = [item for item in outcomes if isinstance(item, pb.ScopedResource)]
    refused = [item for item in outcomes if isinstance(item, grpc.aio.AioRpcError)]
    assert len(created) == 1 and len(refused) == 5
    assert {error.code() for error in refused} == {Code.ALREADY_EXISTS}


async def test_request_id_makes_register_safe_to_retry(harness: Harness, org: Org) -> None:
    request_id = str(uuid.uuid4())
    first = await register(
        harness, org.owner_secret, THREAD := pb.ScopedResource.THREAD, "t-1", request_id=request_id
    )
    again = await register(harness, org.owner_secret, THREAD, "t-1", request_id=request_id)
    assert again == first
    failure = await fails(
        register(harness, org.owner_secret, THREAD, "t-2", request_id=request_id),
        Code.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert "request_id" in failure.violations
    # Without a request id a second registration is a clash, not a retry.
    await fails(register(harness, org.owner_secret, THREAD, "t-1"), Code.ALREADY_EXISTS, "RESOURCE_EXISTS")
    # A retry after the resource left the context finds nothing there.
    await harness.resources.DeregisterResource(
        pb.DeregisterResourceRequest(kind=THREAD, resource_id="t-1"), metadata=auth(org.owner_secret)
    )
    await fails(
        register(harness, org.owner_secret, THREAD, "t-1", request_id=request_id),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )


async def test_concurrent_retries_with_one_request_id_register_once(harness: Harness, org: Org) -> None:
    request_id = str(uuid.uuid4())
    results = await asyncio.gather(
        *(
            register(harness, org.owner_secret, DOMAIN, "retry.example", request_id=request_id)
            for _ in range(5)
        )
    )
    assert all(item == results[0] for item in results)


@pytest.mark.parametrize(
    ("kind", "resource_id", "display_name", "request_id", "field"),
    [
        (0, "ok", "", "", "kind"),
        (99, "ok", "", "", "kind"),
        (INBOX, "", "", "", "resource_id"),
        (INBOX, "has space", "", "", "resource_id"),
        (INBOX, "slash/no", "", "", "resource_id"),
        (INBOX, "x" * 129, "", "", "resource_id"),
        (INBOX, "ok", "d" * 201, "", "display_name"),
        (INBOX, "ok", "bell\x07", "", "display_name"),
        (INBOX, "ok", " padded", "", "display_name"),
        (INBOX, "ok", "", "not-a-uuid", "request_id"),
    ],
)
async def test_register_rejects_bad_input(
    harness: Harness,
    org: Org,
    kind: pb.ScopedResource.Kind,
    resource_id: str,
    display_name: str,
    request_id: str,
    field: str,
) -> None:
    failure = await fails(
        register(
            harness, org.owner_secret, kind, resource_id, display_name=display_name, request_id=request_id
        ),
        Code.INVALID_ARGUMENT,
    )
    assert field in failure.violations


async def test_longest_resource_id_and_every_allowed_character_are_accepted(
    harness: Harness, org: Org
) -> None:
    long_id = ("Az09_.:-" * 16)[:128]
    created = await register(harness, org.owner_secret, INBOX, long_id, display_name="ü" * 200)
    assert created.resource_id == long_id


async def test_get_and_deregister_need_a_kind_and_an_id(harness: Harness, org: Org) -> None:
    for request, call in (
        (pb.GetResourceRequest(resource_id="x"), harness.resources.GetResource),
        (pb.DeregisterResourceRequest(resource_id="x"), harness.resources.DeregisterResource),
    ):
        failure = await fails(call(request, metadata=auth(org.owner_secret)), Code.INVALID_ARGUMENT)
        assert "kind" in failure.violations
    failure = await fails(
        harness.resources.GetResource(pb.GetResourceRequest(kind=INBOX), metadata=auth(org.owner_secret)),
        Code.INVALID_ARGUMENT,
    )
    assert "resource_id" in failure.violations


async def test_deregister_removes_and_frees_the_id(harness: Harness, org: Org) -> None:
    await register(harness, org.owner_secret, INBOX, "gone")
    result = await harness.resources.DeregisterResource(
        pb.DeregisterResourceRequest(kind=INBOX, resource_id="gone"), metadata=auth(org.owner_secret)
    )
    assert result.ByteSize() == 0
    await fails(
        harness.resources.GetResource(
            pb.GetResourceRequest(kind=INBOX, resource_id="gone"), metadata=auth(org.owner_secret)
        ),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    await fails(
        harness.resources.DeregisterResource(
            pb.DeregisterResourceRequest(kind=INBOX, resource_id="gone"), metadata=auth(org.owner_secret)
        ),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    staging = await harness.new_environment(org, "Staging")
    again = await register(harness, org.owner_secret, INBOX, "gone", environment=staging.id)
    assert again.environment_id == staging.id


async def test_list_orders_by_kind_then_id_and_pages_through_everything(harness: Harness, org: Org) -> None:
    wanted = [(LABEL, "b"), (INBOX, "z"), (INBOX, "a"), (MESSAGE, "m-2"), (MESSAGE, "m-1"), (DOMAIN, "d")]
    for kind, resource_id in wanted:
        await register(harness, org.owner_secret, kind, resource_id)
    name = pb.ScopedResource.Kind.Name
    expected = sorted(wanted, key=lambda item: (name(item[0]), item[1]))
    assert await listed(harness, org.owner_secret, None) == expected
    assert await listed(harness, org.owner_secret, None, INBOX) == [(INBOX, "a"), (INBOX, "z")]
    one_page = await harness.resources.ListResources(
        pb.ListResourcesRequest(page_size=1000), metadata=auth(org.owner_secret)
    )
    assert len(one_page.resources) == len(wanted) and not one_page.next_page_token


async def test_page_tokens_are_bound_to_the_query(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    for resource_id in ("a", "b", "c"):
        await register(harness, org.owner_secret, INBOX, resource_id)
        await register(harness, org.owner_secret, INBOX, f"s-{resource_id}", environment=staging.id)
    first = await harness.resources.ListResources(
        pb.ListResourcesRequest(kind=INBOX, page_size=1), metadata=auth(org.owner_secret)
    )
    assert first.next_page_token
    for request, environment in (
        (
            pb.ListResourcesRequest(
                kind=Kind.KIND_UNSPECIFIED, page_size=1, page_token=first.next_page_token
            ),
            None,
        ),
        (pb.ListResourcesRequest(kind=INBOX, page_size=1, page_token=first.next_page_token), staging.id),
        (pb.ListResourcesRequest(kind=INBOX, page_size=1, page_token="garbage"), None),
    ):
        await fails(
            harness.resources.ListResources(request, metadata=auth(org.owner_secret, environment)),
            Code.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        )
    failure = await fails(
        harness.resources.ListResources(
            pb.ListResourcesRequest(page_size=-1), metadata=auth(org.owner_secret)
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "page_size" in failure.violations
    await fails(
        harness.resources.ListResources(
            pb.ListResourcesRequest(kind=42),  # type: ignore[arg-type]  # no such kind, on purpose
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
    )


async def test_a_registration_reads_its_environment_in_the_same_statement(harness: Harness, org: Org) -> None:
    """A delete this replica has not heard of (its view still shows the environment active)
    wins: the registration is refused and nothing is registered. The delete is written straight
    to the database, without a revision, so no notification or poll can tell the replica."""
    staging = await harness.new_environment(org, "Staging")
    await register(harness, org.owner_secret, INBOX, "before", environment=staging.id)

    async def mark_deleted(deleted: bool) -> None:
        async with harness.app.engine.begin() as connection:
            await connection.execute(
                update(EnvironmentRow)
                .where(EnvironmentRow.id == staging.id)
                .values(delete_time=datetime.now(UTC) if deleted else None)
            )

    await mark_deleted(True)
    shown = await harness.environments.GetEnvironment(
        environment_pb2.GetEnvironmentRequest(id=staging.id), metadata=auth(org.owner_secret)
    )
    assert shown.state == environment_pb2.Environment.ACTIVE  # the replica's view is behind
    await fails(
        register(harness, org.owner_secret, INBOX, "during", environment=staging.id),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_DELETED",
    )
    await mark_deleted(False)
    await fails(
        harness.resources.GetResource(
            pb.GetResourceRequest(kind=INBOX, resource_id="during"),
            metadata=auth(org.owner_secret, staging.id),
        ),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    registered = await register(harness, org.owner_secret, INBOX, "during", environment=staging.id)
    assert registered.environment_id == staging.id


async def test_a_delete_committed_while_a_registration_waits_for_the_lock_wins(
    harness: Harness, org: Org
) -> None:
    """A registration that waits for the organization's write lock, while a delete it cannot
    see holds it, reads the environment as the delete left it: refused, and nothing of it is
    written (no registration, no event, no revision). On PostgreSQL the registration is one
    statement whose snapshot predates the delete's commit; the lock is the organization's
    revision row. On SQLite it is the file's write lock. The delete is written straight to the
    database, so the replica's own view still shows the environment active."""
    staging = await harness.new_environment(org, "Staging")
    engine = harness.app.engine
    postgres = engine.dialect.name == "postgresql"

    async def revision() -> int:
        async with engine.connect() as connection:
            found = await connection.scalar(
                select(OrganizationRow.revision).where(OrganizationRow.id == org.id)
            )
        return int(found or 0)

    async def waiting_for_a_lock() -> bool:
        if not postgres:
            return True  # SQLite's writer waits in the service's own sleep: nothing to see
        async with engine.connect() as connection:
            waiting = await connection.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            )
        return bool(waiting)

    before = await revision()
    async with engine.connect() as holder:
        transaction = await holder.begin()
        if postgres:
            await holder.execute(
                select(OrganizationRow.id).where(OrganizationRow.id == org.id).with_for_update()
            )
        await holder.execute(
            update(EnvironmentRow)
            .where(EnvironmentRow.id == staging.id)
            .values(delete_time=datetime.now(UTC))
        )
        call = asyncio.ensure_future(
            register(harness, org.owner_secret, INBOX, "waiting", environment=staging.id)
        )
        for _ in range(100):
            await asyncio.sleep(0.05)
            if await waiting_for_a_lock():
                break
        else:
            pytest.fail("the registration never waited for the lock")
        await asyncio.sleep(0.1)
        assert not call.done()
        await transaction.commit()
    await fails(call, Code.FAILED_PRECONDITION, "ENVIRONMENT_DELETED")
    async with engine.connect() as connection:
        registered = await connection.scalar(
            select(func.count()).select_from(ResourceRow).where(ResourceRow.resource_id == "waiting")
        )
        logged = await connection.scalar(
            select(func.count()).select_from(EventRow).where(EventRow.resource_id.like("%waiting%"))
        )
    assert (registered, logged) == (0, 0)
    assert await revision() == before


async def test_deleting_an_environment_hides_its_resources_until_undeleted(
    harness: Harness, org: Org
) -> None:
    staging = await harness.new_environment(org, "Staging")
    await register(harness, org.owner_secret, INBOX, "i-1", environment=staging.id)
    await register(harness, org.owner_secret, LABEL, "l-1", environment=staging.id)
    await fails(
        harness.resources.ListOrphanedResources(
            pb.ListOrphanedResourcesRequest(environment_id=staging.id), metadata=auth(org.owner_secret)
        ),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_NOT_DELETED",
    )
    await harness.delete_environment(org.owner_secret, staging.id)
    # Even the organization-wide owner key cannot act in it.
    for environment in (staging.id, "staging"):
        await fails(
            harness.resources.ListResources(
                pb.ListResourcesRequest(), metadata=auth(org.owner_secret, environment)
            ),
            Code.FAILED_PRECONDITION,
            "ENVIRONMENT_DELETED",
        )
        await fails(
            harness.resources.GetResource(
                pb.GetResourceRequest(kind=INBOX, resource_id="i-1"),
                metadata=auth(org.owner_secret, environment),
            ),
            Code.FAILED_PRECONDITION,
            "ENVIRONMENT_DELETED",
        )
    await fails(
        register(harness, org.owner_secret, INBOX, "i-2", environment=staging.id),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_DELETED",
    )
    await fails(
        harness.resources.GetResource(
            pb.GetResourceRequest(kind=INBOX, resource_id="i-1"), metadata=auth(org.owner_secret)
        ),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    assert await orphans(harness, org.owner_secret, staging.id) == [(INBOX, "i-1"), (LABEL, "l-1")]
    await harness.environments.UndeleteEnvironment(
        environment_pb2.UndeleteEnvironmentRequest(id=staging.id), metadata=auth(org.owner_secret)
    )
    assert await listed(harness, org.owner_secret, staging.id) == [(INBOX, "i-1"), (LABEL, "l-1")]


async def test_reassign_all_moves_orphans_to_the_target_only(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    target = await harness.new_environment(org, "Target")
    for kind, resource_id in ((INBOX, "i-1"), (INBOX, "i-2"), (MESSAGE, "m-1")):
        await register(harness, org.owner_secret, kind, resource_id, environment=staging.id)
    before = await harness.resources.GetResource(
        pb.GetResourceRequest(kind=INBOX, resource_id="i-1"), metadata=auth(org.owner_secret, staging.id)
    )
    await harness.delete_environment(org.owner_secret, staging.id)
    response = await harness.resources.ReassignResources(
        pb.ReassignResourcesRequest(from_environment_id=staging.id, to_environment_id=target.id),
        metadata=auth(org.owner_secret),
    )
    assert response.moved_count == 3
    assert await orphans(harness, org.owner_secret, staging.id) == []
    assert await listed(harness, org.owner_secret, target.id) == [
        (INBOX, "i-1"),
        (INBOX, "i-2"),
        (MESSAGE, "m-1"),
    ]
    assert await listed(harness, org.owner_secret, None) == []
    moved = await harness.resources.GetResource(
        pb.GetResourceRequest(kind=INBOX, resource_id="i-1"), metadata=auth(org.owner_secret, target.id)
    )
    assert moved.environment_id == target.id
    assert moved.create_time == before.create_time
    assert moved.update_time.ToNanoseconds() > before.update_time.ToNanoseconds()
    # Undeleting the source does not bring them back there.
    await harness.environments.UndeleteEnvironment(
        environment_pb2.UndeleteEnvironmentRequest(id=staging.id), metadata=auth(org.owner_secret)
    )
    assert await listed(harness, org.owner_secret, staging.id) == []


async def test_reassign_a_listed_subset_is_all_or_nothing(harness: Harness, org: Org) -> None:
    source = await harness.new_environment(org, "Source")
    target = await harness.new_environment(org, "Target")
    for resource_id in ("a", "b", "c"):
        await register(harness, org.owner_secret, INBOX, resource_id, environment=source.id)
    await register(harness, org.owner_secret, INBOX, "elsewhere")
    bad = await fails(
        harness.resources.ReassignResources(
            pb.ReassignResourcesRequest(
                from_environment_id=source.id,
                to_environment_id=target.id,
                resources=[
                    pb.ResourceRef(kind=INBOX, resource_id="a"),
                    pb.ResourceRef(kind=INBOX, resource_id="elsewhere"),
                ],
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    assert "elsewhere" in bad.message and org.default_environment.id not in bad.message
    assert await listed(harness, org.owner_secret, source.id) == [(INBOX, "a"), (INBOX, "b"), (INBOX, "c")]
    # From an active source; duplicates are counted once.
    response = await harness.resources.ReassignResources(
        pb.ReassignResourcesRequest(
            from_environment_id=source.id,
            to_environment_id=target.id,
            resources=[
                pb.ResourceRef(kind=INBOX, resource_id="a"),
                pb.ResourceRef(kind=INBOX, resource_id="c"),
                pb.ResourceRef(kind=INBOX, resource_id="a"),
            ],
        ),
        metadata=auth(org.owner_secret),
    )
    assert response.moved_count == 2
    assert await listed(harness, org.owner_secret, source.id) == [(INBOX, "b")]
    assert await listed(harness, org.owner_secret, target.id) == [(INBOX, "a"), (INBOX, "c")]
    # Moving an empty environment is fine and moves nothing.
    empty = await harness.new_environment(org, "Empty")
    none = await harness.resources.ReassignResources(
        pb.ReassignResourcesRequest(from_environment_id=empty.id, to_environment_id=target.id),
        metadata=auth(org.owner_secret),
    )
    assert none.moved_count == 0


@dataclass
class ReassignScene:
    """A source environment, a deleted one, and another organization, for refused reassignments."""

    org: Org
    source: environment_pb2.Environment
    gone: environment_pb2.Environment
    other: Org


# Each row: the request (built from the scene), the code, the ErrorInfo reason when it is checked,
# and the field the BadRequest must name when there is one.
REASSIGN_REFUSALS: list[Any] = [
    pytest.param(
        lambda s: pb.ReassignResourcesRequest(to_environment_id=s.source.id),
        Code.INVALID_ARGUMENT,
        None,
        "from_environment_id",
        id="no source",
    ),
    pytest.param(
        lambda s: pb.ReassignResourcesRequest(from_environment_id=s.source.id),
        Code.INVALID_ARGUMENT,
        None,
        "to_environment_id",
        id="no target",
    ),
    pytest.param(
        lambda s: pb.ReassignResourcesRequest(from_environment_id=s.source.id, to_environment_id=s.source.id),
        Code.INVALID_ARGUMENT,
        None,
        "to_environment_id",
        id="onto itself",
    ),
    pytest.param(
        lambda s: pb.ReassignResourcesRequest(
            from_environment_id=s.source.id,
            to_environment_id=s.org.default_environment.id,
            resources=[pb.ResourceRef(resource_id="x")],
        ),
        Code.INVALID_ARGUMENT,
        None,
        "resources[0].kind",
        id="no kind",
    ),
    pytest.param(
        lambda s: pb.ReassignResourcesRequest(
            from_environment_id=s.source.id,
            to_environment_id=s.org.default_environment.id,
            resources=[
                pb.ResourceRef(kind=INBOX, resource_id="ok"),
                pb.ResourceRef(kind=INBOX, resource_id="b d"),
            ],
        ),
        Code.INVALID_ARGUMENT,
        None,
        "resources[1].resource_id",
        id="bad resource id",
    ),
    pytest.param(
        lambda s: pb.ReassignResourcesRequest(
            from_environment_id=s.source.id,
            to_environment_id=s.org.default_environment.id,
            resources=[pb.ResourceRef(kind=INBOX, resource_id=f"r{i}") for i in range(1001)],
        ),
        Code.INVALID_ARGUMENT,
        None,
        "resources",
        id="too many resources",
    ),
    pytest.param(
        lambda s: pb.ReassignResourcesRequest(from_environment_id=s.source.id, to_environment_id=s.gone.id),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_DELETED",
        None,
        id="onto a deleted environment",
    ),
    pytest.param(
        lambda s: pb.ReassignResourcesRequest(
            from_environment_id=s.other.default_environment.id, to_environment_id=s.source.id
        ),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
        None,
        id="from another organization",
    ),
    pytest.param(
        lambda s: pb.ReassignResourcesRequest(
            from_environment_id=s.source.id, to_environment_id=s.other.default_environment.id
        ),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
        None,
        id="to another organization",
    ),
]


@pytest.mark.parametrize(("request_of", "code", "reason", "field"), REASSIGN_REFUSALS)
async def test_reassign_refuses_bad_environments_and_input(
    harness: Harness,
    org: Org,
    request_of: Callable[[ReassignScene], pb.ReassignResourcesRequest],
    code: grpc.StatusCode,
    reason: str | None,
    field: str | None,
) -> None:
    source = await harness.new_environment(org, "Source")
    gone = await harness.new_environment(org, "Gone")
    await harness.delete_environment(org.owner_secret, gone.id)
    other = await harness.new_org("Other")
    request = request_of(ReassignScene(org, source, gone, other))
    failure = await fails(
        harness.resources.ReassignResources(request, metadata=auth(org.owner_secret)), code, reason
    )
    if field is not None:
        assert field in failure.violations, (field, failure.violations)


async def test_list_orphaned_refuses_unknown_and_other_org_environments(harness: Harness, org: Org) -> None:
    other = await harness.new_org("Other")
    failure = await fails(
        harness.resources.ListOrphanedResources(
            pb.ListOrphanedResourcesRequest(), metadata=auth(org.owner_secret)
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "environment_id" in failure.violations
    for environment_id in (other.default_environment.id, "env_01J0000000000000000000000A"):
        await fails(
            harness.resources.ListOrphanedResources(
                pb.ListOrphanedResourcesRequest(environment_id=environment_id),
                metadata=auth(org.owner_secret),
            ),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )


async def test_context_names_an_environment_of_the_callers_org_only(harness: Harness, org: Org) -> None:
    other = await harness.new_org("Other")
    await register(harness, other.owner_secret, INBOX, "theirs")
    for environment in (other.default_environment.id, "env_01J0000000000000000000000A", "no-such-slug"):
        await fails(
            harness.resources.ListResources(
                pb.ListResourcesRequest(), metadata=auth(org.owner_secret, environment)
            ),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
    await fails(
        harness.resources.GetResource(
            pb.GetResourceRequest(kind=INBOX, resource_id="theirs"), metadata=auth(org.owner_secret)
        ),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )


# --- Scopes and key reach (need ApiKeyService) -------------------------------------------------


async def test_each_kind_needs_its_own_scope(harness: Harness, org: Org) -> None:
    await register(harness, org.owner_secret, INBOX, "i-1")
    await register(harness, org.owner_secret, MESSAGE, "m-1")
    _, reader = await harness.new_key(org, ["inboxes:read"])
    got = await harness.resources.GetResource(
        pb.GetResourceRequest(kind=INBOX, resource_id="i-1"), metadata=auth(reader)
    )
    assert got.resource_id == "i-1"
    await fails(
        harness.resources.GetResource(
            pb.GetResourceRequest(kind=MESSAGE, resource_id="m-1"), metadata=auth(reader)
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    # Permission before existence: a missing MESSAGE is still a scope refusal.
    await fails(
        harness.resources.GetResource(
            pb.GetResourceRequest(kind=MESSAGE, resource_id="nope"), metadata=auth(reader)
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    await fails(register(harness, reader, INBOX, "i-2"), Code.PERMISSION_DENIED, "SCOPE_MISSING")
    await fails(
        harness.resources.DeregisterResource(
            pb.DeregisterResourceRequest(kind=INBOX, resource_id="i-1"), metadata=auth(reader)
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    # An unspecified kind lists only the kinds the key may read.
    assert await listed(harness, reader, None) == [(INBOX, "i-1")]
    await fails(
        harness.resources.ListResources(pb.ListResourcesRequest(kind=MESSAGE), metadata=auth(reader)),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )


async def test_write_does_not_imply_read(harness: Harness, org: Org) -> None:
    _, writer = await harness.new_key(org, ["labels:write"])
    created = await register(harness, writer, LABEL, "l-1")
    assert created.resource_id == "l-1"
    await fails(
        harness.resources.GetResource(
            pb.GetResourceRequest(kind=LABEL, resource_id="l-1"), metadata=auth(writer)
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    await fails(
        harness.resources.ListResources(pb.ListResourcesRequest(), metadata=auth(writer)),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    await harness.resources.DeregisterResource(
        pb.DeregisterResourceRequest(kind=LABEL, resource_id="l-1"), metadata=auth(writer)
    )


async def test_an_environment_key_acts_only_in_its_environments(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    await register(harness, org.owner_secret, INBOX, "prod-inbox")
    await register(harness, org.owner_secret, INBOX, "staging-inbox", environment=staging.id)
    _, key = await harness.new_key(org, ["inboxes:read", "inboxes:write"], [staging.id])
    # No header: the key's only environment.
    assert await listed(harness, key, None) == [(INBOX, "staging-inbox")]
    assert (await register(harness, key, INBOX, "new")).environment_id == staging.id
    await fails(
        harness.resources.GetResource(
            pb.GetResourceRequest(kind=INBOX, resource_id="prod-inbox"), metadata=auth(key)
        ),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    for environment in (org.default_environment.id, "default"):
        await fails(
            harness.resources.ListResources(pb.ListResourcesRequest(), metadata=auth(key, environment)),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
    # Organization-level calls need an organization-wide key.
    for call in (
        harness.resources.ListOrphanedResources(
            pb.ListOrphanedResourcesRequest(environment_id=staging.id), metadata=auth(key)
        ),
        harness.resources.ReassignResources(
            pb.ReassignResourcesRequest(
                from_environment_id=staging.id, to_environment_id=org.default_environment.id
            ),
            metadata=auth(key),
        ),
    ):
        await fails(call, Code.PERMISSION_DENIED, "ORGANIZATION_KEY_REQUIRED")


async def test_a_key_on_two_environments_must_name_one(harness: Harness, org: Org) -> None:
    first = await harness.new_environment(org, "First")
    second = await harness.new_environment(org, "Second")
    _, key = await harness.new_key(org, ["inboxes:read"], [first.id, second.id])
    await fails(
        harness.resources.ListResources(pb.ListResourcesRequest(), metadata=auth(key)),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_REQUIRED",
    )
    assert await listed(harness, key, "second") == []


async def test_page_tokens_are_bound_to_the_caller(harness: Harness, org: Org) -> None:
    for resource_id in ("a", "b"):
        await register(harness, org.owner_secret, INBOX, resource_id)
    _, other_key = await harness.new_key(org, ["inboxes:read"])
    first = await harness.resources.ListResources(
        pb.ListResourcesRequest(kind=INBOX, page_size=1), metadata=auth(org.owner_secret)
    )
    await fails(
        harness.resources.ListResources(
            pb.ListResourcesRequest(kind=INBOX, page_size=1, page_token=first.next_page_token),
            metadata=auth(other_key),
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_orphan_listing_and_reassign_need_environment_scopes(harness: Harness, org: Org) -> None:
    gone = await harness.new_environment(org, "Gone")
    await harness.delete_environment(org.owner_secret, gone.id)
    _, no_scope = await harness.new_key(org, ["inboxes:read"])
    _, reader = await harness.new_key(org, ["environments:read"])
    await fails(
        harness.resources.ListOrphanedResources(
            pb.ListOrphanedResourcesRequest(environment_id=gone.id), metadata=auth(no_scope)
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    assert await orphans(harness, reader, gone.id) == []
    await fails(
        harness.resources.ReassignResources(
            pb.ReassignResourcesRequest(
                from_environment_id=gone.id, to_environment_id=org.default_environment.id
            ),
            metadata=auth(reader),
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )


async def test_reassign_checks_a_thousand_listed_resources_at_once(harness: Harness, org: Org) -> None:
    source = await harness.new_environment(org, "Source")
    for resource_id in ("keep-0", "keep-1"):
        await register(harness, org.owner_secret, INBOX, resource_id, environment=source.id)
    refs = [pb.ResourceRef(kind=INBOX, resource_id=f"keep-{i}") for i in range(2)]
    refs += [pb.ResourceRef(kind=MESSAGE, resource_id=f"absent-{i}") for i in range(998)]
    request = pb.ReassignResourcesRequest(
        from_environment_id=source.id, to_environment_id=org.default_environment.id, resources=refs
    )
    await fails(
        harness.resources.ReassignResources(request, metadata=auth(org.owner_secret)),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    del request.resources[2:]
    moved = await harness.resources.ReassignResources(request, metadata=auth(org.owner_secret))
    assert moved.moved_count == 2
