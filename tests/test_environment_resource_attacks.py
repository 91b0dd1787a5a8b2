"""Attacks on environments and scoped resources through the gRPC surface, on both databases.

- The default environment: it cannot be deleted, demoted, re-slugged or undeleted, and keeps
  being the implicit context on every replica.
- Slugs shaped like ids: no slug can equal an id, and an id-like slug never reaches the
  environment whose id it resembles (header, GetEnvironment, VerifyApiKey).
- Writes that act in an environment after its delete committed: a deregistration or a
  reassignment whose environment was deleted behind the replica's back, or while it waited for
  the organization's write lock, must be refused as a registration is.
- Update and Delete holding one etag, Delete racing Undelete: the final state matches the
  acknowledged answers.
- Lists paged while items come and go between pages: nothing that existed throughout is skipped
  or repeated; a token is bound to `show_deleted`; page_size edges.
- Reassignment and deregistration edges: ids only, a target deleted behind the replica's back,
  kinds outside the caller's scopes, re-registration elsewhere, keys of other environments,
  display_name Unicode rules.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from datetime import UTC, datetime

import grpc
from agentpost.environments.v1 import api_key_pb2, environment_pb2, resource_pb2
from sqlalchemy import update

from service.storage.tables import EnvironmentRow, EventRow
from tests.harness import Harness, Org, auth, every_page, fails, mask, stored_events
from tests.servers import Backend, scratch_database, serving
from tests.writes import (
    outcome,
    register_call,
    revision_of,
    stored_environments,
    stored_resources,
)

Code = grpc.StatusCode
Kind = resource_pb2.ScopedResource.Kind
INBOX = resource_pb2.ScopedResource.INBOX
LABEL = resource_pb2.ScopedResource.LABEL
DOMAIN = resource_pb2.ScopedResource.DOMAIN
DELETED = environment_pb2.Environment.DELETED
ACTIVE = environment_pb2.Environment.ACTIVE
INT32_MAX = 2**31 - 1


# -- helpers ---------------------------------------------------------------------------------


async def mark_deleted(harness: Harness, environment_id: str, deleted: bool) -> None:
    """Sets or clears the environment's delete_time straight in the database, without a revision:
    no notification or poll tells any replica, so its view still shows the old state."""
    async with harness.app.engine.begin() as connection:
        await connection.execute(
            update(EnvironmentRow)
            .where(EnvironmentRow.id == environment_id)
            .values(delete_time=datetime.now(UTC) if deleted else None)
        )


async def deregister(harness: Harness, secret: str, resource_id: str, environment: str | None) -> object:
    """DeregisterResource of an INBOX as `secret` in `environment`."""
    return await harness.resources.DeregisterResource(
        resource_pb2.DeregisterResourceRequest(kind=INBOX, resource_id=resource_id),
        metadata=auth(secret, environment),
    )


def deleted_intervals(events: list[EventRow], environment_id: str) -> list[tuple[int, int]]:
    """The revisions [delete, undelete) during which the event log says the environment was
    deleted (an open interval ends at infinity)."""
    intervals: list[tuple[int, int]] = []
    start: int | None = None
    for event in events:
        if event.resource_type != "ENVIRONMENT" or event.resource_id != environment_id:
            continue
        action, revision = event.action, int(event.revision)
        if action == "DELETED" and start is None:
            start = revision
        elif action == "UNDELETED" and start is not None:
            intervals.append((start, revision))
            start = None
    if start is not None:
        intervals.append((start, 2**62))
    return intervals


def inside(intervals: list[tuple[int, int]], revision: int) -> bool:
    """Whether `revision` lies in one of the intervals."""
    return any(start <= revision < end for start, end in intervals)


# -- 1. the default environment --------------------------------------------------------------


async def test_the_default_environment_cannot_be_deleted_demoted_or_reslugged_on_any_replica(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """Deleting the default environment (with its etag, a stale etag or none) never deletes it;
    undeleting it is ALREADY_EXISTS; its slug and `is_default` are not mutable; a rename is
    allowed and keeps it the default. Afterwards a key with no environment header still acts in
    it, on this replica and on another one, and the organization has exactly one default."""
    default = org.default_environment
    secret = org.owner_secret
    await fails(
        harness.delete_environment(secret, default.id, default.etag),
        Code.FAILED_PRECONDITION,
        "DEFAULT_ENVIRONMENT_PROTECTED",
    )
    renamed = await harness.environments.UpdateEnvironment(
        environment_pb2.UpdateEnvironmentRequest(
            environment=environment_pb2.Environment(id=default.id, name="Production", etag=default.etag),
            update_mask=mask("name"),
        ),
        metadata=auth(secret),
    )
    assert (renamed.name, renamed.slug, renamed.is_default) == ("Production", "default", True)
    # A stale etag, and no etag: the default is still protected (or the etag refused first).
    await fails(harness.delete_environment(secret, default.id, default.etag), Code.ABORTED, "ETAG_MISMATCH")
    await fails(
        harness.delete_environment(secret, default.id),
        Code.FAILED_PRECONDITION,
        "DEFAULT_ENVIRONMENT_PROTECTED",
    )
    await fails(
        harness.environments.UndeleteEnvironment(
            environment_pb2.UndeleteEnvironmentRequest(id=default.id), metadata=auth(secret)
        ),
        Code.ALREADY_EXISTS,
    )
    for path, environment, reason in (
        ("slug", environment_pb2.Environment(id=default.id, slug="prod"), "SLUG_IMMUTABLE"),
        ("is_default", environment_pb2.Environment(id=default.id, is_default=False), "FIELD_NOT_MUTABLE"),
        ("state", environment_pb2.Environment(id=default.id, state=DELETED), "FIELD_NOT_MUTABLE"),
    ):
        await fails(
            harness.environments.UpdateEnvironment(
                environment_pb2.UpdateEnvironmentRequest(environment=environment, update_mask=mask(path)),
                metadata=auth(secret),
            ),
            Code.INVALID_ARGUMENT,
            reason,
        )
    assert (await stored_environments(harness, org.id))[default.id] == ("Production", False)
    other = await harness.new_environment(org, "Other")
    async with serving(backend) as replica:
        for server, resource_id in ((harness, "here"), (replica, "there")):
            registered = await register_call(server, secret, resource_id)
            assert registered.environment_id == default.id
            shown = await server.environments.GetEnvironment(
                environment_pb2.GetEnvironmentRequest(slug="default"), metadata=auth(secret)
            )
            assert (shown.id, shown.is_default, shown.state) == (default.id, True, ACTIVE)
            listed = await server.environments.ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(show_deleted=True), metadata=auth(secret)
            )
            assert [env.id for env in listed.environments if env.is_default] == [default.id]
            assert other.id in [env.id for env in listed.environments]


async def test_a_key_whose_only_environment_is_deleted_never_falls_back_to_the_default(
    harness: Harness, org: Org
) -> None:
    """A key limited to a non-default environment acts there without a header; once that
    environment is deleted it is ENVIRONMENT_DELETED (FAILED_PRECONDITION), never silently the
    default environment, and naming the default environment is NOT_FOUND (out of reach). A key
    limited to the default and the deleted one falls back to the default."""
    staging = await harness.new_environment(org, "Staging")
    _, only_staging = await harness.new_key(org, ["inboxes:write", "inboxes:read"], [staging.id])
    _, both = await harness.new_key(
        org, ["inboxes:write", "inboxes:read"], [staging.id, org.default_environment.id]
    )
    assert (await register_call(harness, only_staging, "s-1")).environment_id == staging.id
    await harness.delete_environment(org.owner_secret, staging.id)
    await fails(register_call(harness, only_staging, "s-2"), Code.FAILED_PRECONDITION, "ENVIRONMENT_DELETED")
    await fails(
        register_call(harness, only_staging, "s-3", "default"), Code.NOT_FOUND, "ENVIRONMENT_NOT_FOUND"
    )
    landed = await register_call(harness, both, "d-1")
    assert landed.environment_id == org.default_environment.id
    assert set(await stored_resources(harness, org.id)) == {"INBOX:s-1", "INBOX:d-1"}


# -- 2. slugs shaped like ids ----------------------------------------------------------------


async def test_an_id_shaped_slug_never_reaches_the_environment_with_that_id(
    harness: Harness, org: Org
) -> None:
    """A slug can never equal an environment id (ids hold `_` and capitals). The closest valid
    slug, the id lower-cased with `-` for `_`, names only its own environment: the header with
    the other environment's id acts there, with the slug here, and a lower-cased id, the id as a
    slug or the slug as an id find nothing (GetEnvironment, the header, VerifyApiKey)."""
    target = await harness.new_environment(org, "Target")
    await fails(
        harness.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name="Impostor", slug=target.id),
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
    )
    lookalike = target.id.lower().replace("_", "-")
    impostor = await harness.new_environment(org, "Impostor", slug=lookalike)
    assert impostor.slug == lookalike and impostor.id != target.id
    by_id = await register_call(harness, org.owner_secret, "via-id", target.id)
    by_slug = await register_call(harness, org.owner_secret, "via-slug", lookalike)
    assert (by_id.environment_id, by_slug.environment_id) == (target.id, impostor.id)
    for reference in (target.id.lower(), impostor.id.lower(), lookalike.upper()):
        await fails(
            register_call(harness, org.owner_secret, f"x-{uuid.uuid4().hex[:6]}", reference),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
    for request in (
        environment_pb2.GetEnvironmentRequest(slug=target.id),
        environment_pb2.GetEnvironmentRequest(id=lookalike),
        environment_pb2.GetEnvironmentRequest(id="default"),
        environment_pb2.GetEnvironmentRequest(slug=org.default_environment.id),
    ):
        await fails(
            harness.environments.GetEnvironment(request, metadata=auth(org.owner_secret)),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
    shown = await harness.environments.GetEnvironment(
        environment_pb2.GetEnvironmentRequest(slug=lookalike), metadata=auth(org.owner_secret)
    )
    assert shown.id == impostor.id
    verified = await harness.verify(org.owner_secret, target.id.lower(), "inboxes:write")
    assert not verified.valid
    assert verified.denial_reason == api_key_pb2.VerifyApiKeyResponse.ENVIRONMENT_NOT_FOUND
    assert await stored_resources(harness, org.id) == {
        "INBOX:via-id": target.id,
        "INBOX:via-slug": impostor.id,
    }


async def test_a_key_limited_to_an_id_shaped_slug_does_not_reach_the_lookalike(
    harness: Harness, org: Org
) -> None:
    """A key limited to the environment whose slug looks like another environment's id reaches
    only its own: the other's id in the header is NOT_FOUND, its slug here works."""
    target = await harness.new_environment(org, "Target")
    impostor = await harness.new_environment(org, "Impostor", slug=target.id.lower().replace("_", "-"))
    _, limited = await harness.new_key(org, ["inboxes:write"], [impostor.id])
    await fails(register_call(harness, limited, "r-1", target.id), Code.NOT_FOUND, "ENVIRONMENT_NOT_FOUND")
    landed = await register_call(harness, limited, "r-2", impostor.slug)
    assert landed.environment_id == impostor.id
    assert await stored_resources(harness, org.id) == {"INBOX:r-2": impostor.id}


