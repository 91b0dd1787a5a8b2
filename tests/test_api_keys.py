"""ApiKeyService end to end: every RPC, every error reason, escalation attempts, expiry and rolls."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as pb
from agentpost.environments.v1 import environment_pb2, member_pb2
from google.protobuf import duration_pb2
from sqlalchemy import select

from service.application import access
from service.storage.tables import ApiKeyRow
from tests.harness import Harness, Org, auth, fails, stamp

Code = grpc.StatusCode
SECRET_SHAPE = re.compile(r"^ap_sk_(live|dev)_[0-9A-Za-z]{38}$")
RANDOM_KEY_ID = "key_01J0000000000000000000000A"


async def test_create_returns_key_and_secret_once(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Staging")
    response = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(
            name="ci", scopes=["inboxes:read", "inboxes:read", "api_keys:read"], environment_ids=[env.id]
        ),
        metadata=auth(org.owner_secret),
    )
    key, secret = response.api_key, response.secret
    assert SECRET_SHAPE.match(secret) and secret.startswith("ap_sk_live_")
    assert key.id.startswith("key_") and key.organization_id == org.id
    assert list(key.scopes) == ["api_keys:read", "inboxes:read"]
    assert list(key.environment_ids) == [env.id]
    assert key.mode == pb.ApiKey.LIVE and key.state == pb.ApiKey.ACTIVE
    assert key.prefix == secret[:12] and key.etag
    assert not key.owner_member_id and not key.HasField("expire_time")
    got = await harness.api_keys.GetApiKey(pb.GetApiKeyRequest(id=key.id), metadata=auth(org.owner_secret))
    assert got == key
    assert secret not in str(got)
    await harness.api_keys.GetApiKey(pb.GetApiKeyRequest(id=key.id), metadata=auth(secret, env.id))


async def test_create_dev_mode_owned_and_expiring(harness: Harness, org: Org) -> None:
    expire = datetime.now(UTC) + timedelta(days=1)
    response = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(
            name="dev",
            scopes=["labels:read"],
            mode=pb.ApiKey.DEV,
            owner_member_id=org.owner_member_id,
            expire_time=stamp(expire),
        ),
        metadata=auth(org.owner_secret),
    )
    assert response.secret.startswith("ap_sk_dev_") and response.api_key.mode == pb.ApiKey.DEV
    assert response.api_key.owner_member_id == org.owner_member_id
    assert abs(response.api_key.expire_time.ToDatetime(tzinfo=UTC) - expire) < timedelta(milliseconds=1)
    assert list(response.api_key.environment_ids) == []


@pytest.mark.parametrize(
    ("request_fields", "field", "reason"),
    [
        ({"name": "", "scopes": ["inboxes:read"]}, "name", None),
        ({"name": "x" * 101, "scopes": ["inboxes:read"]}, "name", None),
        ({"name": "bad\x00", "scopes": ["inboxes:read"]}, "name", None),
        ({"name": "k", "scopes": []}, "scopes", None),
        ({"name": "k", "scopes": ["inboxes:admin"]}, "scopes", "UNKNOWN_SCOPE"),
        ({"name": "k", "scopes": ["inboxes:read"], "mode": 9}, "mode", None),
        ({"name": "k", "scopes": ["inboxes:read"], "request_id": "nope"}, "request_id", None),
        ({"name": "k", "scopes": ["inboxes:read"], "environment_ids": [""]}, "environment_ids", None),
    ],
)
async def test_create_rejects_bad_input(
    harness: Harness, org: Org, request_fields: dict[str, Any], field: str, reason: str | None
) -> None:
    failure = await fails(
        harness.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(**request_fields), metadata=auth(org.owner_secret)
        ),
        Code.INVALID_ARGUMENT,
        reason,
    )
    assert field in failure.violations


async def test_create_rejects_expiry_in_the_past(harness: Harness, org: Org) -> None:
    failure = await fails(
        harness.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(
                name="k", scopes=["inboxes:read"], expire_time=stamp(datetime.now(UTC) - timedelta(seconds=1))
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "expire_time" in failure.violations


async def test_create_request_id_duplicate_names_the_first_key(harness: Harness, org: Org) -> None:
    request = pb.CreateApiKeyRequest(name="once", scopes=["inboxes:read"], request_id=str(uuid.uuid4()))
    first = await harness.api_keys.CreateApiKey(request, metadata=auth(org.owner_secret))
    failure = await fails(
        harness.api_keys.CreateApiKey(request, metadata=auth(org.owner_secret)),
        Code.ALREADY_EXISTS,
        "DUPLICATE_REQUEST",
    )
    assert failure.metadata == {"keyId": first.api_key.id}
    listed = await harness.api_keys.ListApiKeys(pb.ListApiKeysRequest(), metadata=auth(org.owner_secret))
    assert [key.name for key in listed.api_keys].count("once") == 1


async def test_create_unknown_owner_and_deleted_environment(harness: Harness, org: Org) -> None:
    await fails(
        harness.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(
                name="k", scopes=["inboxes:read"], owner_member_id="mem_01J0000000000000000000000A"
            ),
            metadata=auth(org.owner_secret),
        ),
        Code.NOT_FOUND,
        "MEMBER_NOT_FOUND",
    )
    env = await harness.new_environment(org, "Gone")
    await harness.delete_environment(org.owner_secret, env.id)
    await fails(
        harness.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(name="k", scopes=["inboxes:read"], environment_ids=[env.id]),
            metadata=auth(org.owner_secret),
        ),
        Code.FAILED_PRECONDITION,
        "ENVIRONMENT_DELETED",
    )


async def test_scopes_are_required_per_method(harness: Harness, org: Org) -> None:
    _, reader = await harness.new_key(org, ["api_keys:read"])
    _, writer = await harness.new_key(org, ["api_keys:write"])
    await fails(
        harness.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(name="k", scopes=["api_keys:read"]), metadata=auth(reader)
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    await fails(
        harness.api_keys.RevokeApiKey(pb.RevokeApiKeyRequest(id=org.owner_key_id), metadata=auth(reader)),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    await fails(
        harness.api_keys.ListApiKeys(pb.ListApiKeysRequest(), metadata=auth(writer)),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    # Permission before existence: a random id still gets PERMISSION_DENIED.
    await fails(
        harness.api_keys.GetApiKey(pb.GetApiKeyRequest(id=RANDOM_KEY_ID), metadata=auth(writer)),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )


class Escalation:
    """An org with environments A and B, and a key scoped to A holding api_keys read+write."""

    def __init__(
        self, org: Org, env_a: environment_pb2.Environment, env_b: environment_pb2.Environment
    ) -> None:
        self.org = org
        self.env_a = env_a
        self.env_b = env_b
        self.secret = ""
        self.key_in_a = pb.ApiKey()
        self.key_in_b = pb.ApiKey()
        self.key_in_a_and_b = pb.ApiKey()


async def escalation_setup(harness: Harness, org: Org) -> Escalation:
    setup = Escalation(org, await harness.new_environment(org, "A"), await harness.new_environment(org, "B"))
    _, setup.secret = await harness.new_key(
        org, ["api_keys:read", "api_keys:write", "inboxes:read"], [setup.env_a.id]
    )
    setup.key_in_a, _ = await harness.new_key(org, ["inboxes:write"], [setup.env_a.id])
    setup.key_in_b, _ = await harness.new_key(org, ["inboxes:read"], [setup.env_b.id])
    setup.key_in_a_and_b, _ = await harness.new_key(org, ["inboxes:read"], [setup.env_a.id, setup.env_b.id])
    return setup


async def test_create_cannot_escalate(harness: Harness, org: Org) -> None:
    s = await escalation_setup(harness, org)
    keys = harness.api_keys
    await fails(
        keys.CreateApiKey(
            pb.CreateApiKeyRequest(name="k", scopes=["inboxes:write"], environment_ids=[s.env_a.id]),
            metadata=auth(s.secret),
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_ESCALATION",
    )
    await fails(
        keys.CreateApiKey(
            pb.CreateApiKeyRequest(name="k", scopes=["inboxes:read"], environment_ids=[s.env_b.id]),
            metadata=auth(s.secret),
        ),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )
    await fails(
        keys.CreateApiKey(pb.CreateApiKeyRequest(name="k", scopes=["inboxes:read"]), metadata=auth(s.secret)),
        Code.PERMISSION_DENIED,
        "ORGANIZATION_KEY_REQUIRED",
    )
    made = await keys.CreateApiKey(
        pb.CreateApiKeyRequest(name="k", scopes=["inboxes:read"], environment_ids=[s.env_a.id]),
        metadata=auth(s.secret),
    )
    assert list(made.api_key.environment_ids) == [s.env_a.id]


async def test_keys_out_of_reach_are_not_found(harness: Harness, org: Org) -> None:
    s = await escalation_setup(harness, org)
    keys = harness.api_keys
    random_failure = await fails(
        keys.GetApiKey(pb.GetApiKeyRequest(id=RANDOM_KEY_ID), metadata=auth(s.secret)),
        Code.NOT_FOUND,
        "API_KEY_NOT_FOUND",
    )
    for out_of_reach in (org.owner_key_id, s.key_in_b.id, s.key_in_a_and_b.id):
        for call in (
            keys.GetApiKey(pb.GetApiKeyRequest(id=out_of_reach), metadata=auth(s.secret)),
            harness.update_key(s.secret, pb.ApiKey(id=out_of_reach, name="mine"), "name"),
            keys.RevokeApiKey(pb.RevokeApiKeyRequest(id=out_of_reach), metadata=auth(s.secret)),
            keys.RollApiKey(pb.RollApiKeyRequest(id=out_of_reach), metadata=auth(s.secret)),
        ):
            failure = await fails(call, Code.NOT_FOUND, "API_KEY_NOT_FOUND")
            assert failure.message == random_failure.message.replace(RANDOM_KEY_ID, out_of_reach)
    other = await harness.new_org("Other")
    await fails(
        keys.GetApiKey(pb.GetApiKeyRequest(id=other.owner_key_id), metadata=auth(org.owner_secret)),
        Code.NOT_FOUND,
        "API_KEY_NOT_FOUND",
    )
    listed = await keys.ListApiKeys(pb.ListApiKeysRequest(), metadata=auth(s.secret))
    ids = {key.id for key in listed.api_keys}
    assert s.key_in_a.id in ids
    assert not ids & {org.owner_key_id, s.key_in_b.id, s.key_in_a_and_b.id}


async def test_update_and_roll_cannot_escalate(harness: Harness, org: Org) -> None:
    s = await escalation_setup(harness, org)
    keys = harness.api_keys
    await fails(
        harness.update_key(
            s.secret, pb.ApiKey(id=s.key_in_a.id, scopes=["inboxes:write", "messages:read"]), "scopes"
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_ESCALATION",
    )
    await fails(
        harness.update_key(
            s.secret, pb.ApiKey(id=s.key_in_a.id, environment_ids=[s.env_a.id, s.env_b.id]), "environment_ids"
        ),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )
    await fails(
        harness.update_key(s.secret, pb.ApiKey(id=s.key_in_a.id), "environment_ids"),
        Code.PERMISSION_DENIED,
        "ORGANIZATION_KEY_REQUIRED",
    )
    # Rolling would hand out a secret holding inboxes:write, which the caller lacks.
    await fails(
        keys.RollApiKey(pb.RollApiKeyRequest(id=s.key_in_a.id), metadata=auth(s.secret)),
        Code.PERMISSION_DENIED,
        "SCOPE_ESCALATION",
    )
    # Narrowing is fine: dropping the scope the caller lacks, keeping the name.
    narrowed = await harness.update_key(
        s.secret, pb.ApiKey(id=s.key_in_a.id, scopes=["inboxes:read"]), "scopes"
    )
    assert list(narrowed.scopes) == ["inboxes:read"] and narrowed.name == s.key_in_a.name
    rolled = await keys.RollApiKey(pb.RollApiKeyRequest(id=s.key_in_a.id), metadata=auth(s.secret))
    assert list(rolled.api_key.scopes) == ["inboxes:read"]


async def test_update_fields_mask_and_etag(harness: Harness, org: Org) -> None:
    env_a = await harness.new_environment(org, "A")
    key, _ = await harness.new_key(org, ["inboxes:read"])
    expire = datetime.now(UTC) + timedelta(hours=1)
    updated = await harness.update_key(
        org.owner_secret,
        pb.ApiKey(
            id=key.id,
            name="renamed",
            scopes=["messages:read", "inboxes:write"],
            environment_ids=[env_a.id],
            expire_time=stamp(expire),
            etag=key.etag,
        ),
        "name",
        "scopes",
        "environment_ids",
        "expire_time",
    )
    assert updated.name == "renamed"
    assert list(updated.scopes) == ["inboxes:write", "messages:read"]
    assert list(updated.environment_ids) == [env_a.id]
    assert updated.HasField("expire_time") and updated.etag != key.etag
    assert updated.update_time.ToDatetime() >= key.update_time.ToDatetime()
    cleared = await harness.update_key(org.owner_secret, pb.ApiKey(id=key.id), "expire_time")
    assert not cleared.HasField("expire_time") and cleared.name == "renamed"
    await fails(
        harness.update_key(org.owner_secret, pb.ApiKey(id=key.id, name="x", etag=key.etag), "name"),
        Code.ABORTED,
        "ETAG_MISMATCH",
    )
    # No mask: the mutable fields the request sets (AIP-134), here only the name.
    renamed = await harness.update_key(org.owner_secret, pb.ApiKey(id=key.id, name="x"))
    assert renamed.name == "x" and list(renamed.scopes) == ["inboxes:write", "messages:read"]


@pytest.mark.parametrize(
    ("fields", "paths", "code", "reason", "violation"),
    [
        pytest.param(
            {}, (), Code.INVALID_ARGUMENT, "NOTHING_TO_UPDATE", "update_mask", id="nothing to update"
        ),
        *(
            pytest.param({}, (path,), Code.INVALID_ARGUMENT, "FIELD_NOT_MUTABLE", None, id=path)
            for path in ("mode", "owner_member_id", "prefix", "revoke_time")
        ),
        pytest.param({"scopes": []}, ("scopes",), Code.INVALID_ARGUMENT, None, None, id="no scopes"),
        pytest.param(
            {"id": RANDOM_KEY_ID, "name": "x"},
            ("name",),
            Code.NOT_FOUND,
            "API_KEY_NOT_FOUND",
            None,
            id="unknown",
        ),
    ],
)
async def test_update_refuses(
    harness: Harness,
    org: Org,
    fields: dict[str, Any],
    paths: tuple[str, ...],
    code: grpc.StatusCode,
    reason: str | None,
    violation: str | None,
) -> None:
    key, _ = await harness.new_key(org, ["inboxes:read"])
    failure = await fails(
        harness.update_key(org.owner_secret, pb.ApiKey(**{"id": key.id, **fields}), *paths), code, reason
    )
    if violation is not None:
        assert violation in failure.violations


async def test_revoke_is_immediate_and_idempotent(harness: Harness, org: Org) -> None:
    key, secret = await harness.new_key(org, ["api_keys:read"])
    await harness.whoami(secret)
    await fails(
        harness.api_keys.RevokeApiKey(
            pb.RevokeApiKeyRequest(id=key.id, etag="stale"), metadata=auth(org.owner_secret)
        ),
        Code.ABORTED,
    )
    revoked = await harness.api_keys.RevokeApiKey(
        pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
    )
    assert revoked.state == pb.ApiKey.REVOKED and revoked.HasField("revoke_time")
    await fails(harness.whoami(secret), Code.UNAUTHENTICATED, "API_KEY_REVOKED")
    again = await harness.api_keys.RevokeApiKey(
        pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
    )
    assert again == revoked
    await fails(
        harness.update_key(org.owner_secret, pb.ApiKey(id=key.id, name="x"), "name"),
        Code.FAILED_PRECONDITION,
        "API_KEY_REVOKED",
    )
    await fails(
        harness.api_keys.RollApiKey(pb.RollApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)),
        Code.FAILED_PRECONDITION,
        "API_KEY_REVOKED",
    )


async def test_expiry_at_the_boundary(harness: Harness, org: Org) -> None:
    expire = datetime.now(UTC) + timedelta(seconds=1.5)
    response = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(name="short", scopes=["api_keys:read"], expire_time=stamp(expire)),
        metadata=auth(org.owner_secret),
    )
    await harness.whoami(response.secret)
    await asyncio.sleep(max(0.0, (expire - datetime.now(UTC)).total_seconds()) + 0.05)
    await fails(harness.whoami(response.secret), Code.UNAUTHENTICATED, "API_KEY_EXPIRED")
    got = await harness.api_keys.GetApiKey(
        pb.GetApiKeyRequest(id=response.api_key.id), metadata=auth(org.owner_secret)
    )
    assert got.state == pb.ApiKey.EXPIRED
    await fails(
        harness.api_keys.RollApiKey(pb.RollApiKeyRequest(id=got.id), metadata=auth(org.owner_secret)),
        Code.FAILED_PRECONDITION,
        "API_KEY_EXPIRED",
    )


async def test_roll_with_overlap_then_previous_expires(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Prod")
    original_expiry = datetime.now(UTC) + timedelta(days=30)
    created = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(
            name="rolling",
            scopes=["api_keys:read"],
            environment_ids=[env.id],
            mode=pb.ApiKey.DEV,
            expire_time=stamp(original_expiry),
        ),
        metadata=auth(org.owner_secret),
    )
    rolled = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=created.api_key.id, previous_key_ttl=duration_pb2.Duration(seconds=2)),
        metadata=auth(org.owner_secret),
    )
    started = time.monotonic()
    new, previous = rolled.api_key, rolled.previous_api_key
    assert new.id != created.api_key.id and rolled.secret != created.secret
    assert rolled.secret.startswith("ap_sk_dev_") and new.prefix == rolled.secret[:12]
    assert (new.name, list(new.scopes), list(new.environment_ids), new.mode, new.expire_time) == (
        "rolling",
        ["api_keys:read"],
        [env.id],
        pb.ApiKey.DEV,
        created.api_key.expire_time,
    )
    assert previous.id == created.api_key.id and previous.state == pb.ApiKey.ACTIVE
    assert previous.expire_time.ToDatetime(tzinfo=UTC) < original_expiry
    await harness.whoami(created.secret)
    await harness.whoami(rolled.secret)
    await asyncio.sleep(max(0.0, 2.05 - (time.monotonic() - started)))
    await fails(harness.whoami(created.secret), Code.UNAUTHENTICATED, "API_KEY_EXPIRED")
    await harness.whoami(rolled.secret)


async def test_roll_without_overlap_and_bad_ttl(harness: Harness, org: Org) -> None:
    key, secret = await harness.new_key(org, ["api_keys:read"])
    for ttl in (duration_pb2.Duration(seconds=-1), duration_pb2.Duration(seconds=7 * 86400 + 1)):
        failure = await fails(
            harness.api_keys.RollApiKey(
                pb.RollApiKeyRequest(id=key.id, previous_key_ttl=ttl), metadata=auth(org.owner_secret)
            ),
            Code.INVALID_ARGUMENT,
        )
        assert "previous_key_ttl" in failure.violations
    rolled = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
    )
    assert rolled.previous_api_key.state == pb.ApiKey.EXPIRED
    await fails(harness.whoami(secret), Code.UNAUTHENTICATED, "API_KEY_EXPIRED")
    await harness.whoami(rolled.secret)
    seven_days = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=rolled.api_key.id, previous_key_ttl=duration_pb2.Duration(seconds=7 * 86400)),
        metadata=auth(org.owner_secret),
    )
    assert seven_days.previous_api_key.state == pb.ApiKey.ACTIVE


async def test_list_filters_and_pages(harness: Harness, org: Org) -> None:
    env_a = await harness.new_environment(org, "A")
    env_b = await harness.new_environment(org, "B")
    in_a = [(await harness.new_key(org, ["inboxes:read"], [env_a.id], name=f"a{i}"))[0] for i in range(3)]
    in_b, _ = await harness.new_key(org, ["inboxes:read"], [env_b.id])
    org_wide, _ = await harness.new_key(org, ["inboxes:read"])
    revoked, _ = await harness.new_key(org, ["inboxes:read"], [env_a.id])
    await harness.api_keys.RevokeApiKey(
        pb.RevokeApiKeyRequest(id=revoked.id), metadata=auth(org.owner_secret)
    )

    async def all_pages(request: pb.ListApiKeysRequest, secret: str) -> list[str]:
        seen: list[str] = []
        while True:
            page = await harness.api_keys.ListApiKeys(request, metadata=auth(secret))
            assert len(page.api_keys) <= max(request.page_size, 1)
            seen.extend(key.id for key in page.api_keys)
            if not page.next_page_token:
                return seen
            request.page_token = page.next_page_token

    everything = await all_pages(pb.ListApiKeysRequest(page_size=2), org.owner_secret)
    expected = sorted([org.owner_key_id, *(k.id for k in in_a), in_b.id, org_wide.id])
    assert everything == expected
    with_revoked = await all_pages(pb.ListApiKeysRequest(page_size=2, show_revoked=True), org.owner_secret)
    assert with_revoked == sorted([*expected, revoked.id])
    in_env_a = await all_pages(pb.ListApiKeysRequest(page_size=1, environment_id=env_a.id), org.owner_secret)
    assert in_env_a == sorted([org.owner_key_id, *(k.id for k in in_a), org_wide.id])

    first = await harness.api_keys.ListApiKeys(
        pb.ListApiKeysRequest(page_size=2), metadata=auth(org.owner_secret)
    )
    token = first.next_page_token
    assert token
    _, other_caller = await harness.new_key(org, ["api_keys:read"])
    for bad in (
        harness.api_keys.ListApiKeys(
            pb.ListApiKeysRequest(page_size=2, page_token=token[:-2] + "xx"), metadata=auth(org.owner_secret)
        ),
        harness.api_keys.ListApiKeys(
            pb.ListApiKeysRequest(page_size=2, page_token=token), metadata=auth(other_caller)
        ),
        harness.api_keys.ListApiKeys(
            pb.ListApiKeysRequest(page_size=2, page_token=token, show_revoked=True),
            metadata=auth(org.owner_secret),
        ),
        harness.api_keys.ListApiKeys(pb.ListApiKeysRequest(page_size=-1), metadata=auth(org.owner_secret)),
    ):
        await fails(bad, Code.INVALID_ARGUMENT)
    await fails(
        harness.api_keys.ListApiKeys(
            pb.ListApiKeysRequest(environment_id="env_01J0000000000000000000000A"),
            metadata=auth(org.owner_secret),
        ),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )


async def test_list_shows_last_used_time_without_a_write_per_call(harness: Harness, org: Org) -> None:
    key, secret = await harness.new_key(org, ["api_keys:read"])
    assert not key.HasField("last_used_time")
    before = datetime.now(UTC)
    await harness.whoami(secret)
    got = await harness.api_keys.GetApiKey(pb.GetApiKeyRequest(id=key.id), metadata=auth(org.owner_secret))
    assert got.HasField("last_used_time")
    assert got.last_used_time.ToDatetime(tzinfo=UTC) >= before - timedelta(milliseconds=1)
    listed = await harness.api_keys.ListApiKeys(pb.ListApiKeysRequest(), metadata=auth(org.owner_secret))
    assert next(k for k in listed.api_keys if k.id == key.id).last_used_time == got.last_used_time


async def test_last_used_times_are_written_in_batches_and_only_move_forward(
    harness: Harness, org: Org, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "LAST_USED_BATCH", 2)  # five keys: three transactions
    made = [await harness.new_key(org, ["api_keys:read"]) for _ in range(5)]
    before = datetime.now(UTC)
    for _, secret in made:
        await harness.whoami(secret)
    await harness.app.access.flush_last_used()
    ids = [key.id for key, _ in made]
    table = ApiKeyRow.__table__
    async with harness.app.engine.connect() as connection:
        stored = dict(
            (
                await connection.execute(
                    select(table.c.id, table.c.last_used_time).where(table.c.id.in_(ids))
                )
            ).all()
        )
    assert set(stored) == set(ids)
    for when in stored.values():
        assert when is not None
        moment = when if when.tzinfo else when.replace(tzinfo=UTC)
        assert moment >= before - timedelta(milliseconds=1)
    # An older time never overwrites a newer one.
    async with harness.app.database.write(None) as uow:
        await uow.last_used.record({ids[0]: before - timedelta(days=1)})
    async with harness.app.engine.connect() as connection:
        kept = (
            await connection.execute(select(table.c.last_used_time).where(table.c.id == ids[0]))
        ).scalar_one()
    assert kept == stored[ids[0]]


@dataclass
class MemberOwned:
    """Environments A and B; a member who is ADMIN of A and MEMBER of B, holding a key on both;
    a plain MEMBER of B and keys it owns in B and in A."""

    harness: Harness
    env_a: environment_pb2.Environment
    env_b: environment_pb2.Environment
    admin_of_a: member_pb2.Member
    plain_in_b: member_pb2.Member
    secret: str
    in_b: pb.ApiKey
    other_in_a: pb.ApiKey


async def member_owned(harness: Harness, org: Org) -> MemberOwned:
    """Builds the `MemberOwned` scene in `org`."""
    env_a = await harness.new_environment(org, "A")
    env_b = await harness.new_environment(org, "B")
    admin_of_a = await harness.new_member(org, "MEMBER")
    plain_in_b = await harness.new_member(org, "MEMBER")
    for env_id, member_id, role in (
        (env_a.id, admin_of_a.id, member_pb2.EnvironmentMember.ADMIN),
        (env_b.id, admin_of_a.id, member_pb2.EnvironmentMember.MEMBER),
        (env_b.id, plain_in_b.id, member_pb2.EnvironmentMember.MEMBER),
    ):
        await harness.add_environment_member(org.owner_secret, env_id, member_id, role)
    scopes = ["api_keys:read", "api_keys:write", "inboxes:read"]
    _, secret = await harness.new_key(org, scopes, [env_a.id, env_b.id], admin_of_a.id)
    in_b, _ = await harness.new_key(org, ["inboxes:read"], [env_b.id], plain_in_b.id)
    other_in_a, _ = await harness.new_key(org, ["inboxes:read"], [env_a.id], plain_in_b.id)
    return MemberOwned(harness, env_a, env_b, admin_of_a, plain_in_b, secret, in_b, other_in_a)


async def test_member_owned_keys_stay_within_their_member(harness: Harness, org: Org) -> None:
    s = await member_owned(harness, org)
    keys = harness.api_keys
    # Owner defaults to the caller's member.
    made = await keys.CreateApiKey(
        pb.CreateApiKeyRequest(name="mine", scopes=["inboxes:read"], environment_ids=[s.env_a.id]),
        metadata=auth(s.secret),
    )
    assert made.api_key.owner_member_id == s.admin_of_a.id
    # Reading is allowed within reach.
    got = await keys.GetApiKey(pb.GetApiKeyRequest(id=s.in_b.id), metadata=auth(s.secret))
    assert got.id == s.in_b.id
    rolled = await keys.RollApiKey(pb.RollApiKeyRequest(id=made.api_key.id), metadata=auth(s.secret))
    assert rolled.api_key.owner_member_id == s.admin_of_a.id


# Each row: what a member-owned key tries, and why it is refused (always PERMISSION_DENIED).
MEMBER_OWNED_REFUSALS: list[Any] = [
    # Naming another member as the owner is an escalation.
    pytest.param(
        lambda s: s.harness.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(
                name="theirs",
                scopes=["inboxes:read"],
                environment_ids=[s.env_a.id],
                owner_member_id=s.plain_in_b.id,
            ),
            metadata=auth(s.secret),
        ),
        "OWNER_ESCALATION",
        id="create owned by another member",
    ),
    # In B the member is not ADMIN: it may not create, change, revoke or roll keys there.
    pytest.param(
        lambda s: s.harness.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(name="b", scopes=["inboxes:read"], environment_ids=[s.env_b.id]),
            metadata=auth(s.secret),
        ),
        "ENVIRONMENT_ADMIN_REQUIRED",
        id="create in B",
    ),
    pytest.param(
        lambda s: s.harness.api_keys.RevokeApiKey(
            pb.RevokeApiKeyRequest(id=s.in_b.id), metadata=auth(s.secret)
        ),
        "ENVIRONMENT_ADMIN_REQUIRED",
        id="revoke in B",
    ),
    # A key in A owned by another member cannot be rolled into this caller's hands.
    pytest.param(
        lambda s: s.harness.api_keys.RollApiKey(
            pb.RollApiKeyRequest(id=s.other_in_a.id), metadata=auth(s.secret)
        ),
        "OWNER_ESCALATION",
        id="roll another member's key in A",
    ),
]


@pytest.mark.parametrize(("attempt", "reason"), MEMBER_OWNED_REFUSALS)
async def test_member_owned_key_refusals(
    harness: Harness, org: Org, attempt: Callable[[MemberOwned], Awaitable[Any]], reason: str
) -> None:
    await fails(attempt(await member_owned(harness, org)), Code.PERMISSION_DENIED, reason)
