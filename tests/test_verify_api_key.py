"""VerifyApiKey and the environment context: every denial reason, and the hot path's cost in SQL."""

from __future__ import annotations

import grpc
from agentpost.environments.v1 import api_key_pb2 as pb
from agentpost.environments.v1 import environment_pb2

from tests.harness import Harness, Org, auth, corrupt, fails
from tests.statements import counted_sql

Code = grpc.StatusCode
Reason = pb.VerifyApiKeyResponse


async def test_valid_key_resolves_environment_by_id_slug_and_default(harness: Harness, org: Org) -> None:
    staging = await harness.new_environment(org, "Staging")
    default = org.default_environment
    response = await harness.verify(org.owner_secret, "", "inboxes:read")
    assert response.valid and response.denial_reason == Reason.DENIAL_REASON_UNSPECIFIED
    who = response.principal
    assert (who.organization_id, who.api_key_id, who.owner_member_id) == (
        org.id,
        org.owner_key_id,
        org.owner_member_id,
    )
    assert who.organization_wide
    assert (who.environment_id, who.environment_slug) == (default.id, "default")
    assert list(who.allowed_environment_ids) == sorted([default.id, staging.id])
    assert "api_keys:write" in who.scopes
    for reference in (staging.id, "staging"):
        response = await harness.verify(org.owner_secret, reference)
        assert response.valid
        assert (response.principal.environment_id, response.principal.environment_slug) == (
            staging.id,
            "staging",
        )


async def test_single_environment_key_defaults_to_it(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Only")
    key, secret = await harness.new_key(org, ["inboxes:read"], [env.id])
    response = await harness.verify(secret)
    assert response.valid and response.principal.environment_id == env.id
    assert not response.principal.organization_wide
    assert list(response.principal.allowed_environment_ids) == [env.id]
    assert response.principal.api_key_id == key.id


async def test_two_environment_key_without_default_needs_one_named(harness: Harness, org: Org) -> None:
    env_a = await harness.new_environment(org, "A")
    env_b = await harness.new_environment(org, "B")
    _, secret = await harness.new_key(org, ["inboxes:read"], [env_a.id, env_b.id])
    response = await harness.verify(secret)
    assert not response.valid and response.denial_reason == Reason.ENVIRONMENT_REQUIRED
    assert response.principal.api_key_id and not response.principal.environment_id
    # A denial names the key but not its reach.
    assert not response.principal.allowed_environment_ids
    named = await harness.verify(secret, env_a.id)
    assert list(named.principal.allowed_environment_ids) == sorted([env_a.id, env_b.id])


async def test_key_for_a_is_refused_in_b_by_id_and_slug(harness: Harness, org: Org) -> None:
    env_a = await harness.new_environment(org, "A", slug="env-a")
    env_b = await harness.new_environment(org, "B", slug="env-b")
    _, secret = await harness.new_key(org, ["inboxes:read", "environments:read"], [env_a.id])
    for reference in (env_b.id, "env-b", org.default_environment.id, "default"):
        response = await harness.verify(secret, reference)
        assert not response.valid and response.denial_reason == Reason.ENVIRONMENT_NOT_ALLOWED
        assert not response.principal.environment_id
    random_env = await fails(
        harness.environments.GetEnvironment(
            environment_pb2.GetEnvironmentRequest(id="env_01J0000000000000000000000A"), metadata=auth(secret)
        ),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )
    for request in (
        environment_pb2.GetEnvironmentRequest(id=env_b.id),
        environment_pb2.GetEnvironmentRequest(slug="env-b"),
    ):
        failure = await fails(
            harness.environments.GetEnvironment(request, metadata=auth(secret, env_a.id)),
            Code.NOT_FOUND,
            "ENVIRONMENT_NOT_FOUND",
        )
        assert failure.message.split("'")[0] == random_env.message.split("'")[0]
    assert (await harness.verify(secret, "env-a")).valid


async def test_unknown_other_org_and_deleted_environments(harness: Harness, org: Org) -> None:
    other = await harness.new_org("Other")
    theirs = await harness.new_environment(other, "Theirs", slug="theirs")
    for reference in (theirs.id, "theirs", "env_01J0000000000000000000000A", "x" * 300):
        response = await harness.verify(org.owner_secret, reference)
        assert response.denial_reason == Reason.ENVIRONMENT_NOT_FOUND
    gone = await harness.new_environment(org, "Gone")
    await harness.delete_environment(org.owner_secret, gone.id)
    response = await harness.verify(org.owner_secret, gone.id)
    assert not response.valid and response.denial_reason == Reason.ENVIRONMENT_DELETED
    assert gone.id not in response.principal.allowed_environment_ids


async def test_scopes_are_checked_after_the_environment(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Env")
    _, secret = await harness.new_key(org, ["inboxes:read"], [env.id])
    assert (await harness.verify(secret, env.id, "inboxes:read")).valid
    response = await harness.verify(secret, env.id, "inboxes:read", "inboxes:write")
    assert not response.valid and response.denial_reason == Reason.SCOPE_MISSING
    # A denial names the key but neither the environment nor the scopes it would have had.
    assert response.principal.api_key_id and not response.principal.environment_id
    assert not response.principal.scopes
    response = await harness.verify(secret, "nope", "inboxes:write")
    assert response.denial_reason == Reason.ENVIRONMENT_NOT_FOUND
    failure = await fails(
        harness.api_keys.VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret, required_scopes=["inboxes:own"])),
        Code.INVALID_ARGUMENT,
        "UNKNOWN_SCOPE",
    )
    assert "required_scopes" in failure.violations
    # The same missing scope on a real call is PERMISSION_DENIED with reason SCOPE_MISSING.
    await fails(
        harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(), metadata=auth(secret)
        ),
        Code.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )


