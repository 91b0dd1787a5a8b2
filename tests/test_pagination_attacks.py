"""Attacks on pagination, on every List RPC: page sizes at their edges, tokens replayed by other
callers (another key, a rolled or revoked one, another organization), on other servers (a replica
of the same database, a server of another database), tokens mangled byte by byte or sent to
another list, lists changing between pages, and a caller's reach shrinking between pages.

SPEC §2: page_size 0 → 50, max 500 (clamped), negative INVALID_ARGUMENT; opaque tokens; keyset
order by id; a token from another query or caller is INVALID_ARGUMENT. README: tokens are
HMAC-signed, bound to the method, the calling key and every filter (INVALID_PAGE_TOKEN), and every
page re-applies the caller's reach and filters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import (
    api_key_pb2,
    environment_pb2,
    event_pb2,
    event_pb2_grpc,
    member_pb2,
    resource_pb2,
)
from google.protobuf import duration_pb2
from sqlalchemy import select

from service.domain import scopes
from service.storage.server_secrets import PAGE_TOKEN_KEY
from service.storage.tables import ServerSecretRow
from tests.harness import Harness, Org, auth, corrupt, fails, failure_of
from tests.servers import Backend, scratch_schema, serving
from tests.writes import register_call

Code = grpc.StatusCode
INBOX = resource_pb2.ScopedResource.INBOX
LABEL = resource_pb2.ScopedResource.LABEL
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
ALL = list(scopes.ALL_SCOPES)


@dataclass
class World:
    """One organization with at least three items in every list, all within one page of 50."""

    org: Org
    env: environment_pb2.Environment  # holds the environment members and the INBOX resources
    gone: environment_pb2.Environment  # deleted; holds the orphaned LABEL resources
    environment_ids: list[str]  # the active environments, the default one included
    member_ids: list[str]  # the members added to `env`


async def build_world(harness: Harness, org: Org) -> World:
    """Three more environments, three members given `env`, three more keys, three resources in
    `env` and three orphans in a deleted environment."""
    envs = [await harness.new_environment(org, f"Paged {index}") for index in range(3)]
    env = envs[0]
    member_ids = []
    for _ in range(3):
        member = await harness.new_member(org, "MEMBER")
        await harness.add_environment_member(org.owner_secret, env.id, member.id)
        member_ids.append(member.id)
    for index in range(3):
        await harness.new_key(org, ["environments:read"], [env.id], name=f"extra {index}")
    for index in range(3):
        await register_call(harness, org.owner_secret, f"inbox-{index}", env.id)
    gone = await harness.new_environment(org, "Gone")
    for index in range(3):
        await register_call(harness, org.owner_secret, f"orphan-{index}", gone.id, kind=LABEL)
    await harness.delete_environment(org.owner_secret, gone.id)
    return World(org, env, gone, [org.default_environment.id, *(e.id for e in envs)], member_ids)


@pytest.fixture
async def world(harness: Harness, org: Org) -> World:
    """A fresh populated organization for one test."""
    return await build_world(harness, org)


Listed = tuple[list[str], str]
Call = Callable[[Harness, World, str, int, str], Awaitable[Listed]]


async def _environments(h: Harness, w: World, secret: str, size: int, token: str) -> Listed:
    page = await h.environments.ListEnvironments(
        environment_pb2.ListEnvironmentsRequest(page_size=size, page_token=token), metadata=auth(secret)
    )
    return [env.id for env in page.environments], page.next_page_token


async def _members(h: Harness, w: World, secret: str, size: int, token: str) -> Listed:
    page = await h.members.ListMembers(
        member_pb2.ListMembersRequest(page_size=size, page_token=token), metadata=auth(secret)
    )
    return [member.id for member in page.members], page.next_page_token


async def _environment_members(h: Harness, w: World, secret: str, size: int, token: str) -> Listed:
    page = await h.members.ListEnvironmentMembers(
        member_pb2.ListEnvironmentMembersRequest(environment_id=w.env.id, page_size=size, page_token=token),
        metadata=auth(secret),
    )
    return [item.member_id for item in page.environment_members], page.next_page_token


async def _member_environments(h: Harness, w: World, secret: str, size: int, token: str) -> Listed:
    page = await h.members.ListMemberEnvironments(
        member_pb2.ListMemberEnvironmentsRequest(
            member_id=w.org.owner_member_id, page_size=size, page_token=token
        ),
        metadata=auth(secret),
    )
    return [env.id for env in page.environments], page.next_page_token


async def _api_keys(h: Harness, w: World, secret: str, size: int, token: str) -> Listed:
    page = await h.api_keys.ListApiKeys(
        api_key_pb2.ListApiKeysRequest(page_size=size, page_token=token), metadata=auth(secret)
    )
    return [key.id for key in page.api_keys], page.next_page_token


async def _resources(h: Harness, w: World, secret: str, size: int, token: str) -> Listed:
    page = await h.resources.ListResources(
        resource_pb2.ListResourcesRequest(page_size=size, page_token=token), metadata=auth(secret, w.env.id)
    )
    return [f"{item.kind}:{item.resource_id}" for item in page.resources], page.next_page_token


async def _orphans(h: Harness, w: World, secret: str, size: int, token: str) -> Listed:
    page = await h.resources.ListOrphanedResources(
        resource_pb2.ListOrphanedResourcesRequest(environment_id=w.gone.id, page_size=size, page_token=token),
        metadata=auth(secret),
    )
    return [f"{item.kind}:{item.resource_id}" for item in page.resources], page.next_page_token


async def _events(h: Harness, w: World, secret: str, size: int, token: str) -> Listed:
    page = await event_pb2_grpc.EventServiceStub(h.channel).ListEvents(
        event_pb2.ListEventsRequest(page_size=size, page_token=token), metadata=auth(secret)
    )
    # Events are ordered by revision, newest first, not by id: the revision leads each entry.
    return [f"{event.revision:010d}/{event.id}" for event in page.events], page.next_page_token


LISTS: dict[str, Call] = {
    "ListEnvironments": _environments,
    "ListMembers": _members,
    "ListEnvironmentMembers": _environment_members,
    "ListMemberEnvironments": _member_environments,
    "ListApiKeys": _api_keys,
    "ListResources": _resources,
    "ListOrphanedResources": _orphans,
    "ListEvents": _events,
}
NAMES = list(LISTS)


async def walk(h: Harness, w: World, name: str, secret: str, sizes: list[int]) -> list[str]:
    """Every item of a list, page by page, cycling through `sizes`."""
    seen: list[str] = []
    token = ""
    for turn in range(1000):
        ids, token = await LISTS[name](h, w, secret, sizes[turn % len(sizes)], token)
        seen += ids
        if not token:
            return seen
    raise AssertionError(f"{name} never ended")


async def first_token(h: Harness, w: World, name: str, secret: str) -> tuple[list[str], str]:
    """The first page of one item, and its token (there must be more)."""
    ids, token = await LISTS[name](h, w, secret, 1, "")
    assert len(ids) == 1 and token, (name, ids, token)
    return ids, token


async def refused_token(call: Awaitable[Listed]) -> None:
    """The call must be INVALID_ARGUMENT INVALID_PAGE_TOKEN naming `page_token`."""
    failure = await fails(call, Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    assert "page_token" in failure.violations, failure


def in_order(name: str, ids: list[str]) -> bool:
    """Keyset order: ascending ids (events: newest revision first)."""
    if name == "ListEvents":
        revisions = [entry.split("/")[0] for entry in ids]
        return revisions == sorted(revisions, reverse=True)
    return ids == sorted(ids)


# -- 3. page sizes at their edges -----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
async def test_page_sizes_at_their_edges_on_every_list(harness: Harness, world: World, name: str) -> None:
    """On every list: 0, 500, 501 and INT32_MAX all answer the whole (short) list in one page
    with no token; 1 answers one item and a token; walking with the size changed on every page
    (1, 2, 0, 500) gives exactly the whole list, each item once, in keyset order; -1 and INT32_MIN
    are INVALID_ARGUMENT naming page_size, with or without a valid token."""
    call = LISTS[name]
    owner = world.org.owner_secret
    whole, token = await call(harness, world, owner, 500, "")
    assert len(whole) >= 3 and token == "", (whole, token)
    assert in_order(name, whole), whole
    for size in (0, 501, INT32_MAX):
        assert await call(harness, world, owner, size, "") == (whole, ""), size
    one, token = await first_token(harness, world, name, owner)
    assert one == whole[:1]
    assert await walk(harness, world, name, owner, [1, 2, 0, 500]) == whole
    assert await walk(harness, world, name, owner, [1]) == whole
    for size in (-1, INT32_MIN):
        for with_token in ("", token):
            failure = await fails(call(harness, world, owner, size, with_token), Code.INVALID_ARGUMENT)
            assert "page_size" in failure.violations, (size, failure)


# -- 2. mangled tokens, and tokens of another list ------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def mangled(token: str) -> dict[str, str]:
    """Tokens that are not the token: each must be refused."""
    middle = len(token) // 2
    return {
        "flipped first": corrupt(token, 0),
        "flipped tenth": corrupt(token, 10),
        "flipped middle": corrupt(token, middle),
        "flipped third from the end": corrupt(token, -3),
        "truncated by one": token[:-1],
        "truncated by four": token[:-4],
        "half": token[:middle],
        "doubled": token + token,
        "lone padding": "=",
        "padding only": "====",
        "a space": " ",
        "a tab and newline": "\t\n",
        "one letter": "A",
        "100 KB of letters": "A" * 100_000,
        "100 KB of padding": "=" * 100_000,
        "non-ascii appended": token + "é",
        "json array": _b64(b"[]"),
        "json null": _b64(b"null"),
        "json with no signature": _b64(json.dumps({"b": '{"a":["x"],"q":"y"}'}).encode()),
        "json with a list signature": _b64(json.dumps({"b": "{}", "s": ["x"]}).encode()),
        "json with a huge number": _b64(b"1" * 10_000),
        "invalid utf-8": _b64(b"\xff\xfe\xfd"),
    }


def variants(token: str) -> dict[str, str]:
    """The same bytes spelled another way: refused, or the very same page (never another one)."""
    return {
        "one padding": token + "=",
        "two padding": token + "==",
        "four padding": token + "====",
        "leading space": " " + token,
        "trailing newline": token + "\n",
        "nul inside": token[: len(token) // 2] + "\x00" + token[len(token) // 2 :],
        "punctuation inside": token[: len(token) // 2] + "!*." + token[len(token) // 2 :],
        "standard alphabet": token.replace("-", "+").replace("_", "/"),
        "correctly padded": token + "=" * (-len(token) % 4),
    }


@pytest.mark.parametrize("name", NAMES)
async def test_mangled_tokens_are_cleanly_refused_on_every_list(
    harness: Harness, world: World, name: str
) -> None:
    """On every list, a token with a character flipped, truncated, doubled, blank-looking, 100 KB
    long, non-ASCII, or a well-formed base64 of hostile JSON (nested 75,000 deep, a 10,000-digit
    number, a missing or non-string signature) is INVALID_ARGUMENT INVALID_PAGE_TOKEN, never
    INTERNAL/UNKNOWN and never a page. Base64 spellings of the same bytes (padding, the standard
    alphabet, white space) answer either the refusal or exactly the genuine token's page."""
    call = LISTS[name]
    owner = world.org.owner_secret
    _, token = await first_token(harness, world, name, owner)
    genuine = await call(harness, world, owner, 1, token)
    problems: list[str] = []
    for label, bad in mangled(token).items():
        try:
            answer = await call(harness, world, owner, 1, bad)
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            if (failure.code, failure.reason) != (Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"):
                problems.append(f"{label}: {failure.code.name} {failure.reason} {failure.message[:80]}")
            continue
        problems.append(f"{label}: answered a page {answer}")
    for label, spelling in variants(token).items():
        try:
            answer = await call(harness, world, owner, 1, spelling)
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            if (failure.code, failure.reason) != (Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"):
                problems.append(f"{label}: {failure.code.name} {failure.reason} {failure.message[:80]}")
            continue
        if answer != genuine:
            problems.append(f"{label}: answered another page {answer} than {genuine}")
    assert problems == [], f"{name}: " + "; ".join(problems)


@pytest.mark.parametrize("name", NAMES)
async def test_a_deeply_nested_json_token_is_invalid_page_token_not_internal(
    harness: Harness, world: World, name: str
) -> None:
    """A page token is client input: valid base64 of JSON nested 75,000 arrays (or 20,000
    objects) deep must be INVALID_ARGUMENT INVALID_PAGE_TOKEN like any other bad token (SPEC §2:
    never INTERNAL for anything a client sent), on every list."""
    owner = world.org.owner_secret
    for hostile in (b"[" * 75_000, b'{"b":' * 20_000):
        await refused_token(LISTS[name](harness, world, owner, 1, _b64(hostile)))


async def test_a_token_of_one_list_is_refused_by_every_other_list(harness: Harness, world: World) -> None:
    """A genuine token from each list, sent by the same caller to each of the seven other lists
    (ListEnvironments and ListMemberEnvironments even share the cursor's shape, an environment
    id), is INVALID_PAGE_TOKEN: the method is part of what a token is bound to."""
    owner = world.org.owner_secret
    tokens = {name: (await first_token(harness, world, name, owner))[1] for name in NAMES}
    for source, token in tokens.items():
        for target in NAMES:
            if target != source:
                await refused_token(LISTS[target](harness, world, owner, 1, token))


# -- 1. tokens of other callers -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
async def test_tokens_of_other_callers_are_refused_on_every_list(
    harness: Harness, world: World, name: str
) -> None:
    """On every list, a token is refused (INVALID_PAGE_TOKEN) when sent with identical filters by
    another organization-wide key of the same organization holding every scope, and by the
    successor of its rolled key; another organization's owner gets no page either
    (INVALID_PAGE_TOKEN, or NOT_FOUND for an environment it cannot see). The rolled key itself,
    still inside its overlap, continues its own token; once revoked it is UNAUTHENTICATED."""
    call = LISTS[name]
    org = world.org
    first_key, first_secret = await harness.new_key(org, ALL, name="first")
    _, other_secret = await harness.new_key(org, ALL, name="other")
    whole, _ = await call(harness, world, first_secret, 500, "")
    _, token = await call(harness, world, first_secret, 1, "")
    assert token
    await refused_token(call(harness, world, other_secret, 1, token))

    stranger = await harness.new_org("Stranger")
    try:
        answer = await call(harness, world, stranger.owner_secret, 1, token)
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        assert (failure.code, failure.reason) in (
            (Code.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"),
            (Code.NOT_FOUND, "ENVIRONMENT_NOT_FOUND"),
        ), failure
    else:
        raise AssertionError(f"another organization's owner got a page: {answer}")

    rolled = await harness.api_keys.RollApiKey(
        api_key_pb2.RollApiKeyRequest(id=first_key.id, previous_key_ttl=duration_pb2.Duration(seconds=3600)),
        metadata=auth(org.owner_secret),
    )
    assert rolled.api_key.id != first_key.id
    await refused_token(call(harness, world, rolled.secret, 1, token))
    if name == "ListEvents":
        # The roll itself is a newer event; the page after the token is unchanged.
        ids, _ = await call(harness, world, first_secret, 1, token)
        assert ids == whole[1:2]
    elif name != "ListApiKeys":  # the successor joins the keys after the cursor
        assert (await call(harness, world, first_secret, 500, token))[0] == whole[1:]
    await harness.api_keys.RevokeApiKey(
        api_key_pb2.RevokeApiKeyRequest(id=first_key.id), metadata=auth(org.owner_secret)
    )
    await fails(call(harness, world, first_secret, 1, token), Code.UNAUTHENTICATED)


async def test_a_narrower_key_cannot_page_on_with_a_wider_keys_token(harness: Harness, world: World) -> None:
    """A key confined to one environment, holding every scope, replays the owner's tokens of
    ListApiKeys, ListEnvironments, ListEnvironmentMembers and ListEvents: INVALID_PAGE_TOKEN each
    time, so it never sees on page 2 what its own page 1 would not show."""
    org = world.org
    _, narrow = await harness.new_key(org, ALL, [world.env.id], name="narrow")
    for name in ("ListApiKeys", "ListEnvironments", "ListEnvironmentMembers", "ListEvents"):
        _, token = await first_token(harness, world, name, org.owner_secret)
        await refused_token(LISTS[name](harness, world, narrow, 1, token))
    # Its own walk shows only keys confined to its environment.
    keys = await harness.api_keys.ListApiKeys(api_key_pb2.ListApiKeysRequest(), metadata=auth(narrow))
    assert keys.api_keys and all(list(key.environment_ids) == [world.env.id] for key in keys.api_keys)


# -- 1. other servers: a replica of the same database, a server of another database ---------------


async def test_a_replica_of_the_same_database_continues_every_list(
    harness: Harness, backend: Backend, world: World
) -> None:
    """Page tokens are the database's: every list walked one item a page, alternating between
    this server and a second one on the same database, gives exactly the whole list."""
    owner = world.org.owner_secret
    async with serving(backend) as replica:
        servers = [harness, replica]
        for name in NAMES:
            whole, _ = await LISTS[name](harness, world, owner, 500, "")
            seen: list[str] = []
            token = ""
            for turn in range(100):
                ids, token = await LISTS[name](servers[turn % 2], world, owner, 1, token)
                seen += ids
                if not token:
                    break
            assert seen == whole, name


@pytest.fixture
async def other_database(backend: Backend, tmp_path: Path) -> AsyncIterator[Backend]:
    """An empty database of the same kind: a new SQLite file or a new PostgreSQL schema."""
    if backend.name == "sqlite":
        yield Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'other.db'}", None)
        return
    async with scratch_schema(backend.url, "agentpost_pages") as schema:
        yield Backend("postgres", backend.url, schema)


async def stored_page_key(harness: Harness) -> bytes:
    """The page-token key stored in a server's database."""
    async with harness.app.engine.connect() as connection:
        value = await connection.scalar(
            select(ServerSecretRow.value).where(ServerSecretRow.name == PAGE_TOKEN_KEY)
        )
    assert value
    return bytes.fromhex(value)


def resigned(token: str, key: bytes) -> str:
    """The token's own body, signed again with `key` as README describes (HMAC-SHA-256)."""
    outer = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    body = outer["b"].encode()
    signature = hmac.new(key, body, hashlib.sha256).hexdigest()[:32]
    return _b64(json.dumps({"b": outer["b"], "s": signature}, separators=(",", ":")).encode())


async def test_a_token_signed_by_another_database_is_refused_on_every_list(
    harness: Harness, world: World, other_database: Backend
) -> None:
    """Without a pepper each database has its own random key: the genuine body of each list's
    token, signed with another database's stored key, is INVALID_PAGE_TOKEN here; signed again
    with this database's own key (the control) it answers the genuine next page."""
    owner = world.org.owner_secret
    own_key = await stored_page_key(harness)
    async with serving(other_database) as elsewhere:
        foreign_key = await stored_page_key(elsewhere)
    assert foreign_key != own_key
    for name in NAMES:
        _, token = await first_token(harness, world, name, owner)
        genuine = await LISTS[name](harness, world, owner, 1, token)
        assert await LISTS[name](harness, world, owner, 1, resigned(token, own_key)) == genuine, name
        await refused_token(LISTS[name](harness, world, owner, 1, resigned(token, foreign_key)))


# -- 4. lists changing between pages --------------------------------------------------------------


async def churn(h: Harness, w: World, name: str, last: str, step: int) -> str | None:
    """Between two pages: removes the item just listed last (where that is allowed) and adds a
    new one. Returns the id of what was removed."""
    owner = w.org.owner_secret
    removed: str | None = None
    if name in ("ListEnvironments", "ListMemberEnvironments"):
        if last != w.org.default_environment.id:
            await h.delete_environment(owner, last)
            removed = last
        await h.new_environment(w.org, f"Late {step}")
    elif name == "ListMembers":
        if last != w.org.owner_member_id:
            await h.members.DeleteMember(member_pb2.DeleteMemberRequest(id=last), metadata=auth(owner))
            removed = last
        await h.new_member(w.org, "MEMBER")
    elif name == "ListEnvironmentMembers":
        await h.members.RemoveEnvironmentMember(
            member_pb2.RemoveEnvironmentMemberRequest(environment_id=w.env.id, member_id=last),
            metadata=auth(owner),
        )
        removed = last
        member = await h.new_member(w.org, "MEMBER")
        await h.add_environment_member(owner, w.env.id, member.id)
    elif name == "ListApiKeys":
        if last != w.org.owner_key_id:
            await h.api_keys.RevokeApiKey(api_key_pb2.RevokeApiKeyRequest(id=last), metadata=auth(owner))
            removed = last
        await h.new_key(w.org, ["environments:read"], name=f"late {step}")
    elif name == "ListResources":
        resource_id = last.split(":", 1)[1]
        await h.resources.DeregisterResource(
            resource_pb2.DeregisterResourceRequest(kind=INBOX, resource_id=resource_id),
            metadata=auth(owner, w.env.id),
        )
        removed = last
        await register_call(h, owner, f"inbox-{step}-late", w.env.id)
    elif name == "ListOrphanedResources":
        await h.resources.ReassignResources(
            resource_pb2.ReassignResourcesRequest(
                from_environment_id=w.gone.id,
                to_environment_id=w.env.id,
                resources=[resource_pb2.ResourceRef(kind=LABEL, resource_id=last.split(":", 1)[1])],
            ),
            metadata=auth(owner),
        )
        removed = last
    else:  # ListEvents: nothing to remove, and the new events are newer than every cursor
        await register_call(h, owner, f"event-{step}", w.env.id)
    return removed


@pytest.mark.parametrize("name", NAMES)
async def test_pages_survive_removing_the_last_listed_item_on_every_list(
    harness: Harness, world: World, name: str
) -> None:
    """On every list, paged two at a time while, between pages, the item each page ended with is
    removed (deleted, revoked, deregistered, reassigned away) and a new item is added: the walk
    ends, lists nothing twice, keeps keyset order, and shows every item that was there
    throughout."""
    owner = world.org.owner_secret
    before, _ = await LISTS[name](harness, world, owner, 500, "")
    seen: list[str] = []
    removed: set[str] = set()
    token = ""
    for step in range(100):
        ids, token = await LISTS[name](harness, world, owner, 2, token)
        seen += ids
        if not token:
            break
        gone = await churn(harness, world, name, ids[-1], step)
        if gone:
            removed.add(gone)
    else:
        raise AssertionError("the walk never ended")
    assert len(seen) == len(set(seen)), seen
    assert in_order(name, seen), seen
    missing = set(before) - removed - set(seen)
    assert not missing, missing


# -- 5. a filter that becomes invalid between pages -----------------------------------------------


async def test_environment_bound_lists_after_their_environment_goes(harness: Harness, world: World) -> None:
    """Page 1 of ListResources in an environment's context, then the environment is deleted: its
    token answers FAILED_PRECONDITION ENVIRONMENT_DELETED, not a page. ListEnvironmentMembers of
    it, still visible when deleted (README), continues exactly where it stopped. A member deleted
    between pages of ListMemberEnvironments is NOT_FOUND, not a page."""
    owner = world.org.owner_secret
    _, resources_token = await first_token(harness, world, "ListResources", owner)
    members, members_token = await first_token(harness, world, "ListEnvironmentMembers", owner)
    member_id = world.member_ids[0]
    await harness.add_environment_member(owner, world.environment_ids[2], member_id)
    first = await harness.members.ListMemberEnvironments(
        member_pb2.ListMemberEnvironmentsRequest(member_id=member_id, page_size=1), metadata=auth(owner)
    )
    assert len(first.environments) == 1 and first.next_page_token
    await harness.delete_environment(owner, world.env.id)

    await fails(
        _resources(harness, world, owner, 50, resources_token),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_DELETED",
    )
    rest, _ = await _environment_members(harness, world, owner, 50, members_token)
    assert members + rest == sorted(world.member_ids)
    orphans, _ = await _orphans(harness, World(world.org, world.gone, world.env, [], []), owner, 50, "")
    assert len(orphans) == 3

    await harness.members.DeleteMember(member_pb2.DeleteMemberRequest(id=member_id), metadata=auth(owner))
    await fails(
        harness.members.ListMemberEnvironments(
            member_pb2.ListMemberEnvironmentsRequest(member_id=member_id, page_token=first.next_page_token),
            metadata=auth(owner),
        ),
        Code.NOT_FOUND,
    )


async def test_pages_after_a_reach_shrinks_show_nothing_that_left_it(harness: Harness, world: World) -> None:
    """A key on three environments pages ListEnvironments, ListApiKeys and ListEvents one item at
    a time; after page 1 its environments are narrowed to the first one. Its own tokens still
    work (the key is the same), but no later page shows an environment, a key or an event of the
    two it lost; ListEnvironmentMembers and ListResources of a lost environment are refused."""
    org = world.org
    first, second, third = sorted(world.environment_ids[1:])
    for env_id in (first, second, third):
        await harness.new_key(org, ["environments:read"], [env_id], name=f"on {env_id}")
        await register_call(harness, org.owner_secret, f"reach-{env_id[-6:].lower()}", env_id)
    key, secret = await harness.new_key(org, ALL, [first, second, third], name="shrinking")
    lost = {second, third}
    tokens = {
        name: (await first_token(harness, world, name, secret))[1]
        for name in ("ListEnvironments", "ListApiKeys", "ListEvents")
    }
    key.ClearField("environment_ids")
    key.environment_ids.append(first)
    await harness.update_key(org.owner_secret, key, "environment_ids")

    environments = await _walk_from(harness, "ListEnvironments", world, secret, tokens["ListEnvironments"])
    assert not lost & set(environments), environments
    later_keys: list[str] = []
    token = tokens["ListApiKeys"]
    while token:
        page = await harness.api_keys.ListApiKeys(
            api_key_pb2.ListApiKeysRequest(page_size=1, page_token=token), metadata=auth(secret)
        )
        later_keys += [k.id for k in page.api_keys if set(k.environment_ids) & lost]
        token = page.next_page_token
    assert later_keys == [], later_keys
    stub = event_pb2_grpc.EventServiceStub(harness.channel)
    token = tokens["ListEvents"]
    leaked: list[str] = []
    while token:
        events_page = await stub.ListEvents(
            event_pb2.ListEventsRequest(page_size=1, page_token=token), metadata=auth(secret)
        )
        leaked += [f"{e.action} {e.resource_id}" for e in events_page.events if e.environment_id in lost]
        token = events_page.next_page_token
    assert leaked == [], leaked
    lost_world = World(org, environment_pb2.Environment(id=second), world.gone, [], [])
    await fails(LISTS["ListEnvironmentMembers"](harness, lost_world, secret, 1, ""), Code.NOT_FOUND)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await LISTS["ListResources"](harness, lost_world, secret, 1, "")
    assert refused.value.code() in (Code.NOT_FOUND, Code.PERMISSION_DENIED), failure_of(refused.value)


async def _walk_from(h: Harness, name: str, w: World, secret: str, token: str) -> list[str]:
    seen: list[str] = []
    while token:
        ids, token = await LISTS[name](h, w, secret, 1, token)
        seen += ids
    return seen


async def test_a_member_owned_key_stops_seeing_an_environment_its_owner_left_between_pages(
    harness: Harness, world: World
) -> None:
    """A key owned by a MEMBER reaches what its owner reaches. Its owner is in two environments;
    after page 1 of ListEnvironments (one item) and of ListApiKeys, the owner is removed from the
    second: the remaining pages, through the key's own tokens, show neither that environment nor
    a key confined to it."""
    org = world.org
    owner = org.owner_secret
    member_id = world.member_ids[0]
    second = next(env_id for env_id in sorted(world.environment_ids) if env_id > world.env.id)
    await harness.add_environment_member(owner, second, member_id)
    confined, _ = await harness.new_key(org, ["environments:read"], [second], name="confined")
    _, secret = await harness.new_key(org, ALL, [world.env.id, second], owner_member_id=member_id)
    whole, _ = await _environments(harness, world, secret, 500, "")
    assert sorted(whole) == sorted([world.env.id, second])
    keys, _ = await _api_keys(harness, world, secret, 500, "")
    assert confined.id in keys
    first_env, env_token = await first_token(harness, world, "ListEnvironments", secret)
    first_keys, keys_token = await first_token(harness, world, "ListApiKeys", secret)
    await harness.members.RemoveEnvironmentMember(
        member_pb2.RemoveEnvironmentMemberRequest(environment_id=second, member_id=member_id),
        metadata=auth(owner),
    )
    later = await _walk_from(harness, "ListEnvironments", world, secret, env_token)
    assert first_env == [world.env.id] and second not in later, later
    later_keys = await _walk_from(harness, "ListApiKeys", world, secret, keys_token)
    assert confined.id not in first_keys + later_keys, (first_keys, later_keys)


async def test_a_token_is_no_way_around_a_scope_taken_away_between_pages(
    harness: Harness, world: World
) -> None:
    """An organization-wide key pages ListMembers, ListApiKeys and ListEvents; between pages the
    read scope each needs is taken from it: its own token then gets PERMISSION_DENIED, not the
    next page."""
    org = world.org
    key, secret = await harness.new_key(org, ALL, name="losing scopes")
    needs = {"ListMembers": "members:read", "ListApiKeys": "api_keys:read", "ListEvents": "events:read"}
    tokens = {name: (await first_token(harness, world, name, secret))[1] for name in needs}
    key.ClearField("scopes")
    key.scopes.extend(scope for scope in ALL if scope not in needs.values())
    await harness.update_key(org.owner_secret, key, "scopes")
    for name, token in tokens.items():
        await fails(LISTS[name](harness, world, secret, 1, token), Code.PERMISSION_DENIED)