# -- 3. writes after a delete ----------------------------------------------------------------


async def test_a_deregistration_in_an_environment_deleted_behind_the_replicas_back_is_refused(
    harness: Harness, org: Org
) -> None:
    """A delete this replica has not heard of (written straight to the database, as in
    tests/test_resources.py for registrations) must win over a deregistration in that
    environment: the environment's resources "stay, inaccessible until reassigned" (SPEC §3),
    and "calls in their context are FAILED_PRECONDITION ENVIRONMENT_DELETED" (README). The
    registration path re-reads the environment inside its write; a deregistration must too, or
    a replica whose view lags removes an orphan of a deleted environment."""
    staging = await harness.new_environment(org, "Staging")
    await register_call(harness, org.owner_secret, "orphan-to-be", staging.id)
    await mark_deleted(harness, staging.id, True)
    await fails(
        deregister(harness, org.owner_secret, "orphan-to-be", staging.id),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_DELETED",
    )
    assert await stored_resources(harness, org.id) == {"INBOX:orphan-to-be": staging.id}


async def test_deregistrations_and_reassignments_racing_deletes_across_replicas_stay_out_of_deleted_intervals(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """One replica deletes and undeletes an environment ten times while another deregisters its
    resources and reassigns resources into it, one at a time. Every answer is OK or
    FAILED_PRECONDITION ENVIRONMENT_DELETED (or the resource already gone), and no DEREGISTERED
    or REASSIGNED event of that environment, nor any acknowledged answer, has a revision inside
    a deleted interval [delete, undelete): nothing changes in an environment whose delete
    committed before the change did."""
    env = await harness.new_environment(org, "Flapping")
    source = await harness.new_environment(org, "Source")
    count = 80
    for index in range(count):
        await register_call(harness, org.owner_secret, f"d-{index}", env.id)
        await register_call(harness, org.owner_secret, f"m-{index}", source.id)

    async with serving(backend) as replica:

        async def flapping() -> None:
            for _ in range(10):
                await asyncio.sleep(0.01)
                await harness.delete_environment(org.owner_secret, env.id)
                await asyncio.sleep(0.01)
                await harness.environments.UndeleteEnvironment(
                    environment_pb2.UndeleteEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
                )

        async def deregistration(index: int) -> tuple[str, str, int | None]:
            await asyncio.sleep(0.004 * index)
            call = replica.resources.DeregisterResource(
                resource_pb2.DeregisterResourceRequest(kind=INBOX, resource_id=f"d-{index}"),
                metadata=auth(org.owner_secret, env.id),
            )
            code, revision = await outcome(call)
            return f"deregister d-{index}", code, revision

        async def reassignment(index: int) -> tuple[str, str, int | None]:
            await asyncio.sleep(0.004 * index)
            call = replica.resources.ReassignResources(
                resource_pb2.ReassignResourcesRequest(
                    from_environment_id=source.id,
                    to_environment_id=env.id,
                    resources=[resource_pb2.ResourceRef(kind=INBOX, resource_id=f"m-{index}")],
                ),
                metadata=auth(org.owner_secret),
            )
            code, revision = await outcome(call)
            return f"reassign m-{index}", code, revision

        flapper = asyncio.ensure_future(flapping())
        answers = await asyncio.gather(
            *(deregistration(index) for index in range(count)),
            *(reassignment(index) for index in range(count)),
        )
        await flapper
    codes = collections.Counter(f"{what.split()[0]} {code}" for what, code, _ in answers)
    assert set(codes) <= {
        f"{what} {code}"
        for what in ("deregister", "reassign")
        for code in ("OK", "FAILED_PRECONDITION ENVIRONMENT_DELETED")
    }, codes
    assert codes["reassign OK"] and codes["reassign FAILED_PRECONDITION ENVIRONMENT_DELETED"], (
        f"the race did not overlap a delete: {codes}"
    )
    events = await stored_events(harness, org.id)
    intervals = deleted_intervals(events, env.id)
    assert len(intervals) == 10
    for verb, action in (("reassign", "REASSIGNED"), ("deregister", "DEREGISTERED")):
        late_answers = {
            what: revision
            for what, code, revision in answers
            if what.startswith(verb) and code == "OK" and revision is not None and inside(intervals, revision)
        }
        late_events = {
            event.resource_id: event.revision
            for event in events
            if event.action == action and event.environment_id == env.id and inside(intervals, event.revision)
        }
        assert not late_answers and not late_events, (
            f"{action} inside deleted intervals {intervals}: answered {late_answers}, logged {late_events}"
        )


async def test_a_reassignment_into_a_target_deleted_behind_the_replicas_back_moves_nothing(
    harness: Harness, org: Org
) -> None:
    """A target deleted in the database but still active in this replica's view is refused
    FAILED_PRECONDITION ENVIRONMENT_DELETED, and nothing moves (the write re-reads it)."""
    source = await harness.new_environment(org, "Source")
    target = await harness.new_environment(org, "Target")
    await register_call(harness, org.owner_secret, "stay", source.id)
    await mark_deleted(harness, target.id, True)
    await fails(
        harness.resources.ReassignResources(
            resource_pb2.ReassignResourcesRequest(from_environment_id=source.id, to_environment_id=target.id),
            metadata=auth(org.owner_secret),
        ),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_DELETED",
    )
    assert await stored_resources(harness, org.id) == {"INBOX:stay": source.id}


# -- 4. etags and delete/undelete races ------------------------------------------------------


async def test_update_and_delete_holding_one_etag_exactly_one_wins(harness: Harness, org: Org) -> None:
    """An UpdateEnvironment and a DeleteEnvironment sent at once with the same etag: exactly one
    succeeds and the other is ABORTED, and the stored environment is what the winner left (a
    deleted environment keeps its old name; a renamed one is active)."""
    for round_number in range(6):
        env = await harness.new_environment(org, f"Race {round_number}")
        renaming = harness.environments.UpdateEnvironment(
            environment_pb2.UpdateEnvironmentRequest(
                environment=environment_pb2.Environment(id=env.id, name="Renamed", etag=env.etag),
                update_mask=mask("name"),
            ),
            metadata=auth(org.owner_secret),
        )
        deleting = harness.environments.DeleteEnvironment(
            environment_pb2.DeleteEnvironmentRequest(id=env.id, etag=env.etag),
            metadata=auth(org.owner_secret),
        )
        (renamed, _), (deleted, _) = await asyncio.gather(outcome(renaming), outcome(deleting))
        assert sorted([renamed, deleted]) == ["ABORTED ETAG_MISMATCH", "OK"], (renamed, deleted)
        stored = (await stored_environments(harness, org.id))[env.id]
        assert stored == (("Renamed", False) if renamed == "OK" else (f"Race {round_number}", True))


async def test_concurrent_deletes_and_undeletes_end_as_the_last_acknowledged_one_left_it(
    harness: Harness, org: Org
) -> None:
    """Bursts of DeleteEnvironment and UndeleteEnvironment at once: each answer is OK or (an
    undelete of an active environment) ALREADY_EXISTS; the stored state is what the answer with
    the highest revision says, and a delete of a deleted environment changes nothing (its answer
    carries the same delete_time as the delete that did it)."""
    env = await harness.new_environment(org, "Flip")
    for _ in range(5):
        calls = []
        for index in range(6):
            if index % 2:
                calls.append(
                    harness.environments.UndeleteEnvironment(
                        environment_pb2.UndeleteEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
                    )
                )
            else:
                calls.append(
                    harness.environments.DeleteEnvironment(
                        environment_pb2.DeleteEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
                    )
                )
        results = await asyncio.gather(
            *(asyncio.ensure_future(call) for call in calls), return_exceptions=True
        )
        last: tuple[int, bool] | None = None
        delete_times = set()
        undone = 0
        for call, result in zip(calls, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                assert result.code() == Code.ALREADY_EXISTS, result
                continue
            assert isinstance(result, environment_pb2.Environment)
            revision = await revision_of(call)
            if result.state == DELETED:
                delete_times.add(result.delete_time.ToNanoseconds())
            else:
                undone += 1
            if last is None or revision > last[0]:
                last = (revision, result.state == DELETED)
        assert last is not None
        assert (await stored_environments(harness, org.id))[env.id][1] is last[1]
        # A new delete_time needs an active environment: the one it was before the burst (or
        # was left deleted), or one an acknowledged undelete restored.
        assert len(delete_times) <= 1 + undone, (delete_times, undone)


# -- 5. lists paged while things change ------------------------------------------------------


async def test_environment_pages_survive_creates_and_deletes_between_pages(
    harness: Harness, org: Org
) -> None:
    """ListEnvironments paged two at a time while environments are created and deleted between
    pages: every environment that existed (active) throughout appears exactly once, in id order;
    the same token with `show_deleted` flipped is INVALID_PAGE_TOKEN; page_size INT32_MAX is
    clamped, not refused."""
    steady = [await harness.new_environment(org, f"Steady {index}") for index in range(6)]
    doomed = [await harness.new_environment(org, f"Doomed {index}") for index in range(3)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=2, page_token=token),
            metadata=auth(org.owner_secret),
        )
        seen += [env.id for env in page.environments]
        token = page.next_page_token
        if not token:
            break
        pages += 1
        await fails(
            harness.environments.ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(page_size=2, page_token=token, show_deleted=True),
                metadata=auth(org.owner_secret),
            ),
            Code.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        )
        await harness.new_environment(org, f"Late {pages}")
        if doomed:
            await harness.delete_environment(org.owner_secret, doomed.pop().id)
    throughout = {org.default_environment.id, *(env.id for env in steady)}
    assert len(seen) == len(set(seen)), seen
    assert seen == sorted(seen)
    assert throughout <= set(seen)
    everything = await harness.environments.ListEnvironments(
        environment_pb2.ListEnvironmentsRequest(page_size=INT32_MAX, show_deleted=True),
        metadata=auth(org.owner_secret),
    )
    assert not everything.next_page_token
    assert len(everything.environments) == len(await stored_environments(harness, org.id))