async def test_key_denials_still_name_the_key(harness: Harness, org: Org) -> None:
    key, secret = await harness.new_key(org, ["inboxes:read"], owner_member_id=org.owner_member_id)
    await harness.api_keys.RevokeApiKey(pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret))
    response = await harness.verify(secret, "default", "inboxes:read")
    assert not response.valid and response.denial_reason == Reason.REVOKED
    who = response.principal
    # The key and its organization, for the caller's logs; nothing of what the key may do.
    assert who == pb.Principal(organization_id=org.id, api_key_id=key.id)
    rolled_from, old_secret = await harness.new_key(org, ["inboxes:read"])
    await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=rolled_from.id), metadata=auth(org.owner_secret)
    )
    response = await harness.verify(old_secret)
    assert response.denial_reason == Reason.EXPIRED and response.principal.api_key_id == rolled_from.id


async def test_unknown_and_foreign_keys_look_the_same(harness: Harness, org: Org) -> None:
    from service.domain import keys
    from service.domain.models import KeyMode

    unknown = await harness.verify(keys.generate(KeyMode.LIVE).secret)
    assert not unknown.valid and unknown.denial_reason == Reason.NOT_FOUND
    assert not unknown.HasField("principal")
    empty = await harness.verify("")
    assert empty.denial_reason == Reason.MALFORMED and not empty.HasField("principal")
    # A key of another organization naming this organization's environment: the environment is
    # looked up in the key's own organization only.
    other = await harness.new_org("Other")
    response = await harness.verify(other.owner_secret, org.default_environment.id)
    assert response.denial_reason == Reason.ENVIRONMENT_NOT_FOUND
    assert response.principal.organization_id == other.id


async def test_corrupted_secret_is_refused_without_sql(harness: Harness, org: Org) -> None:
    secret = org.owner_secret
    for position in (6, 12, 30, len(secret) - 1):
        bad = corrupt(secret, position)
        with counted_sql(harness) as statements:
            response = await harness.verify(bad)
            failure = await fails(harness.whoami(bad), Code.UNAUTHENTICATED, "API_KEY_MALFORMED")
        assert response.denial_reason == Reason.MALFORMED and not response.valid
        assert bad not in failure.message
        assert statements == []
    for bad in ("ap_sk_live_short", secret + "x", secret.replace("live", "test"), "Bearer"):
        assert (await harness.verify(bad)).denial_reason == Reason.MALFORMED


async def test_warm_key_verifies_without_sql(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Hot")
    _, secret = await harness.new_key(org, ["inboxes:read"], [env.id])
    with counted_sql(harness) as cold:
        assert (await harness.verify(secret, env.id, "inboxes:read")).valid
    assert any("api_keys" in statement for statement in cold), "the counter must see the cold lookup"
    with counted_sql(harness) as statements:
        for _ in range(50):
            assert (await harness.verify(secret, env.id, "inboxes:read")).valid
    assert statements == []


async def test_revoke_is_seen_by_verify_on_the_next_call(harness: Harness, org: Org) -> None:
    key, secret = await harness.new_key(org, ["inboxes:read"])
    assert (await harness.verify(secret)).valid
    await harness.api_keys.RevokeApiKey(pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret))
    assert (await harness.verify(secret)).denial_reason == Reason.REVOKED


async def test_a_warm_granted_answer_follows_the_key_and_its_environments(harness: Harness, org: Org) -> None:
    """Granted answers are kept per key and environment while neither changes: every change of
    the key, or of the environments it may use, must show in the very next answer."""
    first = await harness.new_environment(org, "Memo one")
    second = await harness.new_environment(org, "Memo two")
    key, secret = await harness.new_key(org, ["inboxes:read", "inboxes:write"], [first.id])
    for _ in range(3):
        answer = await harness.verify(secret, first.id)
        assert answer.valid
        assert list(answer.principal.scopes) == ["inboxes:read", "inboxes:write"]
        assert list(answer.principal.allowed_environment_ids) == [first.id]

    key.scopes[:] = ["inboxes:read"]
    key = await harness.update_key(org.owner_secret, key, "scopes")
    answer = await harness.verify(secret, first.id)
    assert list(answer.principal.scopes) == ["inboxes:read"]
    assert (await harness.verify(secret, first.id, "inboxes:write")).denial_reason == Reason.SCOPE_MISSING

    key.environment_ids[:] = [first.id, second.id]
    key = await harness.update_key(org.owner_secret, key, "environment_ids")
    answer = await harness.verify(secret, first.id)
    assert sorted(answer.principal.allowed_environment_ids) == sorted([first.id, second.id])
    assert (await harness.verify(secret, second.id)).principal.environment_id == second.id

    await harness.environments.DeleteEnvironment(
        environment_pb2.DeleteEnvironmentRequest(id=second.id), metadata=auth(org.owner_secret)
    )
    assert list((await harness.verify(secret, first.id)).principal.allowed_environment_ids) == [first.id]
    assert not (await harness.verify(secret, second.id)).valid

    await harness.api_keys.RevokeApiKey(pb.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret))
    revoked = await harness.verify(secret, first.id)
    assert revoked.denial_reason == Reason.REVOKED and not revoked.principal.scopes
