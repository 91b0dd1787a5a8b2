"""Hostile input: values that only look valid, forged or poisoned page tokens, invisible names,
out-of-range Durations and Timestamps, no-op updates and repeated credentials.

A field whose shape is validated (a new slug, resource ids, emails, request ids, ids) refuses a
trailing newline as INVALID_ARGUMENT naming the field; a reference that is only looked up (the
environment of VerifyApiKey, GetEnvironment's slug) is matched exactly, so `staging\\n` never
finds `staging` and is simply not found.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2, environment_pb2, member_pb2, organization_pb2, resource_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from service.app.server import Application
from service.domain.pagination import PageTokens, pepper_key
from tests.harness import AS_OPERATOR, OPERATOR_TOKEN, Harness, Org, auth, fails, mask
from tests.servers import Backend, scratch_schema, serving

Code = grpc.StatusCode
Denial = api_key_pb2.VerifyApiKeyResponse.DenialReason

# -- 8: full matches ------------------------------------------------------------------------------


async def test_slug_with_a_trailing_newline_is_invalid(harness: Harness, org: Org) -> None:
    await harness.new_environment(org, "Staging", slug="staging")
    for slug in ("staging\n", "other\n", "\nother"):
        failure = await fails(
            harness.environments.CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name="Twin", slug=slug),
                metadata=auth(org.owner_secret),
            ),
            Code.INVALID_ARGUMENT,
        )
        assert "slug" in failure.violations


async def test_an_environment_reference_with_a_trailing_newline_finds_nothing(
    harness: Harness, org: Org
) -> None:
    staging = await harness.new_environment(org, "Staging", slug="staging")
    found = await harness.verify(org.owner_secret, "staging")
    assert found.valid and found.principal.environment_id == staging.id
    for reference in ("staging\n", staging.id + "\n"):
        verdict = await harness.verify(org.owner_secret, reference)
        assert not verdict.valid
        assert verdict.denial_reason == Denial.ENVIRONMENT_NOT_FOUND
    await fails(
        harness.environments.GetEnvironment(
            environment_pb2.GetEnvironmentRequest(slug="staging\n"), metadata=auth(org.owner_secret)
        ),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )


async def test_a_secret_with_a_trailing_newline_is_malformed(harness: Harness, org: Org) -> None:
    verdict = await harness.verify(org.owner_secret + "\n")
    assert not verdict.valid
    assert verdict.denial_reason == Denial.MALFORMED


_INBOX = resource_pb2.ScopedResource.INBOX


def _resource_calls(harness: Harness, org: Org, to_env_id: str) -> dict[str, Callable[[str], Awaitable[Any]]]:
    metadata = auth(org.owner_secret)
    return {
        "RegisterResource": lambda rid: harness.resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(kind=_INBOX, resource_id=rid), metadata=metadata
        ),
        "GetResource": lambda rid: harness.resources.GetResource(
            resource_pb2.GetResourceRequest(kind=_INBOX, resource_id=rid), metadata=metadata
        ),
        "DeregisterResource": lambda rid: harness.resources.DeregisterResource(
            resource_pb2.DeregisterResourceRequest(kind=_INBOX, resource_id=rid), metadata=metadata
        ),
        "ReassignResources": lambda rid: harness.resources.ReassignResources(
            resource_pb2.ReassignResourcesRequest(
                from_environment_id=org.default_environment.id,
                to_environment_id=to_env_id,
                resources=[resource_pb2.ResourceRef(kind=_INBOX, resource_id=rid)],
            ),
            metadata=metadata,
        ),
    }


@pytest.mark.parametrize(
    "method", ["RegisterResource", "GetResource", "DeregisterResource", "ReassignResources"]
)
async def test_a_resource_id_with_a_trailing_newline_is_invalid(
    harness: Harness, org: Org, method: str
) -> None:
    calls = _resource_calls(harness, org, (await harness.new_environment(org, "Target")).id)
    await calls["RegisterResource"]("inbox-1")
    call = calls[method]
    failure = await fails(call("inbox-1\n"), Code.INVALID_ARGUMENT)
    field = "resources[0].resource_id" if method == "ReassignResources" else "resource_id"
    assert field in failure.violations, failure.violations


async def test_an_email_with_a_trailing_newline_is_invalid(harness: Harness, org: Org) -> None:
    email = f"dev-{uuid.uuid4().hex[:8]}@example.com"
    failure = await fails(
        harness.members.CreateMember(
            member_pb2.CreateMemberRequest(
                email=email + "\n", display_name="Dev", role=member_pb2.Member.MEMBER
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "email" in failure.violations
    failure = await fails(
        harness.organizations.CreateOrganization(
            organization_pb2.CreateOrganizationRequest(
                name="Acme", owner_email=email + "\n", owner_display_name="O"
            ),
            metadata=AS_OPERATOR,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "owner_email" in failure.violations


@pytest.mark.parametrize(
    "request_id",
    ["{uuid}\n", "\n{uuid}", " {uuid}", "{{{uuid}}}", "urn:uuid:{uuid}"],
)
async def test_a_request_id_must_be_exactly_a_uuid(harness: Harness, org: Org, request_id: str) -> None:
    failure = await fails(
        harness.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(
                name="Retry", request_id=request_id.format(uuid=uuid.uuid4())
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "request_id" in failure.violations


async def test_a_request_id_without_hyphens_is_the_same_request(harness: Harness, org: Org) -> None:
    request_id = uuid.uuid4()
    first = await harness.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name="Once", request_id=str(request_id)),
        metadata=auth(org.owner_secret),
    )
    again = await harness.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name="Once", request_id=request_id.hex),
        metadata=auth(org.owner_secret),
    )
    assert again.id == first.id


async def test_an_id_with_a_trailing_newline_is_invalid(harness: Harness, org: Org) -> None:
    metadata = auth(org.owner_secret)
    calls: list[tuple[Awaitable[Any], str]] = [
        (
            harness.api_keys.GetApiKey(
                api_key_pb2.GetApiKeyRequest(id=org.owner_key_id + "\n"), metadata=metadata
            ),
            "id",
        ),
        (
            harness.members.GetMember(
                member_pb2.GetMemberRequest(id=org.owner_member_id + "\n"), metadata=metadata
            ),
            "id",
        ),
        (
            harness.api_keys.CreateApiKey(
                api_key_pb2.CreateApiKeyRequest(
                    name="k", scopes=["inboxes:read"], environment_ids=[org.default_environment.id + "\n"]
                ),
                metadata=metadata,
            ),
            "environment_ids",
        ),
    ]
    for call, field in calls:
        failure = await fails(call, Code.INVALID_ARGUMENT)
        assert field in failure.violations, failure.violations


# -- 9: page tokens -------------------------------------------------------------------------------


async def _member_ids(harness: Harness, org: Org, count: int) -> list[str]:
    for _ in range(count):
        await harness.new_member(org, "MEMBER")
    listed = await harness.members.ListMembers(
        member_pb2.ListMembersRequest(), metadata=auth(org.owner_secret)
    )
    return [member.id for member in listed.members]


async def test_a_token_signed_with_the_former_fixed_key_is_refused(harness: Harness, org: Org) -> None:
    members = await _member_ids(harness, org, 2)
    forger = PageTokens(None)
    forger.use_key(pepper_key(""))  # what every server without a pepper used to sign with
    forged = forger.encode((members[0],), ("ListMembers", org.owner_key_id))
    await fails(
        harness.members.ListMembers(
            member_pb2.ListMembersRequest(page_token=forged), metadata=auth(org.owner_secret)
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


@pytest.mark.parametrize("cursor", ["\x00", "mem_\x00", "\ud800", "mem_\udfff", "x" * 201])
async def test_a_signed_token_with_a_poisoned_cursor_is_refused(
    harness: Harness, org: Org, cursor: str
) -> None:
    """Signed with the server's own key, as anyone who learnt it could: the cursor is still
    checked before it reaches a query."""
    tokens = harness.app.dependencies.pager.tokens
    env_id = org.default_environment.id
    metadata = auth(org.owner_secret)
    calls: list[Awaitable[Any]] = [
        harness.members.ListMembers(
            member_pb2.ListMembersRequest(
                page_token=tokens.encode((cursor,), ("ListMembers", org.owner_key_id))
            ),
            metadata=metadata,
        ),
        harness.api_keys.ListApiKeys(
            api_key_pb2.ListApiKeysRequest(
                page_token=tokens.encode((cursor,), ("ListApiKeys", org.owner_key_id, "", False))
            ),
            metadata=metadata,
        ),
        harness.resources.ListResources(
            resource_pb2.ListResourcesRequest(
                page_token=tokens.encode(("INBOX", cursor), ("ListResources", org.owner_key_id, env_id, ""))
            ),
            metadata=metadata,
        ),
        harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(
                page_token=tokens.encode((cursor,), ("ListEnvironments", org.owner_key_id, False))
            ),
            metadata=metadata,
        ),
    ]
    for call in calls:
        await fails(call, Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_a_well_formed_signed_cursor_is_accepted(harness: Harness, org: Org) -> None:
    """The counterpart of the poisoned cursors: the same construction with a real id works."""
    members = await _member_ids(harness, org, 2)
    token = harness.app.dependencies.pager.tokens.encode((members[0],), ("ListMembers", org.owner_key_id))
    page = await harness.members.ListMembers(
        member_pb2.ListMembersRequest(page_token=token), metadata=auth(org.owner_secret)
    )
    assert [member.id for member in page.members] == members[1:]


async def test_servers_on_one_database_accept_each_others_tokens(harness: Harness, backend: Backend) -> None:
    org = await harness.new_org()
    members = await _member_ids(harness, org, 3)
    async with serving(backend) as other:
        seen: list[str] = []
        token = ""
        servers = [harness, other]
        for turn in range(len(members)):
            page = await servers[turn % 2].members.ListMembers(
                member_pb2.ListMembersRequest(page_size=1, page_token=token), metadata=auth(org.owner_secret)
            )
            seen += [member.id for member in page.members]
            token = page.next_page_token
        assert seen == members and token == ""


@pytest.fixture
async def fresh_backend(backend: Backend, tmp_path: Path) -> AsyncIterator[Backend]:
    """An empty database of the same kind as `backend`: a new SQLite file or PostgreSQL schema."""
    if backend.name == "sqlite":
        yield Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}", None)
        return
    async with scratch_schema(backend.url, "agentpost_fresh") as schema:
        yield Backend("postgres", backend.url, schema)


async def test_servers_starting_together_on_a_new_database_agree_on_one_key(fresh_backend: Backend) -> None:
    """The first start stores the key; servers racing to be first all end up with that one."""
    apps = [Application(fresh_backend.settings()) for _ in range(4)]
    channels: list[grpc.aio.Channel] = []
    try:
        await apps[0].migrate()
        await asyncio.gather(*(app.start() for app in apps))
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") for app in apps]
        servers = [
            Harness(app, channel, fresh_backend.name) for app, channel in zip(apps, channels, strict=True)
        ]
        org = await servers[0].new_org()
        members = await _member_ids(servers[0], org, len(servers))
        seen: list[str] = []
        token = ""
        for server in servers:
            page = await server.members.ListMembers(
                member_pb2.ListMembersRequest(page_size=1, page_token=token), metadata=auth(org.owner_secret)
            )
            seen += [member.id for member in page.members]
            token = page.next_page_token
        assert seen == members[: len(servers)]
    finally:
        for channel in channels:
            await channel.close()
        for app in apps:
            await app.stop(grace=0)


async def test_servers_with_the_same_pepper_share_tokens_without_the_stored_key(backend: Backend) -> None:
    """With a pepper the key is derived from it, so peppered replicas agree on their own."""
    async with (
        serving(backend, key_pepper="pepper-for-tests") as first,
        serving(backend, key_pepper="pepper-for-tests") as second,
    ):
        org = await first.new_org()
        members = await _member_ids(first, org, 2)
        page = await first.members.ListMembers(
            member_pb2.ListMembersRequest(page_size=1), metadata=auth(org.owner_secret)
        )
        rest = await second.members.ListMembers(
            member_pb2.ListMembersRequest(page_token=page.next_page_token), metadata=auth(org.owner_secret)
        )
        assert [member.id for member in (*page.members, *rest.members)] == members


# -- 10: invisible names, ranges, no-op updates, repeated credentials ----------------------------

_INVISIBLE_OR_REORDERING = [
    "\u202e",
    "\u200b",
    "\ufeff",
    "\u200b\ufeff\u2060",
    "\u3164",
    "\u0301",
    "Staging\u202e",
    "gnp\u202e.exe",
    "a\u2066b\u2069",
    "\u202aleft\u202c",
]


@pytest.mark.parametrize("name", _INVISIBLE_OR_REORDERING)
async def test_invisible_or_reordering_names_are_refused(harness: Harness, org: Org, name: str) -> None:
    metadata = auth(org.owner_secret)
    env = await harness.new_environment(org, "Visible")
    calls: list[tuple[Awaitable[Any], str]] = [
        (
            harness.environments.CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name=name, slug=f"e-{uuid.uuid4().hex[:8]}"),
                metadata=metadata,
            ),
            "name",
        ),
        (
            harness.environments.UpdateEnvironment(
                environment_pb2.UpdateEnvironmentRequest(
                    environment=environment_pb2.Environment(id=env.id, name=name),
                    update_mask=mask("name"),
                ),
                metadata=metadata,
            ),
            "environment.name",
        ),
        (
            harness.api_keys.CreateApiKey(
                api_key_pb2.CreateApiKeyRequest(name=name, scopes=["inboxes:read"]), metadata=metadata
            ),
            "name",
        ),
        (
            harness.members.CreateMember(
                member_pb2.CreateMemberRequest(
                    email=f"m-{uuid.uuid4().hex[:8]}@example.com",
                    display_name=name,
                    role=member_pb2.Member.MEMBER,
                ),
                metadata=metadata,
            ),
            "display_name",
        ),
    ]
    for call, field in calls:
        failure = await fails(call, Code.INVALID_ARGUMENT)
        assert field in failure.violations, failure.violations


@pytest.mark.parametrize(
    "name",
    [
        "Ünïcode staging",
        "café\u0301",
        "👩\u200d💻 team",
        "עברית",
        "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    ],
)
async def test_visible_names_with_joiners_and_marks_are_accepted(
    harness: Harness, org: Org, name: str
) -> None:
    env = await harness.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name=name, slug=f"v-{uuid.uuid4().hex[:8]}"),
        metadata=auth(org.owner_secret),
    )
    assert env.name == name


_BAD_DURATIONS = [
    (315_576_000_001, 0),
    (-315_576_000_001, 0),
    (2**62, 0),
    (1, -5),
    (-1, 5),
    (0, 1_000_000_000),
    (0, -1_000_000_000),
]


@pytest.mark.parametrize(("seconds", "nanos"), _BAD_DURATIONS)
async def test_a_duration_outside_its_range_is_invalid(
    harness: Harness, org: Org, seconds: int, nanos: int
) -> None:
    key, _ = await harness.new_key(org, ["inboxes:read"])
    failure = await fails(
        harness.api_keys.RollApiKey(
            api_key_pb2.RollApiKeyRequest(
                id=key.id, previous_key_ttl=duration_pb2.Duration(seconds=seconds, nanos=nanos)
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "previous_key_ttl" in failure.violations


async def test_a_valid_duration_with_nanos_still_rolls(harness: Harness, org: Org) -> None:
    key, _ = await harness.new_key(org, ["inboxes:read"])
    rolled = await harness.api_keys.RollApiKey(
        api_key_pb2.RollApiKeyRequest(
            id=key.id, previous_key_ttl=duration_pb2.Duration(seconds=60, nanos=500)
        ),
        metadata=auth(org.owner_secret),
    )
    assert rolled.previous_api_key.expire_time.seconds > 0


_BAD_TIMESTAMPS = [
    (253_402_300_800, 0),
    (-62_135_596_801, 0),
    (2**62, 0),
    (4_000_000_000, -1),
    (4_000_000_000, 1_000_000_000),
]


@pytest.mark.parametrize(("seconds", "nanos"), _BAD_TIMESTAMPS)
async def test_a_timestamp_outside_its_range_is_invalid(
    harness: Harness, org: Org, seconds: int, nanos: int
) -> None:
    stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    failure = await fails(
        harness.api_keys.CreateApiKey(
            api_key_pb2.CreateApiKeyRequest(name="k", scopes=["inboxes:read"], expire_time=stamp),
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "expire_time" in failure.violations
    key, _ = await harness.new_key(org, ["inboxes:read"])
    failure = await fails(
        harness.update_key(org.owner_secret, api_key_pb2.ApiKey(id=key.id, expire_time=stamp), "expire_time"),
        Code.INVALID_ARGUMENT,
    )
    assert "api_key.expire_time" in failure.violations


async def test_an_update_that_changes_nothing_keeps_etag_and_update_time(harness: Harness, org: Org) -> None:
    metadata = auth(org.owner_secret)
    env = await harness.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name="Same", description="as before"), metadata=metadata
    )
    for paths in (["name", "description"], ["*"], []):
        same = await harness.environments.UpdateEnvironment(
            environment_pb2.UpdateEnvironmentRequest(
                environment=environment_pb2.Environment(
                    id=env.id, name="Same", description="as before", etag=env.etag
                ),
                update_mask=mask(*paths),
            ),
            metadata=metadata,
        )
        assert same == env
    fetched = await harness.environments.GetEnvironment(
        environment_pb2.GetEnvironmentRequest(id=env.id), metadata=metadata
    )
    assert fetched == env
    # A stale etag is still refused, change or not.
    changed = await harness.environments.UpdateEnvironment(
        environment_pb2.UpdateEnvironmentRequest(
            environment=environment_pb2.Environment(id=env.id, name="Different", etag=env.etag),
            update_mask=mask("name"),
        ),
        metadata=metadata,
    )
    assert changed.etag != env.etag
    await fails(
        harness.environments.UpdateEnvironment(
            environment_pb2.UpdateEnvironmentRequest(
                environment=environment_pb2.Environment(id=env.id, name="Different", etag=env.etag),
                update_mask=mask("name"),
            ),
            metadata=metadata,
        ),
        Code.ABORTED,
        "ETAG_MISMATCH",
    )


async def test_two_authorization_entries_are_malformed(harness: Harness, org: Org) -> None:
    _, other_secret = await harness.new_key(org, ["environments:read"])
    valid = f"Bearer {org.owner_secret}"
    for entries in (
        (valid, valid),
        (valid, f"Bearer {other_secret}"),
        ("Bearer ap_sk_live_not-a-key", valid),
        (valid, "Bearer ap_sk_live_not-a-key"),
    ):
        await fails(
            harness.environments.ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(),
                metadata=tuple(("authorization", entry) for entry in entries),
            ),
            Code.UNAUTHENTICATED,
            "CREDENTIALS_MALFORMED",
        )
    operator = f"Bearer {OPERATOR_TOKEN}"
    await fails(
        harness.organizations.CreateOrganization(
            organization_pb2.CreateOrganizationRequest(
                name="Twice", owner_email="twice@example.com", owner_display_name="Owner"
            ),
            metadata=(("authorization", operator), ("authorization", operator)),
        ),
        Code.UNAUTHENTICATED,
        "CREDENTIALS_MALFORMED",
    )
    # One entry still works.
    await harness.environments.ListEnvironments(
        environment_pb2.ListEnvironmentsRequest(), metadata=(("authorization", valid),)
    )