async def test_resource_and_orphan_pages_survive_changes_between_pages(harness: Harness, org: Org) -> None:
    """ListResources paged while resources are registered and deregistered between pages, and
    ListOrphanedResources paged while orphans are reassigned away between pages: each returns
    what stayed throughout exactly once, in order. An orphan token is refused once its
    environment is undeleted (ENVIRONMENT_NOT_DELETED), and page_size INT32_MAX is clamped."""
    for index in range(10):
        await register_call(harness, org.owner_secret, f"r-{index:02d}")
    seen: list[str] = []
    token = ""
    step = 0
    while True:
        page = await harness.resources.ListResources(
            resource_pb2.ListResourcesRequest(kind=INBOX, page_size=3, page_token=token),
            metadata=auth(org.owner_secret),
        )
        seen += [item.resource_id for item in page.resources]
        token = page.next_page_token
        if not token:
            break
        step += 1
        await register_call(harness, org.owner_secret, f"r-{step:02d}x")  # sorts among the rest
        await deregister(harness, org.owner_secret, f"r-{10 - step:02d}", None)
    gone = {f"r-{10 - s:02d}" for s in range(1, step + 1)}
    assert len(seen) == len(set(seen)) and seen == sorted(seen), seen
    assert {f"r-{index:02d}" for index in range(10)} - gone <= set(seen)

    old = await harness.new_environment(org, "Old")
    for index in range(9):
        await register_call(harness, org.owner_secret, f"o-{index}", old.id, kind=LABEL)
    await harness.delete_environment(org.owner_secret, old.id)
    orphans: list[str] = []
    token = ""
    moved = 0
    while True:
        orphan_page = await harness.resources.ListOrphanedResources(
            resource_pb2.ListOrphanedResourcesRequest(environment_id=old.id, page_size=2, page_token=token),
            metadata=auth(org.owner_secret),
        )
        orphans += [item.resource_id for item in orphan_page.resources]
        token = orphan_page.next_page_token
        if not token:
            break
        # Reassign one not yet listed (the last one) away between pages.
        await harness.resources.ReassignResources(
            resource_pb2.ReassignResourcesRequest(
                from_environment_id=old.id,
                to_environment_id=org.default_environment.id,
                resources=[resource_pb2.ResourceRef(kind=LABEL, resource_id=f"o-{8 - moved}")],
            ),
            metadata=auth(org.owner_secret),
        )
        moved += 1
    assert len(orphans) == len(set(orphans)) and orphans == sorted(orphans), orphans
    assert {f"o-{index}" for index in range(9 - moved)} <= set(orphans)
    first = await harness.resources.ListOrphanedResources(
        resource_pb2.ListOrphanedResourcesRequest(environment_id=old.id, page_size=1),
        metadata=auth(org.owner_secret),
    )
    assert first.next_page_token
    clamped = await harness.resources.ListOrphanedResources(
        resource_pb2.ListOrphanedResourcesRequest(environment_id=old.id, page_size=INT32_MAX),
        metadata=auth(org.owner_secret),
    )
    assert not clamped.next_page_token and len(clamped.resources) == 9 - moved
    await harness.environments.UndeleteEnvironment(
        environment_pb2.UndeleteEnvironmentRequest(id=old.id), metadata=auth(org.owner_secret)
    )
    await fails(
        harness.resources.ListOrphanedResources(
            resource_pb2.ListOrphanedResourcesRequest(
                environment_id=old.id, page_size=1, page_token=first.next_page_token
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_NOT_DELETED",
    )


# -- 6. reassignment and deregistration edges ------------------------------------------------


async def test_reassign_names_environments_by_id_only_and_moves_every_kind(
    harness: Harness, org: Org
) -> None:
    """ReassignResources takes ids, not slugs: a slug is NOT_FOUND ENVIRONMENT_NOT_FOUND (so a
    slug and the id of one environment can never pass as two). An organization-level key with
    only `environments:write` moves resources of every kind (README: these calls act on
    environments, not on one kind); an environment-limited key with the same scope is
    PERMISSION_DENIED even for its own environment, and nothing moves."""
    source = await harness.new_environment(org, "Source")
    target = await harness.new_environment(org, "Target")
    await register_call(harness, org.owner_secret, "i-1", source.id)
    await register_call(harness, org.owner_secret, "d-1", source.id, kind=DOMAIN)
    for from_id, to_id in (("source", target.id), (source.id, "target"), ("source", source.id)):
        await fails(
            harness.resources.ReassignResources(
                resource_pb2.ReassignResourcesRequest(from_environment_id=from_id, to_environment_id=to_id),
                metadata=auth(org.owner_secret),
            ),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
    _, limited = await harness.new_key(
        org, ["environments:write", "environments:read"], [source.id, target.id]
    )
    await fails(
        harness.resources.ReassignResources(
            resource_pb2.ReassignResourcesRequest(from_environment_id=source.id, to_environment_id=target.id),
            metadata=auth(limited),
        ),
        Code.PERMISSION_DENIED,
        "ORGANIZATION_KEY_REQUIRED",
    )
    assert await stored_resources(harness, org.id) == {"INBOX:i-1": source.id, "DOMAIN:d-1": source.id}
    _, mover = await harness.new_key(org, ["environments:write"])
    moved = await harness.resources.ReassignResources(
        resource_pb2.ReassignResourcesRequest(
            from_environment_id=source.id,
            to_environment_id=target.id,
            resources=[
                resource_pb2.ResourceRef(kind=DOMAIN, resource_id="d-1"),
                resource_pb2.ResourceRef(kind=INBOX, resource_id="i-1"),
            ],
        ),
        metadata=auth(mover),
    )
    assert moved.moved_count == 2
    assert await stored_resources(harness, org.id) == {"INBOX:i-1": target.id, "DOMAIN:d-1": target.id}


async def test_deregister_then_register_elsewhere_and_foreign_keys_cannot_deregister(
    harness: Harness, org: Org
) -> None:
    """A (kind, id) deregistered in one environment can be registered in another; a retry of the
    first registration's request id then is NOT_FOUND (it moved away) and creates nothing. A key
    limited to another environment deregistering it is NOT_FOUND RESOURCE_NOT_FOUND with the
    same message as a random id, and the resource stays."""
    staging = await harness.new_environment(org, "Staging")
    request_id = str(uuid.uuid4())
    await register_call(harness, org.owner_secret, "roamer", request_id=request_id)
    await deregister(harness, org.owner_secret, "roamer", None)
    again = await register_call(harness, org.owner_secret, "roamer", staging.id)
    assert again.environment_id == staging.id
    await fails(
        register_call(harness, org.owner_secret, "roamer", request_id=request_id),
        Code.NOT_FOUND,
        "RESOURCE_NOT_FOUND",
    )
    _, outsider = await harness.new_key(org, ["inboxes:write"], [org.default_environment.id])
    messages = []
    for resource_id in ("roamer", "never-there"):
        failure = await fails(
            deregister(harness, outsider, resource_id, None), Code.NOT_FOUND, "RESOURCE_NOT_FOUND"
        )
        messages.append(failure.message.replace(resource_id, "<id>"))
    assert messages[0] == messages[1]
    await fails(deregister(harness, outsider, "roamer", staging.id), Code.NOT_FOUND, "ENVIRONMENT_NOT_FOUND")
    assert await stored_resources(harness, org.id) == {"INBOX:roamer": staging.id}


async def test_display_names_follow_the_name_rules(harness: Harness, org: Org) -> None:
    """display_name is optional, at most 200 printable characters, by the README's name rules:
    bidirectional overrides and isolates, an all-invisible value, surrounding blanks, control
    characters and 201 characters are INVALID_ARGUMENT naming `display_name` (nothing is
    registered); joiners inside visible text, 200 characters and right-to-left script are kept
    as sent."""
    refused = [
        "gnp\u202e.exe",
        "a\u2066b\u2069",
        "\u200b\u200b",
        "\ufeff",
        "\u3164",
        " padded",
        "tab\there",
        "x" * 201,
        "line\u2028sep",
    ]
    for index, display_name in enumerate(refused):
        failure = await fails(
            register_call(harness, org.owner_secret, f"bad-{index}", display_name=display_name),
            Code.INVALID_ARGUMENT,
        )
        assert "display_name" in failure.violations, (display_name, failure.violations)
    accepted = ["👩\u200d💻 inbox", "y" * 200, "עברית", "zero\u200bwidth inside"]
    for index, display_name in enumerate(accepted):
        registered = await register_call(harness, org.owner_secret, f"ok-{index}", display_name=display_name)
        assert registered.display_name == display_name
    assert set(await stored_resources(harness, org.id)) == {
        f"INBOX:ok-{index}" for index in range(len(accepted))
    }


async def test_resource_ids_are_listed_bytewise_whatever_the_databases_collation(backend: Backend) -> None:
    """ListResources orders ids as SQLite does (bytewise), also on a PostgreSQL database created
    with a linguistic collation (ICU en-US), which would interleave upper and lower case and
    weigh `-`, `.` and `_` apart from their bytes; paging follows the same order."""
    ids = ["a-1", "A-2", "a_3", "B", "b", ".c", "Z", "z9", "a.0", "A:b", "_x", "0"]
    if backend.name == "sqlite":
        async with serving(backend) as server:
            org = await server.new_org()
            assert await _listed_in_pages(server, org, ids) == sorted(ids)
        return
    linguistic = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
    async with (
        scratch_database(backend.url, "agentpost_icu", linguistic) as url,
        serving(Backend("postgresql", url, None)) as server,
    ):
        org = await server.new_org()
        assert await _listed_in_pages(server, org, ids) == sorted(ids)


async def _listed_in_pages(server: Harness, org: Org, ids: list[str]) -> list[str]:
    for resource_id in ids:
        await register_call(server, org.owner_secret, resource_id)
    return await every_page(
        lambda token: server.resources.ListResources(
            resource_pb2.ListResourcesRequest(kind=INBOX, page_size=5, page_token=token),
            metadata=auth(org.owner_secret),
        ),
        lambda page: [item.resource_id for item in page.resources],
    )
