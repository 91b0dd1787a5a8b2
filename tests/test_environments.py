"""EnvironmentService end to end: every RPC, every error reason, pagination and concurrency."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import grpc
import pytest
import ulid
from agentpost.environments.v1 import environment_pb2 as pb

from tests.harness import Harness, Org, auth, fails, mask

Code = grpc.StatusCode


async def test_create_derives_slug_and_returns_the_resource(harness: Harness, org: Org) -> None:
    env = await harness.environments.CreateEnvironment(
        pb.CreateEnvironmentRequest(name="Customer Ünïcode Staging!", description="for tests"),
        metadata=auth(org.owner_secret),
    )
    assert env.id.startswith("env_") and len(env.id) == 30
    assert env.organization_id == org.id
    assert env.slug == "customer-unicode-staging"
    assert env.description == "for tests"
    assert env.state == pb.Environment.ACTIVE
    assert not env.is_default
    assert env.etag and env.create_time.seconds > 0 and not env.HasField("delete_time")


async def test_get_by_id_and_by_slug(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    by_id = await harness.environments.GetEnvironment(
        pb.GetEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
    )
    by_slug = await harness.environments.GetEnvironment(
        pb.GetEnvironmentRequest(slug="staging"), metadata=auth(org.owner_secret)
    )
    assert by_id == by_slug == env


async def test_get_unknown_is_not_found(harness: Harness, org: Org) -> None:
    for request in (
        pb.GetEnvironmentRequest(id="env_01J0000000000000000000000A"),
        pb.GetEnvironmentRequest(slug="nope"),
        pb.GetEnvironmentRequest(id="not-an-id"),
    ):
        await fails(
            harness.environments.GetEnvironment(request, metadata=auth(org.owner_secret)),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
    failure = await fails(
        harness.environments.GetEnvironment(pb.GetEnvironmentRequest(), metadata=auth(org.owner_secret)),
        Code.INVALID_ARGUMENT,
    )
    assert "id" in failure.violations


async def test_another_organizations_environment_is_not_found(harness: Harness, org: Org) -> None:
    other = await harness.new_org("Other")
    theirs = await harness.new_environment(other, "Secret")
    await fails(
        harness.environments.GetEnvironment(
            pb.GetEnvironmentRequest(id=theirs.id), metadata=auth(org.owner_secret)
        ),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )
    await fails(
        harness.delete_environment(org.owner_secret, theirs.id),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )


@pytest.mark.parametrize(
    ("slug", "reason"),
    [
        ("staging", "SLUG_TAKEN"),  # taken by an active environment
        ("default", "SLUG_TAKEN"),  # the default environment's slug
    ],
)
async def test_slug_taken(harness: Harness, org: Org, slug: str, reason: str) -> None:
    await harness.new_environment(org, "Staging")
    await fails(
        harness.environments.CreateEnvironment(
            pb.CreateEnvironmentRequest(name="Another", slug=slug), metadata=auth(org.owner_secret)
        ),
        Code.ALREADY_EXISTS,
        reason,
    )


async def test_slug_of_a_deleted_environment_stays_taken(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    await harness.delete_environment(org.owner_secret, env.id)
    await fails(
        harness.environments.CreateEnvironment(
            pb.CreateEnvironmentRequest(name="Staging"), metadata=auth(org.owner_secret)
        ),
        Code.ALREADY_EXISTS,
        "SLUG_TAKEN",
    )


async def test_same_slug_in_two_organizations_is_fine(harness: Harness, org: Org) -> None:
    other = await harness.new_org("Other")
    first = await harness.new_environment(org, "Staging")
    second = await harness.new_environment(other, "Staging")
    assert first.slug == second.slug == "staging" and first.id != second.id


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": " padded"}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "bad\x00name"}, "name"),
        ({"name": "bell\x07"}, "name"),
        ({"name": "line\nbreak"}, "name"),
        ({"name": "ok", "description": "d" * 1001}, "description"),
        ({"name": "ok", "description": "ctl\x1b"}, "description"),
        ({"name": "ok", "slug": "UPPER"}, "slug"),
        ({"name": "ok", "slug": "-lead"}, "slug"),
        ({"name": "ok", "slug": "trail-"}, "slug"),
        ({"name": "ok", "slug": "under_score"}, "slug"),
        ({"name": "ok", "slug": "a" * 64}, "slug"),
        ({"name": "ok", "slug": "dot.ted"}, "slug"),
        ({"name": "!!!"}, "slug"),  # nothing to derive a slug from
        ({"name": "ok", "request_id": "not-a-uuid"}, "request_id"),
    ],
)
async def test_create_rejects_bad_input(
    harness: Harness, org: Org, request_fields: dict[str, str], field: str
) -> None:
    failure = await fails(
        harness.environments.CreateEnvironment(
            pb.CreateEnvironmentRequest(**request_fields), metadata=auth(org.owner_secret)
        ),
        Code.INVALID_ARGUMENT,
    )
    assert field in failure.violations, failure.violations
    assert failure.reason


async def test_longest_valid_values_are_accepted(harness: Harness, org: Org) -> None:
    env = await harness.environments.CreateEnvironment(
        pb.CreateEnvironmentRequest(name="n" * 100, slug="a" * 63, description="d" * 1000),
        metadata=auth(org.owner_secret),
    )
    assert env.slug == "a" * 63 and len(env.name) == 100


async def test_request_id_makes_create_idempotent(harness: Harness, org: Org) -> None:
    request_id = str(uuid.uuid4())
    request = pb.CreateEnvironmentRequest(name="Retry me", request_id=request_id)
    first = await harness.environments.CreateEnvironment(request, metadata=auth(org.owner_secret))
    second = await harness.environments.CreateEnvironment(request, metadata=auth(org.owner_secret))
    assert first == second
    listed = await harness.environments.ListEnvironments(
        pb.ListEnvironmentsRequest(), metadata=auth(org.owner_secret)
    )
    assert [env.slug for env in listed.environments].count("retry-me") == 1


async def test_concurrent_creates_of_one_slug_exactly_one_wins(harness: Harness, org: Org) -> None:
    calls = [
        harness.environments.CreateEnvironment(
            pb.CreateEnvironmentRequest(name=f"Race {i}", slug="race"), metadata=auth(org.owner_secret)
        )
        for i in range(8)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    winners = [r for r in results if isinstance(r, pb.Environment)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 7
    assert all(loser.code() == Code.ALREADY_EXISTS for loser in losers)


async def test_concurrent_retries_with_one_request_id_create_once(harness: Harness, org: Org) -> None:
    request = pb.CreateEnvironmentRequest(name="Once", request_id=str(uuid.uuid4()))
    results = await asyncio.gather(
        *(harness.environments.CreateEnvironment(request, metadata=auth(org.owner_secret)) for _ in range(5))
    )
    assert len({env.id for env in results}) == 1


async def test_list_paginates_in_id_order(harness: Harness, org: Org) -> None:
    created = [await harness.new_environment(org, f"Env {i}") for i in range(7)]
    expected = sorted([org.default_environment.id, *(env.id for env in created)])
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await harness.environments.ListEnvironments(
            pb.ListEnvironmentsRequest(page_size=3, page_token=token), metadata=auth(org.owner_secret)
        )
        pages += 1
        assert len(page.environments) <= 3
        seen.extend(env.id for env in page.environments)
        token = page.next_page_token
        if not token:
            break
    assert seen == expected
    assert pages == 3


async def test_page_size_rules(harness: Harness, org: Org) -> None:
    for i in range(3):
        await harness.new_environment(org, f"Env {i}")
    failure = await fails(
        harness.environments.ListEnvironments(
            pb.ListEnvironmentsRequest(page_size=-1), metadata=auth(org.owner_secret)
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "page_size" in failure.violations
    clamped = await harness.environments.ListEnvironments(
        pb.ListEnvironmentsRequest(page_size=10_000), metadata=auth(org.owner_secret)
    )
    assert len(clamped.environments) == 4 and clamped.next_page_token == ""


async def test_forged_and_foreign_page_tokens_are_invalid(harness: Harness, org: Org) -> None:
    for i in range(3):
        await harness.new_environment(org, f"Env {i}")
    page = await harness.environments.ListEnvironments(
        pb.ListEnvironmentsRequest(page_size=1), metadata=auth(org.owner_secret)
    )
    token = page.next_page_token
    assert token
    other = await harness.new_org("Other")
    bad_requests = [
        (pb.ListEnvironmentsRequest(page_size=1, page_token="garbage"), org.owner_secret),
        (pb.ListEnvironmentsRequest(page_size=1, page_token=token[:-2] + "AA"), org.owner_secret),
        # the same token with another filter, and by another caller
        (pb.ListEnvironmentsRequest(page_size=1, page_token=token, show_deleted=True), org.owner_secret),
        (pb.ListEnvironmentsRequest(page_size=1, page_token=token), other.owner_secret),
    ]
    for request, secret in bad_requests:
        failure = await fails(
            harness.environments.ListEnvironments(request, metadata=auth(secret)),
            Code.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        )
        assert "page_token" in failure.violations


async def test_update_name_and_description_with_mask(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    updated = await harness.environments.UpdateEnvironment(
        pb.UpdateEnvironmentRequest(
            environment=pb.Environment(
                id=env.id, name="Renamed", description="new", slug="ignored", is_default=True
            ),
            update_mask=mask("name"),
        ),
        metadata=auth(org.owner_secret),
    )
    assert updated.name == "Renamed"
    assert updated.description == ""  # not in the mask: unchanged
    assert updated.slug == "staging" and not updated.is_default  # never mass-assigned
    assert updated.etag != env.etag
    assert updated.update_time.ToDatetime() >= env.update_time.ToDatetime()
    got = await harness.environments.GetEnvironment(
        pb.GetEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
    )
    assert got == updated


async def test_update_refuses_slug_and_unknown_paths(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    await fails(
        harness.environments.UpdateEnvironment(
            pb.UpdateEnvironmentRequest(
                environment=pb.Environment(id=env.id, slug="new-slug"),
                update_mask=mask("slug"),
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
        "SLUG_IMMUTABLE",
    )
    failure = await fails(
        harness.environments.UpdateEnvironment(
            pb.UpdateEnvironmentRequest(
                environment=pb.Environment(id=env.id, is_default=True),
                update_mask=mask("is_default"),
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "update_mask" in failure.violations
    await fails(
        harness.environments.UpdateEnvironment(
            pb.UpdateEnvironmentRequest(
                environment=pb.Environment(id=env.id, name=""),
                update_mask=mask("name"),
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
    )


async def test_stale_etag_is_aborted(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    description_only = mask("description")
    await harness.environments.UpdateEnvironment(
        pb.UpdateEnvironmentRequest(
            environment=pb.Environment(id=env.id, description="one", etag=env.etag),
            update_mask=description_only,
        ),
        metadata=auth(org.owner_secret),
    )
    await fails(
        harness.environments.UpdateEnvironment(
            pb.UpdateEnvironmentRequest(
                environment=pb.Environment(id=env.id, description="two", etag=env.etag),
                update_mask=description_only,
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.ABORTED,
        "ETAG_MISMATCH",
    )
    await fails(
        harness.delete_environment(org.owner_secret, env.id, env.etag),
        Code.ABORTED,
        "ETAG_MISMATCH",
    )


async def test_delete_undelete_round_trip(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    deleted = await harness.delete_environment(org.owner_secret, env.id, env.etag)
    assert deleted.state == pb.Environment.DELETED and deleted.HasField("delete_time")
    listed = await harness.environments.ListEnvironments(
        pb.ListEnvironmentsRequest(), metadata=auth(org.owner_secret)
    )
    assert env.id not in [e.id for e in listed.environments]
    with_deleted = await harness.environments.ListEnvironments(
        pb.ListEnvironmentsRequest(show_deleted=True), metadata=auth(org.owner_secret)
    )
    assert env.id in [e.id for e in with_deleted.environments]
    again = await harness.delete_environment(org.owner_secret, env.id)
    assert again == deleted  # deleting a deleted environment changes nothing
    await fails(
        harness.environments.UpdateEnvironment(
            pb.UpdateEnvironmentRequest(
                environment=pb.Environment(id=env.id, name="x"),
                update_mask=mask("name"),
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_DELETED",
    )
    restored = await harness.environments.UndeleteEnvironment(
        pb.UndeleteEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
    )
    assert restored.state == pb.Environment.ACTIVE and not restored.HasField("delete_time")
    assert restored.slug == "staging"
    await fails(
        harness.environments.UndeleteEnvironment(
            pb.UndeleteEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
        ),
        Code.ALREADY_EXISTS,
        "ENVIRONMENT_NOT_DELETED",
    )


async def test_default_environment_cannot_be_deleted(harness: Harness, org: Org) -> None:
    await fails(
        harness.delete_environment(org.owner_secret, org.default_environment.id),
        Code.FAILED_PRECONDITION,
        "DEFAULT_ENVIRONMENT_PROTECTED",
    )


async def test_missing_ids_are_invalid(harness: Harness, org: Org) -> None:
    for call in (
        harness.delete_environment(org.owner_secret, ""),
        harness.environments.UndeleteEnvironment(
            pb.UndeleteEnvironmentRequest(), metadata=auth(org.owner_secret)
        ),
        harness.environments.UpdateEnvironment(
            pb.UpdateEnvironmentRequest(update_mask=mask("name"), environment=pb.Environment(name="x")),
            metadata=auth(org.owner_secret),
        ),
    ):
        await fails(call, Code.INVALID_ARGUMENT)


async def test_ids_are_not_guessable_from_their_neighbours(harness: Harness, org: Org) -> None:
    created = await asyncio.gather(*(harness.new_environment(org, f"Burst {i}") for i in range(6)))
    randomness = sorted(int.from_bytes(ulid.ULID.from_str(env.id[4:]).bytes[6:], "big") for env in created)
    # A monotonic generator would hand out consecutive values within one millisecond.
    assert all(later - earlier > 1_000_000 for earlier, later in itertools.pairwise(randomness))
