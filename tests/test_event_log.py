"""The event log behind every write, and the caches that follow it.

Every write answers `x-agentpost-revision`, gapless per organization; the log holds one event per
changed resource with its actor, request id, changed fields and the resource after the change,
never a secret. The cache applies events instead of dropping organizations, so registering
resources costs verification nothing, and another replica follows the log: through NOTIFY on
PostgreSQL (even with the safety-net poll made very slow), by polling on SQLite. A caller demanding
a revision (`x-agentpost-min-revision`, `VerifyApiKey.min_revision`) is answered from at least it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import (
    api_key_pb2_grpc,
    environment_pb2,
    environment_pb2_grpc,
    member_pb2,
    resource_pb2,
)
from google.protobuf import field_mask_pb2

from service.domain.events import Action, ResourceType
from tests.harness import Harness, Org, auth, fails, stored_events
from tests.servers import Backend, start_server
from tests.statements import counted_sql

REVISION = "x-agentpost-revision"


async def revision_of(call: Any) -> int:
    """The revision a finished write answered in its trailing metadata."""
    trailers = dict(await call.trailing_metadata() or ())
    return int(trailers[REVISION])


async def test_every_write_answers_its_revision_gapless(harness: Harness, org: Org) -> None:
    revisions = []
    for name in ("One", "Two", "Three"):
        call = harness.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name=name), metadata=auth(org.owner_secret)
        )
        await call
        revisions.append(await revision_of(call))
    call = harness.api_keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(name="k", scopes=["inboxes:read"]), metadata=auth(org.owner_secret)
    )
    await call
    revisions.append(await revision_of(call))
    # CreateOrganization committed revision 1; each write here is the next one.
    assert revisions == [2, 3, 4, 5]
    # A read answers no revision.
    read = harness.environments.ListEnvironments(
        environment_pb2.ListEnvironmentsRequest(), metadata=auth(org.owner_secret)
    )
    await read
    assert REVISION not in dict(await read.trailing_metadata() or ())


async def test_the_log_records_actor_request_fields_and_resource_never_a_secret(
    harness: Harness, org: Org
) -> None:
    request_id = f"req-{uuid.uuid4().hex[:8]}"
    env = await harness.new_environment(org, "Staging")
    renamed = await harness.environments.UpdateEnvironment(
        environment_pb2.UpdateEnvironmentRequest(
            environment=environment_pb2.Environment(id=env.id, name="Staging two"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=auth(org.owner_secret, request_id=request_id),
    )
    created = await harness.api_keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(name="worker", scopes=["inboxes:read"], environment_ids=[env.id]),
        metadata=auth(org.owner_secret),
    )
    rows = await stored_events(harness, org.id)
    first = rows[:4]
    assert [(row.revision, row.action, row.resource_type) for row in first] == [
        (1, "CREATED", "ORGANIZATION"),
        (1, "CREATED", "ENVIRONMENT"),
        (1, "CREATED", "MEMBER"),
        (1, "CREATED", "API_KEY"),
    ]
    assert all(row.actor_operator for row in first)
    update = next(row for row in rows if row.action == Action.UPDATED and row.resource_id == env.id)
    assert update.actor_api_key_id == org.owner_key_id and update.actor_member_id == org.owner_member_id
    assert not update.actor_operator
    assert update.request_id == request_id
    assert json.loads(update.changed_fields) == ["name"]
    after = json.loads(update.resource)
    assert (after["name"], after["version"]) == ("Staging two", 2)
    assert renamed.etag  # the same change as the caller saw
    key_event = next(row for row in rows if row.resource_id == created.api_key.id)
    assert key_event.resource_type == ResourceType.API_KEY and key_event.environment_id == env.id
    body = key_event.resource
    assert created.secret not in body and created.secret[-38:] not in body
    assert "hash" not in json.loads(body)


async def test_a_create_is_logged_once_with_the_revision_it_answered(harness: Harness, org: Org) -> None:
    """Creates append their event with the revision (on PostgreSQL in the statement that raises
    it); a retry with the same request_id is answered from the first and logs nothing more, and
    a create that fails logs nothing."""
    env = await harness.new_environment(org, "Inboxes")
    header = f"req-{uuid.uuid4().hex[:8]}"
    answered: dict[str, int] = {}
    retried = str(uuid.uuid4())
    for request_id in ("", retried, retried):
        call = harness.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(
                name="Env retried" if request_id else "Env plain", request_id=request_id
            ),
            metadata=auth(org.owner_secret, request_id=header),
        )
        created = await call
        answered.setdefault(created.id, await revision_of(call))
        registered_call = harness.resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(
                kind=resource_pb2.ScopedResource.INBOX,
                resource_id="inbox-retried" if request_id else "inbox-plain",
                request_id=request_id,
            ),
            metadata=auth(org.owner_secret, env.id, request_id=header),
        )
        registered = await registered_call
        answered.setdefault(f"INBOX:{registered.resource_id}", await revision_of(registered_call))
    await fails(
        harness.resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(
                kind=resource_pb2.ScopedResource.INBOX, resource_id="inbox-plain"
            ),
            metadata=auth(org.owner_secret, env.id),
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "RESOURCE_EXISTS",
    )

    rows = await stored_events(harness, org.id)
    logged = [row for row in rows if row.resource_id in answered]
    assert sorted(row.resource_id for row in logged) == sorted(answered)  # once each, the failure none
    for row in logged:
        assert row.revision == answered[row.resource_id] and row.sequence == 0
        assert row.action in (Action.CREATED, Action.REGISTERED)
        assert row.actor_api_key_id == org.owner_key_id and row.request_id == header
        resource = json.loads(row.resource)
        if row.resource_type == ResourceType.SCOPED_RESOURCE:
            assert (row.environment_id, resource["environment_id"]) == (env.id, env.id)
        else:
            assert row.environment_id == row.resource_id == resource["id"]
    # Revisions stay gapless: every revision of the organization has its events.
    assert sorted({row.revision for row in rows}) == list(range(1, rows[-1].revision + 1))


async def test_registering_resources_costs_verification_nothing(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Inboxes")
    _, secret = await harness.new_key(org, ["inboxes:read", "inboxes:write"], [env.id])
    request = key_pb.VerifyApiKeyRequest(secret=secret, environment=env.id, required_scopes=["inboxes:read"])
    assert (await harness.api_keys.VerifyApiKey(request)).valid
    for number in range(5):
        await harness.resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(
                kind=resource_pb2.ScopedResource.INBOX, resource_id=f"inbox-{number}"
            ),
            metadata=auth(secret, env.id),
        )
        # Each registration commits an event; verification after it still reads nothing.
        with counted_sql(harness) as statements:
            for _ in range(10):
                assert (await harness.api_keys.VerifyApiKey(request)).valid
        assert statements == [], statements


async def test_access_changes_apply_precisely_on_the_next_call(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Precise")
    member = await harness.new_member(org, "MEMBER")
    await harness.members.AddEnvironmentMember(
        member_pb2.AddEnvironmentMemberRequest(
            environment_id=env.id, member_id=member.id, role=member_pb2.EnvironmentMember.MEMBER
        ),
        metadata=auth(org.owner_secret),
    )
    _, secret = await harness.new_key(org, ["inboxes:read"], [env.id], owner_member_id=member.id)
    request = key_pb.VerifyApiKeyRequest(secret=secret, environment=env.id)
    assert (await harness.api_keys.VerifyApiKey(request)).valid
    await harness.members.RemoveEnvironmentMember(
        member_pb2.RemoveEnvironmentMemberRequest(environment_id=env.id, member_id=member.id),
        metadata=auth(org.owner_secret),
    )
    denied = await harness.api_keys.VerifyApiKey(request)
    assert denied.denial_reason == key_pb.VerifyApiKeyResponse.ENVIRONMENT_NOT_ALLOWED
    await harness.environments.DeleteEnvironment(
        environment_pb2.DeleteEnvironmentRequest(id=env.id), metadata=auth(org.owner_secret)
    )
    owner_verify = key_pb.VerifyApiKeyRequest(secret=org.owner_secret, environment=env.id)
    assert (await harness.api_keys.VerifyApiKey(owner_verify)).denial_reason == (
        key_pb.VerifyApiKeyResponse.ENVIRONMENT_DELETED
    )


async def _slow_replica(backend: Backend) -> tuple[Any, grpc.aio.Channel]:
    """A second replica whose safety-net poll is far slower than any bound checked here."""
    return await start_server(backend, cache_refresh_seconds=30.0)


async def test_a_replica_follows_the_log_within_the_bound(
    harness: Harness, backend: Backend, org: Org
) -> None:
    if backend.name != "postgres":
        pytest.skip("without notifications (SQLite) replicas poll; tests/test_replicas.py covers that")
    app_b, channel_b = await _slow_replica(backend)
    try:
        verify_b = api_key_pb2_grpc.ApiKeyServiceStub(channel_b)
        delays = []
        for _ in range(5):
            key, secret = await harness.new_key(org, ["inboxes:read"])
            assert (await verify_b.VerifyApiKey(key_pb.VerifyApiKeyRequest(secret=secret))).valid
            await harness.api_keys.RevokeApiKey(
                key_pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
            )
            revoked_at = time.monotonic()
            while time.monotonic() - revoked_at < 3.0:
                answer = await verify_b.VerifyApiKey(key_pb.VerifyApiKeyRequest(secret=secret))
                if not answer.valid:
                    assert answer.denial_reason == key_pb.VerifyApiKeyResponse.REVOKED
                    delays.append(time.monotonic() - revoked_at)
                    break
                await asyncio.sleep(0.005)
            else:
                raise AssertionError("replica B still accepted a revoked key after 3 s with a 30 s poll")
        print(f"\n[postgres] revoke seen through NOTIFY after {max(delays) * 1000:.0f} ms at most")
    finally:
        await channel_b.close()
        await app_b.stop(grace=0)


async def test_min_revision_reads_your_write_on_another_replica(
    harness: Harness, backend: Backend, org: Org
) -> None:
    app_b, channel_b = await _slow_replica(backend)
    try:
        environments_b = environment_pb2_grpc.EnvironmentServiceStub(channel_b)
        verify_b = api_key_pb2_grpc.ApiKeyServiceStub(channel_b)
        # Replica B holds the organization before the writes.
        await environments_b.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(), metadata=auth(org.owner_secret)
        )
        call = harness.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name="Fresh"), metadata=auth(org.owner_secret)
        )
        env = await call
        revision = await revision_of(call)
        fresh = await environments_b.GetEnvironment(
            environment_pb2.GetEnvironmentRequest(id=env.id),
            metadata=(*auth(org.owner_secret), ("x-agentpost-min-revision", str(revision))),
        )
        assert fresh.id == env.id
        key, secret = await harness.new_key(org, ["inboxes:read"])
        assert (await verify_b.VerifyApiKey(key_pb.VerifyApiKeyRequest(secret=secret))).valid
        revoke = harness.api_keys.RevokeApiKey(
            key_pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
        )
        await revoke
        answer = await verify_b.VerifyApiKey(
            key_pb.VerifyApiKeyRequest(secret=secret, min_revision=await revision_of(revoke))
        )
        assert answer.denial_reason == key_pb.VerifyApiKeyResponse.REVOKED
        await fails(
            environments_b.ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(),
                metadata=(*auth(org.owner_secret), ("x-agentpost-min-revision", "-1")),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_MIN_REVISION",
        )
        await fails(
            verify_b.VerifyApiKey(key_pb.VerifyApiKeyRequest(secret=secret, min_revision=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    finally:
        await channel_b.close()
        await app_b.stop(grace=0)
