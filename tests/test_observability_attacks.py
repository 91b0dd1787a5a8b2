"""Attacks on the observability surface: logs, Prometheus metrics and OpenTelemetry spans (SPEC
§7, README "Observability" and "What is logged, and what never is").

Each test runs a real server of its own that logs at DEBUG in both formats (text and json, with
the access log on), serves /metrics, records its spans in memory and throttles refused
credentials, or a `serve` process configured by its variables, and then tries to get through it:

- credentials: API key secrets of every state (valid, revoked, expired, owner removed, unknown),
  corrupted, truncated, padded, very long, in the wrong scheme, and the operator token, the
  verifier tokens and the key pepper, right and almost right; also a secret sent where no secret
  belongs (the environment header, VerifyApiKey's environment, page tokens, ids, scopes, field
  masks). Neither they, nor the SHA-256 or HMAC digest a key is stored as, nor the page-token
  signing key, may show in a log line (throttled refusals included), a metric, a span or an
  error answer; a `serve` process at DEBUG in json writes JSON objects only;
- tenants: an environment-scoped key probing another environment and another organization gets
  answers, log lines and spans that name no id outside what it sent and what it reaches, and
  metrics name no tenant at all;
- cardinality: thousands of made-up method paths, environment headers, request ids, secrets,
  scopes and resource ids never become metric label values, nor made-up method names span names;
- the /metrics endpoint: other paths, HEAD, POST, query strings, huge request lines, garbage,
  idle half-sent requests and concurrent scrapes under load: a clean answer every time, the gRPC
  server serving throughout, and a shutdown that does not hang;
- log injection: line breaks, ANSI escapes, C1 controls, JSON-breaking quotes in every value a
  caller controls, in request fields and in raw HTTP/2 headers (trace context included): the
  json format stays one object per line, the text format gets no forged line and no raw control
  character, every line of a call names it, and oversized headers never reach a log line;
- trace context: malformed, oversized and repeated `traceparent`, `tracestate` and `baggage`
  never break a call and never become span attributes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as kpb
from agentpost.environments.v1 import api_key_pb2_grpc, event_pb2_grpc, organization_pb2_grpc
from agentpost.environments.v1 import environment_pb2 as epb
from agentpost.environments.v1 import event_pb2 as evpb
from agentpost.environments.v1 import member_pb2 as mpb
from agentpost.environments.v1 import organization_pb2 as opb
from agentpost.environments.v1 import resource_pb2 as rpb
from google.protobuf import duration_pb2, field_mask_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from service.domain import keys
from service.domain.models import KeyMode
from service.storage.tables import ApiKeyRow, ServerSecretRow
from tests.harness import (
    OPERATOR_TOKEN,
    Failure,
    Harness,
    Org,
    auth,
    corrupt,
    create_organization,
)
from tests.observing import (
    HANG,
    PARENT_ID,
    PEPPER,
    SQLITE_ONLY,
    TRACE_ID,
    VALID_PARENT,
    VERIFIER_TOKENS,
    Observed,
    observed_server,
    server_spans,
    span_of,
)
from tests.own_database import own_database
from tests.plain_http2 import RawAnswer, raw_call
from tests.servers import Backend, free_port, service_process, stop_process

Code = grpc.StatusCode
PACKAGE = "agentpost.environments.v1"
AS_VERIFIER = (("authorization", f"Bearer {VERIFIER_TOKENS[0]}"),)
INBOX = rpb.ScopedResource.INBOX
ID = re.compile(r"\b(?:org|env|mem|key|evt)_[0-9A-HJKMNP-TV-Z]{26}\b")
# A text line as the text format starts one: time, level, logger, [request id].
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \[")
# Times and request ids, left out of what a leak report quotes.
NOISE = re.compile(r"\d{4}-\d\d-\d\d[ T][\d:.,+]+|\[[^\]]*\]|cred-[\w-]+")
JSON_FIELDS = {"time", "level", "logger", "message", "request_id", "method", "code", "duration_ms"}
# Characters that must never reach a log line raw: C0 controls but the tab, DEL, C1 controls
# (U+009B is an 8-bit CSI to a terminal), and the Unicode line and paragraph separators.
RAW_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


# -- a server whose every observable output is captured ----------------------------------------


@pytest.fixture
async def observed(backend: Backend, tmp_path: Path) -> AsyncIterator[Observed]:
    async with observed_server(backend, tmp_path) as server:
        yield server


def found_in(outputs: dict[str, list[str]], forbidden: dict[str, str]) -> dict[str, list[str]]:
    """For each forbidden value found anywhere: where, with what precedes it on its line (each
    distinct context once, times and request ids left out)."""
    found: dict[str, list[str]] = {}
    for name, value in forbidden.items():
        for where, lines in outputs.items():
            seen: set[str] = set()
            for line in lines:
                at = line.find(value)
                if at < 0:
                    continue
                context = NOISE.sub("", line[max(0, at - 90) : at])
                if context not in seen:
                    seen.add(context)
                    found.setdefault(name, []).append(f"{where}: {context!r} + <{name}>")
    return found


def report(found: dict[str, list[str]]) -> str:
    """What was found where, one line each."""
    return "\n".join(f"{name} in {place}" for name, places in found.items() for place in places)


async def new_org(server: Observed, name: str = "Acme") -> Org:
    response = await create_organization(server.harness.organizations, name)
    return Org(
        id=response.organization.id,
        owner_secret=response.owner_api_key_secret,
        owner_member_id=response.owner.id,
        owner_key_id=response.owner_api_key.id,
        default_environment=response.default_environment,
    )


# -- credentials never leak ---------------------------------------------------------------------


def body_of(secret: str) -> str:
    """The 32 random characters of a well-formed secret."""
    return secret.rsplit("_", 1)[1][:32]


def digests_of(name: str, secret: str) -> dict[str, str]:
    """The forms a stored digest of `secret` could be written in: SHA-256 and HMAC-SHA-256 keyed
    by the pepper, as hex (either case, whole or its first half) and base64."""
    forms: dict[str, str] = {}
    for kind, digest in (
        ("sha256", hashlib.sha256(secret.encode()).digest()),
        ("hmac", hmac.new(PEPPER.encode(), secret.encode(), hashlib.sha256).digest()),
    ):
        forms[f"{name} {kind} hex"] = digest.hex()
        forms[f"{name} {kind} HEX"] = digest.hex().upper()
        forms[f"{name} {kind} half hex"] = digest.hex()[:32]
        forms[f"{name} {kind} base64"] = base64.b64encode(digest).decode().rstrip("=")
        forms[f"{name} {kind} base64url"] = base64.urlsafe_b64encode(digest).decode().rstrip("=")
        forms[f"{name} {kind} bytes"] = repr(digest)[2:-1]
    return forms


async def stored_digests(server: Observed, key_ids: Sequence[str]) -> dict[str, str]:
    """The digests the database holds for these keys, as stored."""
    async with server.harness.app.engine.connect() as connection:
        rows = await connection.execute(
            select(ApiKeyRow.id, ApiKeyRow.secret_hash).where(ApiKeyRow.id.in_(list(key_ids)))
        )
        stored = {f"stored digest of {row.id}": str(row.secret_hash) for row in rows}
    assert len(stored) == len(key_ids), stored
    return stored


async def test_credentials_and_their_digests_never_reach_logs_metrics_spans_or_answers(
    observed: Observed,
) -> None:
    """Every credential the server knows or is sent, in every state and shape and in each other's
    places (a verifier token as a key, a key as the operator token, the pepper as anything), then
    a search of the text and json logs (DEBUG), /metrics, every span
    and every error answer for each of them, their 32 random characters, their SHA-256 and
    HMAC-SHA-256 digests (computed, and as stored), the operator and verifier tokens and the
    pepper. README: "Secrets, their hashes, the operator token, verifier tokens and the pepper are
    never logged, echoed in an error or stored in clear"."""
    h = observed.harness
    org = await new_org(observed)
    owner = org.owner_secret

    # A key in each state: revoked, owner removed, expired (rolled with no overlap), valid.
    revoked = await h.api_keys.CreateApiKey(
        kpb.CreateApiKeyRequest(name="revoked", scopes=["inboxes:read"]), metadata=auth(owner)
    )
    await h.api_keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=revoked.api_key.id), metadata=auth(owner))
    admin = await h.members.CreateMember(
        mpb.CreateMemberRequest(email=f"admin-{uuid.uuid4().hex[:8]}@example.com", role="ADMIN"),
        metadata=auth(owner),
    )
    orphaned = await h.api_keys.CreateApiKey(
        kpb.CreateApiKeyRequest(name="orphaned", scopes=["inboxes:read"], owner_member_id=admin.id),
        metadata=auth(owner),
    )
    await h.members.DeleteMember(mpb.DeleteMemberRequest(id=admin.id), metadata=auth(owner))
    expiring = await h.api_keys.CreateApiKey(
        kpb.CreateApiKeyRequest(name="expiring", scopes=["inboxes:read", "environments:read"]),
        metadata=auth(owner),
    )
    rolled = await h.api_keys.RollApiKey(
        kpb.RollApiKeyRequest(id=expiring.api_key.id, previous_key_ttl=duration_pb2.Duration(seconds=0)),
        metadata=auth(owner),
    )
    unknown = keys.generate(KeyMode.LIVE).secret
    secrets_by_state = {
        "owner": (owner, "OK"),
        "revoked": (revoked.secret, "API_KEY_REVOKED"),
        "owner-removed": (orphaned.secret, "API_KEY_OWNER_REMOVED"),
        "expired": (expiring.secret, "API_KEY_EXPIRED"),
        "rolled": (rolled.secret, "OK"),
        "unknown": (unknown, "API_KEY_NOT_FOUND"),
    }

    get_org = opb.GetOrganizationRequest()
    outcomes: dict[str, str] = {}

    async def as_caller(label: str, authorization: str) -> None:
        result = await observed.attempt(
            label,
            h.organizations.GetOrganization(
                get_org, metadata=(("authorization", authorization), ("x-request-id", f"cred-{label}"))
            ),
        )
        outcomes[label] = f"{result.code.name} {result.reason}" if isinstance(result, Failure) else "OK"

    for state, (secret, reason) in secrets_by_state.items():
        shapes = {
            "as-is": (f"Bearer {secret}", reason),
            "checksum-wrong": (f"Bearer {corrupt(secret, -1)}", "API_KEY_MALFORMED"),
            "body-wrong": (f"Bearer {corrupt(secret, 15)}", "API_KEY_MALFORMED"),
            "truncated": (f"Bearer {secret[:-1]}", "API_KEY_MALFORMED"),
            "padded": (f"Bearer {secret}x", "API_KEY_MALFORMED"),
            "very-long": (f"Bearer {secret * 150}", "API_KEY_MALFORMED"),
            "twice": (f"Bearer {secret} {secret}", "API_KEY_MALFORMED"),
            "no-scheme": (secret, "CREDENTIALS_MALFORMED"),
            "basic": (f"Basic {secret}", "CREDENTIALS_MALFORMED"),
        }
        for shape, (authorization, _) in shapes.items():
            await as_caller(f"{state}-{shape}", authorization)
        for shape, (authorization, _) in shapes.items():
            token = authorization.split(" ", 1)[-1]
            await observed.attempt(
                f"verify-{state}-{shape}",
                h.api_keys.VerifyApiKey(
                    kpb.VerifyApiKeyRequest(
                        secret=token, environment="default", required_scopes=["inboxes:read"]
                    ),
                    metadata=AS_VERIFIER,
                ),
            )
        expected = {f"{state}-{shape}": wanted for shape, (_, wanted) in shapes.items()}
        got = {label: outcomes[label].replace("UNAUTHENTICATED ", "") for label in expected}
        assert got == expected, (state, got)

    # The other credentials, right, almost right and in each other's places.
    await h.organizations.CreateOrganization(
        opb.CreateOrganizationRequest(name="Second", owner_email=f"o-{uuid.uuid4().hex[:8]}@example.com"),
        metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),),
    )
    for wrong in (
        OPERATOR_TOKEN + "x",
        OPERATOR_TOKEN[:-1],
        OPERATOR_TOKEN.upper(),
        PEPPER,
        VERIFIER_TOKENS[0],
    ):
        failure = await observed.attempt(
            f"operator {wrong[:4]}",
            h.organizations.CreateOrganization(
                opb.CreateOrganizationRequest(name="Nope", owner_email="nope@example.com"),
                metadata=(("authorization", f"Bearer {wrong}"),),
            ),
        )
        assert isinstance(failure, Failure), failure
        assert (failure.code, failure.reason) == (Code.UNAUTHENTICATED, "OPERATOR_TOKEN_INVALID")
    for token in (VERIFIER_TOKENS[0] + "x", VERIFIER_TOKENS[1][:-1], OPERATOR_TOKEN, PEPPER, owner):
        failure = await observed.attempt(
            f"verifier {token[:4]}",
            h.api_keys.VerifyApiKey(
                kpb.VerifyApiKeyRequest(secret=owner), metadata=(("authorization", f"Bearer {token}"),)
            ),
        )
        assert isinstance(failure, Failure), failure
        assert (failure.code, failure.reason) == (Code.UNAUTHENTICATED, "VERIFIER_TOKEN_REQUIRED")
    for token in (OPERATOR_TOKEN, PEPPER, *VERIFIER_TOKENS):
        await as_caller(f"as-key-{token[:4]}", f"Bearer {token}")
        assert outcomes[f"as-key-{token[:4]}"] == "UNAUTHENTICATED API_KEY_MALFORMED", outcomes
        verdict = await h.api_keys.VerifyApiKey(kpb.VerifyApiKeyRequest(secret=token), metadata=AS_VERIFIER)
        assert verdict.denial_reason == kpb.VerifyApiKeyResponse.MALFORMED

    outputs = await observed.outputs()
    # Read only now: the test's own read of the digests may be logged by the driver at DEBUG.
    key_ids = [
        org.owner_key_id,
        revoked.api_key.id,
        orphaned.api_key.id,
        expiring.api_key.id,
        rolled.api_key.id,
    ]
    forbidden: dict[str, str] = {
        "operator token": OPERATOR_TOKEN,
        "pepper": PEPPER,
        **{f"verifier token {n}": token for n, token in enumerate(VERIFIER_TOKENS)},
        **await stored_digests(observed, key_ids),
    }
    for state, (secret, _) in secrets_by_state.items():
        forbidden[f"{state} secret"] = secret
        forbidden[f"{state} random part"] = body_of(secret)
        forbidden[f"{state} secret, one character changed"] = corrupt(secret, 15)
        forbidden.update(digests_of(state, secret))

    # The search is meaningful: the calls were logged, counted and traced.
    text_log = "\n".join(outputs["text log"])
    assert "[cred-revoked-as-is]" in text_log and "[cred-unknown-very-long]" in text_log
    assert any(line.get("request_id") == "cred-owner-as-is" for line in observed.json_lines())
    assert 'agentpost_verify_api_key_total{outcome="REVOKED"}' in "\n".join(outputs["metrics"])
    assert len(outputs["spans"]) > 100
    leaks = found_in(outputs, forbidden)
    assert not leaks, report(leaks)


async def test_the_page_token_signing_key_never_leaves_the_database(backend: Backend, tmp_path: Path) -> None:
    """Without a pepper, page tokens are signed with a random key kept in `server_secrets`
    (README): "tokens cannot be forged without reading the database". So it must never be logged,
    exported in a span (the statement that reads it included), scraped or answered."""
    async with observed_server(backend, tmp_path, key_pepper=None) as server:
        h = server.harness
        org = await new_org(server)
        for name in ("One", "Two", "Three"):
            await h.environments.CreateEnvironment(
                epb.CreateEnvironmentRequest(name=name), metadata=auth(org.owner_secret)
            )
        token = ""
        pages = 0
        while True:
            page = await h.environments.ListEnvironments(
                epb.ListEnvironmentsRequest(page_size=1, page_token=token), metadata=auth(org.owner_secret)
            )
            pages += 1
            token = page.next_page_token
            if not token:
                break
            tampered = await server.attempt(
                "tampered",
                h.environments.ListEnvironments(
                    epb.ListEnvironmentsRequest(page_size=1, page_token=token[:-2] + "AA"),
                    metadata=auth(org.owner_secret),
                ),
            )
            assert isinstance(tampered, Failure) and tampered.reason == "INVALID_PAGE_TOKEN", tampered
        assert pages == 4
        outputs = await server.outputs()
        # Read only now: the test's own read may be logged by the driver at DEBUG.
        async with h.app.engine.connect() as connection:
            rows = await connection.execute(select(ServerSecretRow.name, ServerSecretRow.value))
            stored = {f"server secret {row.name}": str(row.value) for row in rows}
        assert stored and all(len(value) >= 32 for value in stored.values()), stored
        leaks = found_in(outputs, stored)
        assert not leaks, report(leaks)


# How the wrong places refuse a secret; VerifyApiKey answers ENVIRONMENT_NOT_FOUND and an event
# filter naming no key lists nothing, both OK.
MISPLACED_REFUSALS = {
    "environment header": "NOT_FOUND",
    "environments page token": "INVALID_ARGUMENT",
    "keys page token": "INVALID_ARGUMENT",
    "members page token": "INVALID_ARGUMENT",
    "resources page token": "INVALID_ARGUMENT",
    "events page token": "INVALID_ARGUMENT",
    "environment id": "NOT_FOUND",
    "environment slug": "NOT_FOUND",
    "key id": "NOT_FOUND",
    "revoke key id": "NOT_FOUND",
    "member id": "NOT_FOUND",
    "keys filter": "NOT_FOUND",
    "key environments": "NOT_FOUND",
    "key scope": "INVALID_ARGUMENT",
    "verify scope": "INVALID_ARGUMENT",
    "update mask": "INVALID_ARGUMENT",
}


async def misplace(observed: Observed, org: Org, misplaced: str) -> dict[str, str]:
    """Sends the valid secret `misplaced` (not the caller's) in every place where no secret
    belongs, as the owner; returns each call's code. Each is refused, none fails the server."""
    h = observed.harness
    owner = org.owner_secret
    owner_auth = auth(owner)
    wrong_places: list[tuple[str, Awaitable[Any]]] = [
        (
            "environment header",
            h.resources.ListResources(rpb.ListResourcesRequest(), metadata=auth(owner, misplaced)),
        ),
        (
            "verify environment",
            h.api_keys.VerifyApiKey(
                kpb.VerifyApiKeyRequest(secret=owner, environment=misplaced), metadata=AS_VERIFIER
            ),
        ),
        (
            "environments page token",
            h.environments.ListEnvironments(
                epb.ListEnvironmentsRequest(page_token=misplaced), metadata=owner_auth
            ),
        ),
        (
            "keys page token",
            h.api_keys.ListApiKeys(kpb.ListApiKeysRequest(page_token=misplaced), metadata=owner_auth),
        ),
        (
            "members page token",
            h.members.ListMembers(mpb.ListMembersRequest(page_token=misplaced), metadata=owner_auth),
        ),
        (
            "resources page token",
            h.resources.ListResources(rpb.ListResourcesRequest(page_token=misplaced), metadata=owner_auth),
        ),
        (
            "events page token",
            event_pb2_grpc.EventServiceStub(h.channel).ListEvents(
                evpb.ListEventsRequest(page_token=misplaced), metadata=owner_auth
            ),
        ),
        (
            "environment id",
            h.environments.GetEnvironment(epb.GetEnvironmentRequest(id=misplaced), metadata=owner_auth),
        ),
        (
            "environment slug",
            h.environments.GetEnvironment(epb.GetEnvironmentRequest(slug=misplaced), metadata=owner_auth),
        ),
        ("key id", h.api_keys.GetApiKey(kpb.GetApiKeyRequest(id=misplaced), metadata=owner_auth)),
        (
            "revoke key id",
            h.api_keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=misplaced), metadata=owner_auth),
        ),
        ("member id", h.members.GetMember(mpb.GetMemberRequest(id=misplaced), metadata=owner_auth)),
        (
            "keys filter",
            h.api_keys.ListApiKeys(kpb.ListApiKeysRequest(environment_id=misplaced), metadata=owner_auth),
        ),
        (
            "events filter",
            event_pb2_grpc.EventServiceStub(h.channel).ListEvents(
                evpb.ListEventsRequest(actor_api_key_id=misplaced), metadata=owner_auth
            ),
        ),
        (
            "key environments",
            h.api_keys.CreateApiKey(
                kpb.CreateApiKeyRequest(name="x", scopes=["inboxes:read"], environment_ids=[misplaced]),
                metadata=owner_auth,
            ),
        ),
        (
            "key scope",
            h.api_keys.CreateApiKey(
                kpb.CreateApiKeyRequest(name="x", scopes=[misplaced]), metadata=owner_auth
            ),
        ),
        (
            "verify scope",
            h.api_keys.VerifyApiKey(
                kpb.VerifyApiKeyRequest(secret=owner, required_scopes=[misplaced]), metadata=AS_VERIFIER
            ),
        ),
        (
            "update mask",
            h.environments.UpdateEnvironment(
                epb.UpdateEnvironmentRequest(
                    environment=epb.Environment(id=org.default_environment.id, name="Default"),
                    update_mask=field_mask_pb2.FieldMask(paths=[misplaced]),
                ),
                metadata=owner_auth,
            ),
        ),
    ]
    misplaced_outcomes: dict[str, str] = {}
    for label, call in wrong_places:
        result = await observed.attempt(label, call)
        misplaced_outcomes[label] = result.code.name if isinstance(result, Failure) else "OK"
    return misplaced_outcomes


async def misplaced_secret_outputs(observed: Observed) -> tuple[str, dict[str, list[str]]]:
    """A valid secret sent in every wrong place; the secret and what was observed."""
    org = await new_org(observed)
    created = await observed.harness.api_keys.CreateApiKey(
        kpb.CreateApiKeyRequest(name="misplaced", scopes=["inboxes:read"]), metadata=auth(org.owner_secret)
    )
    outcomes = await misplace(observed, org, created.secret)
    refused = {label: code for label, code in outcomes.items() if code != "OK"}
    assert refused == MISPLACED_REFUSALS, refused
    return created.secret, await observed.outputs()


async def test_a_secret_sent_where_no_secret_belongs_is_never_logged_scraped_or_traced(
    observed: Observed,
) -> None:
    """A caller who puts a key where an environment, an id, a scope, a page token or a field
    path belongs (a swapped configuration variable, a copy-paste slip) is refused; the key must
    not then be written to the logs, which operators ship and keep (README: "Secrets ... are
    never logged"), nor to metrics or spans. Its shape (`ap_sk_<mode>_` and a checksum) makes it
    recognisable wherever it is sent."""
    secret, outputs = await misplaced_secret_outputs(observed)
    del outputs["answers"]
    assert "ListResources NOT_FOUND" in "\n".join(outputs["text log"])
    leaks = found_in(outputs, {"secret": secret, "its random part": body_of(secret)})
    assert not leaks, report(leaks)


async def test_a_secret_sent_where_no_secret_belongs_is_never_echoed_in_the_answer(
    observed: Observed,
) -> None:
    """The same calls: the error message and details must not quote the key either. gRPC
    messages travel in `grpc-message` trailers that proxies, client libraries and error trackers
    record; README: secrets are never "echoed in an error". The answer can name the field and
    say that a secret was sent there without repeating it."""
    secret, outputs = await misplaced_secret_outputs(observed)
    assert len(outputs["answers"]) == len(MISPLACED_REFUSALS)
    leaks = found_in({"answers": outputs["answers"]}, {"secret": secret, "its random part": body_of(secret)})
    assert not leaks, report(leaks)


async def test_a_debug_json_server_process_writes_only_json_and_no_credential(
    backend: Backend, tmp_path: Path
) -> None:
    """`serve` as operators run it, configured by its own variables: AGENTPOST_LOG_LEVEL=DEBUG,
    AGENTPOST_LOG_FORMAT=json, the access log, a pepper, an operator token, verifier tokens and
    metrics. Organizations, keys, verifications, a revoke and refusals of every credential, plus
    the plain-HTTP/2 requests the README lists as answered by the gRPC runtime (an upper-case
    header name, an unknown method), then SIGTERM. Its standard error must
    be JSON objects, one per line (README: "one object per line"), all of them, and hold no
    credential or digest."""
    database = own_database(backend, tmp_path)
    port, metrics_port = free_port(), free_port()
    environment = database.environment(
        {
            "AGENTPOST_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "AGENTPOST_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
            "AGENTPOST_LOG_LEVEL": "DEBUG",
            "AGENTPOST_LOG_FORMAT": "json",
            "AGENTPOST_ACCESS_LOG": "true",
            "AGENTPOST_KEY_PEPPER": PEPPER,
            "AGENTPOST_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "AGENTPOST_VERIFIER_TOKENS": ",".join(VERIFIER_TOKENS),
            "AGENTPOST_SHUTDOWN_DRAIN_SECONDS": "0",
            "AGENTPOST_SHUTDOWN_GRACE_SECONDS": "1",
        }
    )
    stderr_path, stdout_path = tmp_path / "serve.err", tmp_path / "serve.out"
    with stderr_path.open("wb") as stderr, stdout_path.open("wb") as stdout:
        process = await service_process(
            "serve", "--migrate", env=environment, stdout=stdout.fileno(), stderr=stderr.fileno()
        )
    secrets: list[str] = []
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        async with channel, asyncio.timeout(90):
            while True:
                assert process.returncode is None, stderr_path.read_text()[-2000:]
                with contextlib.suppress(grpc.aio.AioRpcError):
                    checked = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if checked.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                await asyncio.sleep(0.1)
            organizations = organization_pb2_grpc.OrganizationServiceStub(channel)
            api_keys = api_key_pb2_grpc.ApiKeyServiceStub(channel)
            org = await create_organization(organizations)
            owner = org.owner_api_key_secret
            created = await api_keys.CreateApiKey(
                kpb.CreateApiKeyRequest(name="p", scopes=["inboxes:read"]), metadata=auth(owner)
            )
            await api_keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=created.api_key.id), metadata=auth(owner))
            unknown = keys.generate(KeyMode.LIVE).secret
            secrets = [owner, created.secret, unknown]
            verdict = await api_keys.VerifyApiKey(kpb.VerifyApiKeyRequest(secret=owner), metadata=AS_VERIFIER)
            assert verdict.valid
            refused = []
            for credential in (
                created.secret,
                unknown,
                corrupt(owner, -1),
                corrupt(owner, 15),
                owner * 10,
                PEPPER,
            ):
                refused.append(
                    organizations.GetOrganization(opb.GetOrganizationRequest(), metadata=auth(credential))
                )
                verdict = await api_keys.VerifyApiKey(
                    kpb.VerifyApiKeyRequest(secret=credential), metadata=AS_VERIFIER
                )
                assert not verdict.valid
            for token in (OPERATOR_TOKEN + "x", VERIFIER_TOKENS[0] + "x"):
                bearer = (("authorization", f"Bearer {token}"),)
                refused.append(api_keys.VerifyApiKey(kpb.VerifyApiKeyRequest(secret=owner), metadata=bearer))
                refused.append(
                    organizations.CreateOrganization(
                        opb.CreateOrganizationRequest(name="Nope", owner_email="nope@example.com"),
                        metadata=bearer,
                    )
                )
            for call in refused:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call
                assert raised.value.code() == Code.UNAUTHENTICATED
            list_path = f"/{PACKAGE}.ResourceService/ListResources"
            upper = await raw_call(port, list_path, [(b"Authorization", f"Bearer {owner}".encode())])
            made_up = await raw_call(port, f"/{PACKAGE}.Nope/Nope", [])
            assert (upper.status, made_up.status) == (13, 12), (upper, made_up)
            text = await asyncio.to_thread(
                lambda: (
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=HANG)
                    .read()
                    .decode()
                )
            )
            assert "grpc_server_handled_total" in text
            after = await organizations.GetOrganization(opb.GetOrganizationRequest(), metadata=auth(owner))
            assert after.id == org.organization.id
    finally:
        await stop_process(process)
    assert process.returncode == 0
    lines = stderr_path.read_text(errors="replace").splitlines()
    not_json = []
    for line in lines:
        try:
            parsed = json.loads(line)
        except ValueError:
            not_json.append(line[:200])
            continue
        if not isinstance(parsed, dict) or not set(parsed) >= JSON_FIELDS:
            not_json.append(line[:200])
    assert any('"logger": "service.access"' in line for line in lines)
    assert any('"level": "DEBUG"' in line for line in lines)
    forbidden = {"operator token": OPERATOR_TOKEN, "pepper": PEPPER}
    forbidden |= {f"verifier token {n}": token for n, token in enumerate(VERIFIER_TOKENS)}
    for n, secret in enumerate(secrets):
        forbidden |= {f"secret {n}": secret, f"secret {n} random part": body_of(secret)}
        forbidden |= digests_of(f"secret {n}", secret)
    leaks = found_in({"stderr": lines}, forbidden)
    assert not not_json and not leaks, "\n".join(
        [*(f"not a JSON log object: {line!r}" for line in not_json[:8]), report(leaks)]
    )


# -- tenants ------------------------------------------------------------------------------------

ALL_SCOPES = [
    "environments:read",
    "environments:write",
    "members:read",
    "members:write",
    "api_keys:read",
    "api_keys:write",
    "inboxes:read",
    "inboxes:write",
    "events:read",
]


def ids_in(*values: object) -> set[str]:
    """The resource ids (org_, env_, mem_, key_, evt_) written anywhere in `values`."""
    return {found for value in values for found in ID.findall(str(value))}


async def test_answers_logs_spans_and_metrics_name_no_id_outside_the_callers_reach(
    observed: Observed,
) -> None:
    """An environment-scoped key of a MEMBER (reaching one environment, "staging") probes, on
    every service, ids of another environment of its organization and of another organization,
    and uses a page token of its organization's owner. Every answer, and every log line and span
    of its calls, may name only ids it sent and ids within its reach (its organization, staging,
    its member and itself): never the environment that holds a resource it asked about, another
    member, key or organization (SPEC §4: "Existence is never leaked"). Metrics name no tenant
    id at all."""
    h = observed.harness
    a = await new_org(observed, "Tenant A")
    owner = auth(a.owner_secret)
    staging = await h.environments.CreateEnvironment(
        epb.CreateEnvironmentRequest(name="Staging"), metadata=owner
    )
    hidden = await h.environments.CreateEnvironment(
        epb.CreateEnvironmentRequest(name="Hidden"), metadata=owner
    )
    member = await h.members.CreateMember(
        mpb.CreateMemberRequest(email=f"m-{uuid.uuid4().hex[:8]}@example.com", role="MEMBER"), metadata=owner
    )
    await h.members.AddEnvironmentMember(
        mpb.AddEnvironmentMemberRequest(environment_id=staging.id, member_id=member.id, role="MEMBER"),
        metadata=owner,
    )
    other_member = await h.members.CreateMember(
        mpb.CreateMemberRequest(email=f"o-{uuid.uuid4().hex[:8]}@example.com", role="MEMBER"), metadata=owner
    )
    await h.members.AddEnvironmentMember(
        mpb.AddEnvironmentMemberRequest(environment_id=hidden.id, member_id=other_member.id, role="ADMIN"),
        metadata=owner,
    )
    caller = await h.api_keys.CreateApiKey(
        kpb.CreateApiKeyRequest(
            name="caller", scopes=ALL_SCOPES, environment_ids=[staging.id], owner_member_id=member.id
        ),
        metadata=owner,
    )
    hidden_key = await h.api_keys.CreateApiKey(
        kpb.CreateApiKeyRequest(name="hidden", scopes=["inboxes:read"], environment_ids=[hidden.id]),
        metadata=owner,
    )
    await h.resources.RegisterResource(
        rpb.RegisterResourceRequest(kind=INBOX, resource_id="hidden-inbox"),
        metadata=auth(a.owner_secret, hidden.id),
    )
    owner_page = await h.environments.ListEnvironments(
        epb.ListEnvironmentsRequest(page_size=1), metadata=owner
    )
    events_page = await event_pb2_grpc.EventServiceStub(h.channel).ListEvents(
        evpb.ListEventsRequest(page_size=1), metadata=owner
    )
    assert owner_page.next_page_token and events_page.next_page_token

    b = await new_org(observed, "Tenant B")
    b_member = await h.members.CreateMember(
        mpb.CreateMemberRequest(email=f"b-{uuid.uuid4().hex[:8]}@example.com", role="ADMIN"),
        metadata=auth(b.owner_secret),
    )
    b_key = await h.api_keys.CreateApiKey(
        kpb.CreateApiKeyRequest(name="b", scopes=["inboxes:read"]), metadata=auth(b.owner_secret)
    )
    await h.resources.RegisterResource(
        rpb.RegisterResourceRequest(kind=INBOX, resource_id="b-inbox"), metadata=auth(b.owner_secret)
    )

    reach = {a.id, staging.id, member.id, caller.api_key.id}
    secret = caller.secret
    events = event_pb2_grpc.EventServiceStub(h.channel)
    mask = field_mask_pb2.FieldMask
    probes: list[tuple[Message, str | None, Any]] = [
        (epb.GetEnvironmentRequest(id=hidden.id), None, h.environments.GetEnvironment),
        (epb.GetEnvironmentRequest(id=b.default_environment.id), None, h.environments.GetEnvironment),
        (epb.GetEnvironmentRequest(slug="hidden"), None, h.environments.GetEnvironment),
        (epb.GetEnvironmentRequest(slug="default"), None, h.environments.GetEnvironment),
        (
            epb.UpdateEnvironmentRequest(
                environment=epb.Environment(id=hidden.id, name="x"), update_mask=mask(paths=["name"])
            ),
            None,
            h.environments.UpdateEnvironment,
        ),
        (epb.DeleteEnvironmentRequest(id=hidden.id), None, h.environments.DeleteEnvironment),
        (epb.UndeleteEnvironmentRequest(id=hidden.id), None, h.environments.UndeleteEnvironment),
        (
            epb.ListEnvironmentsRequest(page_token=owner_page.next_page_token),
            None,
            h.environments.ListEnvironments,
        ),
        (mpb.GetMemberRequest(id=other_member.id), None, h.members.GetMember),
        (mpb.GetMemberRequest(id=b_member.id), None, h.members.GetMember),
        (
            mpb.UpdateMemberRequest(
                member=mpb.Member(id=other_member.id, display_name="x"),
                update_mask=mask(paths=["display_name"]),
            ),
            None,
            h.members.UpdateMember,
        ),
        (mpb.DeleteMemberRequest(id=b_member.id), None, h.members.DeleteMember),
        (
            mpb.AddEnvironmentMemberRequest(environment_id=hidden.id, member_id=member.id, role="MEMBER"),
            None,
            h.members.AddEnvironmentMember,
        ),
        (
            mpb.AddEnvironmentMemberRequest(environment_id=staging.id, member_id=b_member.id, role="MEMBER"),
            None,
            h.members.AddEnvironmentMember,
        ),
        (mpb.ListEnvironmentMembersRequest(environment_id=hidden.id), None, h.members.ListEnvironmentMembers),
        (
            mpb.ListMemberEnvironmentsRequest(member_id=other_member.id),
            None,
            h.members.ListMemberEnvironments,
        ),
        (
            mpb.RemoveEnvironmentMemberRequest(environment_id=hidden.id, member_id=other_member.id),
            None,
            h.members.RemoveEnvironmentMember,
        ),
        (kpb.GetApiKeyRequest(id=hidden_key.api_key.id), None, h.api_keys.GetApiKey),
        (kpb.GetApiKeyRequest(id=b_key.api_key.id), None, h.api_keys.GetApiKey),
        (
            kpb.UpdateApiKeyRequest(
                api_key=kpb.ApiKey(id=hidden_key.api_key.id, name="x"), update_mask=mask(paths=["name"])
            ),
            None,
            h.api_keys.UpdateApiKey,
        ),
        (kpb.RevokeApiKeyRequest(id=hidden_key.api_key.id), None, h.api_keys.RevokeApiKey),
        (kpb.RollApiKeyRequest(id=b_key.api_key.id), None, h.api_keys.RollApiKey),
        (
            kpb.CreateApiKeyRequest(name="x", scopes=["inboxes:read"], environment_ids=[hidden.id]),
            None,
            h.api_keys.CreateApiKey,
        ),
        (
            kpb.CreateApiKeyRequest(
                name="x",
                scopes=["inboxes:read"],
                environment_ids=[staging.id],
                owner_member_id=other_member.id,
            ),
            None,
            h.api_keys.CreateApiKey,
        ),
        (
            kpb.CreateApiKeyRequest(name="x", scopes=["inboxes:read"], owner_member_id=b_member.id),
            None,
            h.api_keys.CreateApiKey,
        ),
        (kpb.ListApiKeysRequest(environment_id=hidden.id), None, h.api_keys.ListApiKeys),
        (
            kpb.UpdateApiKeyRequest(
                api_key=kpb.ApiKey(id=caller.api_key.id, environment_ids=[staging.id, hidden.id]),
                update_mask=mask(paths=["environment_ids"]),
            ),
            None,
            h.api_keys.UpdateApiKey,
        ),
        (rpb.ListResourcesRequest(), hidden.id, h.resources.ListResources),
        (rpb.ListResourcesRequest(), b.default_environment.id, h.resources.ListResources),
        (rpb.ListResourcesRequest(), "default", h.resources.ListResources),
        (rpb.GetResourceRequest(kind=INBOX, resource_id="hidden-inbox"), staging.id, h.resources.GetResource),
        (rpb.GetResourceRequest(kind=INBOX, resource_id="b-inbox"), staging.id, h.resources.GetResource),
        (
            rpb.RegisterResourceRequest(kind=INBOX, resource_id="hidden-inbox"),
            staging.id,
            h.resources.RegisterResource,
        ),
        (
            rpb.DeregisterResourceRequest(kind=INBOX, resource_id="hidden-inbox"),
            staging.id,
            h.resources.DeregisterResource,
        ),
        (rpb.ListOrphanedResourcesRequest(environment_id=hidden.id), None, h.resources.ListOrphanedResources),
        (
            rpb.ReassignResourcesRequest(from_environment_id=hidden.id, to_environment_id=staging.id),
            None,
            h.resources.ReassignResources,
        ),
        (evpb.ListEventsRequest(environment_id=hidden.id), None, events.ListEvents),
        (evpb.ListEventsRequest(resource_id=hidden_key.api_key.id), None, events.ListEvents),
        (evpb.ListEventsRequest(actor_api_key_id=b_key.api_key.id), None, events.ListEvents),
        (evpb.ListEventsRequest(page_token=events_page.next_page_token), None, events.ListEvents),
    ]
    sent_by_request: dict[str, set[str]] = {}
    refused = 0
    for number, (request, environment, method) in enumerate(probes):
        request_id = f"tenant-probe-{number}"
        sent = ids_in(request, environment)
        sent_by_request[request_id] = sent
        result = await observed.attempt(
            f"{type(request).__name__} {sent}",
            method(request, metadata=auth(secret, environment, request_id)),
        )
        if isinstance(result, Failure):
            refused += 1
            assert result.code not in (Code.INTERNAL, Code.UNKNOWN), result
            beyond = (
                ids_in(result.message, result.metadata, result.violations, result.trailers) - sent - reach
            )
            assert not beyond, (type(request).__name__, sent, result)
        else:
            beyond = ids_in(result) - sent - reach
            assert not beyond, (type(request).__name__, sent, result)
    assert refused >= len(probes) - 4, refused

    outputs = await observed.outputs()
    lines = [line for line in observed.json_lines() if line["request_id"] in sent_by_request]
    assert len(lines) >= len(probes) + refused  # each call logged its access line, refusals their reason too
    for line in lines:
        beyond = ids_in(line["message"], line["method"]) - sent_by_request[line["request_id"]] - reach
        assert not beyond, line
    calls = [span for span in observed.spans.get_finished_spans() if span.kind == SpanKind.SERVER]
    probed = [
        span for span in calls if (span.attributes or {}).get("agentpost.request_id") in sent_by_request
    ]
    assert len(probed) == len(probes)
    for span in probed:
        request_id = str((span.attributes or {})["agentpost.request_id"])
        trace = [
            each
            for each in observed.spans.get_finished_spans()
            if each.context.trace_id == span.context.trace_id
        ]
        beyond = ids_in(*(each.to_json(indent=None) for each in trace)) - sent_by_request[request_id] - reach
        assert not beyond, (span.name, beyond)
    assert ids_in(*outputs["metrics"]) == set()


# -- cardinality --------------------------------------------------------------------------------

SERVICES = {
    service.full_name: set(service.methods_by_name)
    for module in (kpb, epb, evpb, mpb, opb, rpb)
    for service in module.DESCRIPTOR.services_by_name.values()
}
KNOWN_SERVICES = {
    *SERVICES,
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
    "unknown",
}
KNOWN_METHODS = {
    *(method for methods in SERVICES.values() for method in methods),
    "Check",
    "Watch",
    "List",
    "ServerReflectionInfo",
    "unknown",
}
OUTCOMES = {"VALID"} | {
    name for name, _ in kpb.VerifyApiKeyResponse.DenialReason.items() if name != "DENIAL_REASON_UNSPECIFIED"
}
# The documented label values of each series that has labels (README "Metrics").
ALLOWED_LABELS: dict[str, set[str]] = {
    "grpc_service": KNOWN_SERVICES,
    "grpc_method": KNOWN_METHODS,
    "grpc_type": {"unary", "server_stream", "client_stream", "bidi_stream", "unknown"},
    "grpc_code": {code.name for code in Code},
    "outcome": OUTCOMES,
    "cache": {"keys", "organizations"},
    "state": {"in_use", "idle"},
}
# Labels of the client library's standard series (process_*, python_*) and of histograms.
LIBRARY_LABELS = {"le", "implementation", "major", "minor", "patchlevel", "version", "generation"}

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def series_of(text: str) -> Series:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


async def bounded_gather(calls: Sequence[Callable[[], Awaitable[Any]]], at_once: int = 32) -> list[Any]:
    """Makes every call, at most `at_once` at a time (a gRPC call starts when it is made); returns
    results or AioRpcErrors."""
    gate = asyncio.Semaphore(at_once)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                return error

    async with asyncio.timeout(120):
        return await asyncio.gather(*(one(call) for call in calls))


def codes_of(results: Sequence[Any]) -> set[str]:
    return {result.code().name if isinstance(result, grpc.aio.AioRpcError) else "OK" for result in results}


def answers_of(results: Sequence[Any]) -> dict[str, int]:
    """How many results had each code and message."""
    counted: dict[str, int] = {}
    for result in results:
        what = (
            f"{result.code().name} {result.details()}" if isinstance(result, grpc.aio.AioRpcError) else "OK"
        )
        counted[what] = counted.get(what, 0) + 1
    return counted


async def test_attacker_chosen_values_never_become_metric_series(observed: Observed) -> None:
    """A caller controls method paths, environment headers, request ids, secrets, environments
    and scopes sent to VerifyApiKey, and resource ids. Thousands of distinct ones must not become
    label values (README: a label per made-up name "would grow without bound"): afterwards every
    label of every series holds a documented value, the exposition has grown by a bounded number
    of series, and the counters still count exactly what happened. Unknown secrets are never
    cached: the key cache holds as many entries as before."""
    h = observed.harness
    org = await new_org(observed)
    owner = org.owner_secret
    await h.organizations.GetOrganization(opb.GetOrganizationRequest(), metadata=auth(owner))
    before_text = await observed.scrape()
    before = series_of(before_text)
    per_kind = 300

    paths = [
        path
        for n in range(per_kind)
        for path in (
            f"/{PACKAGE}.ApiKeyService/NopeMethod{n}",
            f"/{PACKAGE}.NopeService{n}/VerifyApiKey",
            f"/made.up{n}.Service/Method",
            f"/{PACKAGE}.ApiKeyService/VerifyApiKey/{n}",
            f"/grpc.health.v1.Health/Nope{n}",
        )
    ]
    unknown = await bounded_gather(
        [functools.partial(h.channel.unary_unary(path), b"", timeout=HANG) for path in paths]
    )
    assert answers_of(unknown) == {"UNIMPLEMENTED Method not found!": len(paths)}

    headers = await bounded_gather(
        [
            functools.partial(
                h.resources.ListResources, rpb.ListResourcesRequest(), metadata=auth(owner, f"nope-env-{n}")
            )
            for n in range(per_kind)
        ]
    )
    assert codes_of(headers) == {"NOT_FOUND"}
    request_ids = await bounded_gather(
        [
            functools.partial(
                h.organizations.GetOrganization,
                opb.GetOrganizationRequest(),
                metadata=auth(owner, request_id=f"nope-request-{n}"),
            )
            for n in range(per_kind)
        ]
    )
    assert codes_of(request_ids) == {"OK"}
    secrets = await bounded_gather(
        [
            functools.partial(
                h.api_keys.VerifyApiKey,
                kpb.VerifyApiKeyRequest(secret=keys.generate(KeyMode.LIVE).secret),
                metadata=AS_VERIFIER,
            )
            for _ in range(per_kind)
        ]
    )
    assert {answer.denial_reason for answer in secrets} == {kpb.VerifyApiKeyResponse.NOT_FOUND}
    environments = await bounded_gather(
        [
            functools.partial(
                h.api_keys.VerifyApiKey,
                kpb.VerifyApiKeyRequest(secret=owner, environment=f"nope-env-{n}"),
                metadata=AS_VERIFIER,
            )
            for n in range(per_kind)
        ]
    )
    assert {answer.denial_reason for answer in environments} == {
        kpb.VerifyApiKeyResponse.ENVIRONMENT_NOT_FOUND
    }
    scopes = await bounded_gather(
        [
            functools.partial(
                h.api_keys.VerifyApiKey,
                kpb.VerifyApiKeyRequest(secret=owner, required_scopes=[f"nope{n}:read"]),
                metadata=AS_VERIFIER,
            )
            for n in range(per_kind)
        ]
    )
    assert codes_of(scopes) == {"INVALID_ARGUMENT"}
    registered = await bounded_gather(
        [
            functools.partial(
                h.resources.RegisterResource,
                rpb.RegisterResourceRequest(kind=INBOX, resource_id=f"nope-resource-{n}"),
                metadata=auth(owner),
            )
            for n in range(per_kind // 2)
        ]
    )
    assert codes_of(registered) == {"OK"}

    await asyncio.sleep(0.2)  # calls ended by an abort are counted a moment after their answer
    after_text = await observed.scrape()
    after = series_of(after_text)
    undocumented = {
        (name, label, value)
        for name, labels in after
        for label, value in labels
        if label not in LIBRARY_LABELS and value not in ALLOWED_LABELS.get(label, set())
    }
    assert not undocumented, sorted(undocumented)[:10]
    assert "nope" not in after_text.lower()
    # The exposition grew by the series of the few (method, code) pairs used, not per value.
    assert len(after) - len(before) <= 100, len(after) - len(before)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    unknown_labels = {"grpc_type": "unknown", "grpc_service": "unknown", "grpc_method": "unknown"}
    counted = {
        "unimplemented": grew("grpc_server_handled_total", grpc_code="UNIMPLEMENTED", **unknown_labels),
        "not found": grew("agentpost_verify_api_key_total", outcome="NOT_FOUND"),
        "environment not found": grew("agentpost_verify_api_key_total", outcome="ENVIRONMENT_NOT_FOUND"),
        "invalid": grew(
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service=f"{PACKAGE}.ApiKeyService",
            grpc_method="VerifyApiKey",
            grpc_code="INVALID_ARGUMENT",
        ),
        "headers": grew(
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service=f"{PACKAGE}.ResourceService",
            grpc_method="ListResources",
            grpc_code="NOT_FOUND",
        ),
        "misses": grew("agentpost_access_cache_key_misses_total"),
        "cached keys": grew("agentpost_access_cache_entries", cache="keys"),
        "cached organizations": grew("agentpost_access_cache_entries", cache="organizations"),
    }
    assert counted == {
        "unimplemented": len(paths),
        "not found": per_kind,
        "environment not found": per_kind,
        "invalid": per_kind,
        "headers": per_kind,
        "misses": per_kind,
        "cached keys": 0,
        "cached organizations": 0,
    }


# -- spans --------------------------------------------------------------------------------------


@SQLITE_ONLY
async def test_made_up_method_names_never_name_spans(observed: Observed) -> None:
    """Every call is a span, calls to methods nobody serves included; but the span of such a call
    must not be named by, nor carry as `rpc.service`/`rpc.method`, the path the caller made up.
    Span names are meant to be low-cardinality, and OpenTelemetry's RPC conventions say a method
    the server does not recognise is `_OTHER` (the original only in `rpc.method_original`);
    README: a name per made-up method "would grow without bound", which is why metrics count them
    under `unknown`. Three hundred made-up paths, one of 8,000 characters."""
    paths = [
        *(f"/made.up{n}.Service/Method" for n in range(150)),
        *(f"/{PACKAGE}.ApiKeyService/NopeMethod{n}" for n in range(149)),
        "/" + "madeup" * 1333 + "/Method",
    ]
    results = await bounded_gather(
        [functools.partial(observed.harness.channel.unary_unary(path), b"", timeout=HANG) for path in paths]
    )
    assert answers_of(results) == {"UNIMPLEMENTED Method not found!": len(paths)}
    await asyncio.sleep(0.2)
    unimplemented = [
        span
        for span in server_spans(observed)
        if (span.attributes or {}).get("rpc.grpc.status_code") == Code.UNIMPLEMENTED.value[0]
    ]
    assert len(unimplemented) == len(paths)
    carrying = {
        f"{where}={value[:60]}"
        for span in unimplemented
        for where, value in (
            ("name", span.name),
            *(
                (key, str(value))
                for key, value in (span.attributes or {}).items()
                if key != "rpc.method_original"
            ),
        )
        if "madeup" in value.lower().replace(".", "") or "nope" in value.lower()
    }
    assert not carrying, f"{len(carrying)} made-up names, e.g. {sorted(carrying)[:4]}"
    assert len({span.name for span in unimplemented}) == 1


@SQLITE_ONLY
async def test_hostile_trace_context_neither_breaks_calls_nor_lands_in_spans(observed: Observed) -> None:
    """`traceparent`, `tracestate` and `baggage` are the caller's to send and the server's to
    distrust. Malformed, all-zero, unknown-version, upper-case, padded, oversized and repeated
    `traceparent`s, `tracestate`s of 100 members, 8 KB or 32 members of 200 characters, `baggage`
    of 200 entries or 8 KB: each call is answered OK as without them; an invalid `traceparent` starts a new trace (W3C Trace
    Context: a parent that does not parse is ignored); a valid one is continued with at most 32
    `tracestate` members in at most 512 characters (W3C's limits); and no span attribute carries
    what the headers held."""
    h = observed.harness
    org = await new_org(observed)
    long_state = ",".join(f"tsmark{n}=v{n}" for n in range(100))
    wide_state = ",".join(f"tsmark{n}=" + "w" * 190 for n in range(32))
    mixed_state = ",".join([*(f"long{n}=" + "l" * 200 for n in range(4)), "keep1=a", "keep2=b"])
    cases: dict[str, tuple[tuple[str, str], ...]] = {
        "garbage": (("traceparent", "tsmark-garbage"),),
        "all-zero": (("traceparent", f"00-{'0' * 32}-{'0' * 16}-01"),),
        "zero-parent": (("traceparent", f"00-{TRACE_ID}-{'0' * 16}-01"),),
        "version-ff": (("traceparent", f"ff-{TRACE_ID}-{PARENT_ID}-01"),),
        "upper-case": (("traceparent", f"00-{TRACE_ID.upper()}-{PARENT_ID.upper()}-01"),),
        "extra-field": (("traceparent", f"{VALID_PARENT}-tsmark"),),
        "oversized": (("traceparent", VALID_PARENT + "0" * 8000),),
        "repeated": (("traceparent", VALID_PARENT), ("traceparent", f"00-{'1' * 32}-{'2' * 16}-01")),
        "many-states": (("traceparent", VALID_PARENT), ("tracestate", long_state)),
        "long-state": (("traceparent", VALID_PARENT), ("tracestate", "tsmark=" + "v" * 8000)),
        "bad-state": (("traceparent", VALID_PARENT), ("tracestate", "tsmark,=,==,@@@")),
        # 32 valid members of 200 characters: about 6.4 KB OpenTelemetry alone would keep.
        "wide-state": (("traceparent", VALID_PARENT), ("tracestate", wide_state)),
        # Short members after long ones: the long ones go first (W3C), the short ones stay.
        "mixed-state": (("traceparent", VALID_PARENT), ("tracestate", mixed_state)),
        "many-baggage": (("baggage", ",".join(f"bgmark{n}=v{n}" for n in range(200))),),
        "long-baggage": (("baggage", "bgmark=" + "v" * 8000),),
        "valid-baggage": (("traceparent", VALID_PARENT), ("baggage", "bgmark=1,tenant=org_x")),
    }
    answered = {}
    for name, headers in cases.items():
        result = await observed.attempt(
            name,
            h.organizations.GetOrganization(
                opb.GetOrganizationRequest(),
                metadata=(*auth(org.owner_secret, request_id=f"tc-{name}"), *headers),
            ),
        )
        answered[name] = "OK" if isinstance(result, opb.Organization) and result.id == org.id else str(result)
    assert answered == dict.fromkeys(cases, "OK")

    continued = {"many-states", "long-state", "bad-state", "wide-state", "mixed-state", "valid-baggage"}
    invalid = {"garbage", "all-zero", "zero-parent", "version-ff", "upper-case", "oversized"}
    for name in cases:
        span = span_of(observed, f"tc-{name}")
        assert span.context.trace_id != 0
        if name in invalid:
            assert span.parent is None, name
        if name in continued:
            assert span.context.trace_id == int(TRACE_ID, 16), name
            assert span.parent is not None and span.parent.span_id == int(PARENT_ID, 16), name
            assert len(span.context.trace_state) <= 32, (name, len(span.context.trace_state))
            # W3C's bound on what is propagated: 512 characters, members over 128 dropped first.
            header = span.context.trace_state.to_header()
            assert len(header) <= 512, (name, len(header))
        carried = {
            key: str(value)[:40]
            for key, value in (span.attributes or {}).items()
            if "tsmark" in str(value) or "bgmark" in str(value)
        }
        assert not carried, (name, carried)
        assert span.events == () or all("tsmark" not in str(event.attributes) for event in span.events)
    assert len(span_of(observed, "tc-wide-state").context.trace_state) == 0
    assert span_of(observed, "tc-mixed-state").context.trace_state.to_header() == "keep1=a,keep2=b"


async def _raw_get_organization(
    h: Harness, org: Org, request_id: str, headers: Sequence[tuple[bytes, bytes]]
) -> RawAnswer:
    """GetOrganization with the owner's key over plain HTTP/2, with these extra headers (which a
    gRPC client would not send as they are)."""
    return await raw_call(
        h.app.port,
        f"/{PACKAGE}.OrganizationService/GetOrganization",
        [
            (b"authorization", f"Bearer {org.owner_secret}".encode()),
            (b"x-request-id", request_id.encode()),
            *headers,
        ],
    )


@SQLITE_ONLY
async def test_trace_context_headers_cannot_forge_log_lines_or_leak_a_secret(observed: Observed) -> None:
    """The trace context headers are read for every traced call, before authentication. Sent over
    plain HTTP/2 with a line break, an escape sequence or a secret in a `tracestate` member or a
    `baggage` entry that does not parse, they must not reach a log line raw: no forged line in
    the text format, no raw control character, and no secret (README: "Secrets ... are never
    logged"). Each call is answered OK: the headers are only telemetry."""
    h = observed.harness
    org = await new_org(observed)
    secret = (
        await h.api_keys.CreateApiKey(
            kpb.CreateApiKeyRequest(name="in baggage", scopes=["inboxes:read"]),
            metadata=auth(org.owner_secret),
        )
    ).secret
    forged = "\n2030-01-01 00:00:00 ERROR service.forged [forged] forged line"
    parent = (b"traceparent", VALID_PARENT.encode())
    cases: dict[str, list[tuple[bytes, bytes]]] = {
        "state-newline": [parent, (b"tracestate", f"a=1,forged{forged}".encode())],
        "state-escape": [parent, (b"tracestate", b"a=1,esc\x1b[2J\x1b[31mred")],
        "state-secret": [parent, (b"tracestate", f"a=1,{secret}".encode())],
        "baggage-newline": [(b"baggage", f"a=1,forged{forged}".encode())],
        "baggage-escape": [(b"baggage", b"a=1,esc\x1b[2J\x1b[31mred")],
        "baggage-secret": [(b"baggage", f"a=1,{secret}".encode())],
        "baggage-long-secret": [(b"baggage", f"a={'v' * 8200},{secret}".encode())],
    }
    answers: dict[str, tuple[int | None, str]] = {}
    for name, headers in cases.items():
        answer = await _raw_get_organization(h, org, f"tc-{name}", headers)
        answers[name] = (answer.status, answer.message)
    assert answers == dict.fromkeys(cases, (0, ""))

    outputs = await observed.outputs()
    text = outputs["text log"]
    assert any("[tc-state-newline]" in line for line in text)
    problems = [
        line[:160]
        for line in text
        if line and (not TEXT_LINE.match(line) or RAW_CONTROL.search(line) or line.startswith("2030-"))
    ]
    for line in observed.json_lines():
        assert set(line) >= JSON_FIELDS, line
    del outputs["answers"]
    leaks = found_in(outputs, {"secret": secret})
    assert not problems and not leaks, "\n".join(
        [*(f"bad line: {line!r}" for line in problems[:6]), report(leaks)]
    )


@SQLITE_ONLY
async def test_repeated_trace_context_headers_follow_w3c(observed: Observed) -> None:
    """Sent over plain HTTP/2 (a gRPC client sends one of each): two `tracestate` headers are one
    list, as HTTP joins repeated headers (W3C Trace Context), kept in order; of two `traceparent`
    headers gRPC hands the server only the last, which is continued. Both calls are answered OK."""
    h = observed.harness
    org = await new_org(observed)
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    cases: dict[str, list[tuple[bytes, bytes]]] = {
        "two-parents": [(b"traceparent", VALID_PARENT.encode()), (b"traceparent", other.encode())],
        "two-states": [
            (b"traceparent", VALID_PARENT.encode()),
            (b"tracestate", b"first=1"),
            (b"tracestate", b"second=2,third=3"),
        ],
    }
    for name, headers in cases.items():
        answer = await _raw_get_organization(h, org, f"tc-{name}", headers)
        assert (answer.status, answer.message) == (0, ""), name
    await asyncio.sleep(0.2)  # spans end as their calls finish
    parents = span_of(observed, "tc-two-parents")
    assert parents.parent is not None and parents.context.trace_id == int("1" * 32, 16)
    states = span_of(observed, "tc-two-states")
    assert states.context.trace_id == int(TRACE_ID, 16)
    assert states.context.trace_state.to_header() == "first=1,second=2,third=3"


@SQLITE_ONLY
async def test_lines_logged_while_reading_trace_context_name_the_call(observed: Observed) -> None:
    """README: "Every line logged during a call names the call's request id and method." A call
    whose `tracestate` member and `baggage` entry do not parse makes the server log while it reads
    them; those lines belong to the call and must carry its request id and method like every
    other line it logs (else an operator cannot tell which caller sent them), if they are written
    at all."""
    h = observed.harness
    org = await new_org(observed)
    result = await h.organizations.GetOrganization(
        opb.GetOrganizationRequest(),
        metadata=(
            *auth(org.owner_secret, request_id="tc-named"),
            ("traceparent", VALID_PARENT),
            ("tracestate", "a=1,not-a-member"),
            ("baggage", "not-an-entry"),
        ),
    )
    assert result.id == org.id
    await asyncio.sleep(0.2)
    lines = [
        line
        for line in observed.json_lines()
        if "not-a-member" in line["message"] or "not-an-entry" in line["message"]
    ]
    # The service may keep such lines out of its log (it silences the propagators' warnings);
    # whatever is written about them belongs to the call.
    unnamed = [
        (line["logger"], line["request_id"], line["method"])
        for line in lines
        if line["request_id"] != "tc-named"
        or line["method"] != f"/{PACKAGE}.OrganizationService/GetOrganization"
    ]
    assert not unnamed, unnamed


@SQLITE_ONLY
async def test_throttled_refusals_log_no_credential(backend: Backend, tmp_path: Path) -> None:
    """Past the failed-authentication limit, refusals are RESOURCE_EXHAUSTED and one warning is
    logged (README). Neither that warning nor the once-a-minute refusal line may hold any of the
    refused credentials, the valid key of the same caller, or their digests."""
    async with observed_server(backend, tmp_path, auth_failures_per_minute=3) as server:
        h = server.harness
        org = await new_org(server)
        refused = [
            keys.generate(KeyMode.LIVE).secret,
            corrupt(org.owner_secret, -1),
            corrupt(org.owner_secret, 15),
            org.owner_secret * 3,
            OPERATOR_TOKEN,
            PEPPER,
        ]
        codes = []
        for credential in refused:
            result = await server.attempt(
                "refused",
                h.organizations.GetOrganization(opb.GetOrganizationRequest(), metadata=auth(credential)),
            )
            assert isinstance(result, Failure)
            codes.append(f"{result.code.name} {result.reason}")
        assert codes[3:] == ["RESOURCE_EXHAUSTED TOO_MANY_AUTH_FAILURES"] * 3, codes
        assert (
            await h.organizations.GetOrganization(
                opb.GetOrganizationRequest(), metadata=auth(org.owner_secret)
            )
        ).id == org.id
        outputs = await server.outputs()
        text = "\n".join(outputs["text log"])
        assert "refused credentials from" in text and "throttled" in text
        forbidden = {f"credential {n}": value for n, value in enumerate(refused)}
        forbidden |= {"owner secret": org.owner_secret, "owner random part": body_of(org.owner_secret)}
        forbidden |= digests_of("owner", org.owner_secret)
        leaks = found_in(outputs, forbidden)
        assert not leaks, report(leaks)


# -- the /metrics endpoint ----------------------------------------------------------------------


@dataclass
class HttpAnswer:
    status: int | None
    headers: dict[str, str]
    body: bytes
    raw: bytes


async def http_exchange(port: int, request: bytes, *, close_write: bool = False) -> HttpAnswer:
    """Sends `request` as is and reads until the server closes (at most HANG seconds). A server
    that resets the connection has answered what arrived before the reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(HANG):
            with contextlib.suppress(ConnectionError):
                writer.write(request)
                await writer.drain()
                if close_write:
                    writer.write_eof()
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0]) if lines else None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpAnswer(int(match.group(1)) if match else None, headers, body, raw)


def get(path: str, *extra: str, method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *extra]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@SQLITE_ONLY
async def test_the_metrics_endpoint_answers_hostile_http_cleanly_while_grpc_serves(
    observed: Observed,
) -> None:
    """The metrics port is an HTTP server any process that reaches it can talk to. Query strings,
    HEAD, POST, other paths, path traversal, an 80 KB request line, 200 headers, a TLS hello, an
    HTTP/2 preface, a NUL: each gets an HTTP answer or a closed connection within the hang limit,
    never a 5xx; a file outside the registry is never served. Meanwhile 40 connections that send half a request and stall, 64 concurrent scrapes and
    600 gRPC calls go on: every scrape parses, every call is answered, and afterwards /metrics
    and gRPC still answer and the server stops without hanging."""
    h = observed.harness
    org = await new_org(observed)
    port = observed.metrics_port

    stalled = []
    for _ in range(40):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metr")
        await writer.drain()
        stalled.append(writer)

    baseline = await http_exchange(port, get("/metrics"))
    assert baseline.status == 200 and baseline.headers["content-type"].startswith("text/plain")
    assert b"grpc_server_handled_total" in baseline.body

    answers: dict[str, HttpAnswer] = {}
    for name, request in {
        "query": get("/metrics?name[]=grpc_server_handled_total&x=%00%ff%0a"),
        "bad query": get("/metrics?name[]=%zz&&&=&name[]=" + "a" * 2000),
        "head": get("/metrics", method="HEAD"),
        "post": get("/metrics", method="POST", body=b"grpc_server_handled_total 1e9"),
        "put": get("/metrics", method="PUT", body=b"x"),
        "options": get("/metrics", method="OPTIONS"),
        "made-up method": get("/metrics", method="BREW"),
        "other path": get("/admin"),
        "traversal": get("/../../../../etc/passwd"),
        "encoded traversal": get("/%2e%2e/%2e%2e/etc/passwd"),
        "absolute url": get("http://169.254.169.254/latest/meta-data/"),
        "favicon": get("/favicon.ico"),
        "long line": get("/metrics?" + "a" * 80_000),
        "many headers": get("/metrics", *(f"X-Pad-{n}: v" for n in range(200))),
        "huge header": get("/metrics", "X-Pad: " + "v" * 70_000),
        "openmetrics": get("/metrics", "Accept: application/openmetrics-text; version=1.0.0"),
        "gzip": get("/metrics", "Accept-Encoding: gzip"),
        "http/0.9": b"GET /metrics\r\n",
        "tls hello": bytes.fromhex("16030100a5010000a10303") + b"\x00" * 200,
        "h2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 30,
        "nul": b"GET /metrics\x00 HTTP/1.1\r\n\r\n",
        "bare newlines": b"GET /metrics HTTP/1.1\nHost: x\nConnection: close\n\n",
    }.items():
        answers[name] = await http_exchange(port, request, close_write=True)
    server_errors = {name: answer.status for name, answer in answers.items() if (answer.status or 0) >= 500}
    assert not server_errors, server_errors
    assert all(b"root:" not in answer.raw for answer in answers.values())
    assert answers["head"].status in (200, 405), answers["head"].status
    assert answers["query"].status == 200
    assert answers["long line"].status in (None, 400, 414), answers["long line"].status
    assert answers["huge header"].status in (None, 400, 431), answers["huge header"].status

    async def scrape_many() -> list[str]:
        return await asyncio.gather(*(observed.scrape() for _ in range(64)))

    calls = [
        functools.partial(
            h.organizations.GetOrganization, opb.GetOrganizationRequest(), metadata=auth(org.owner_secret)
        )
        for _ in range(600)
    ]
    scraped, called = await asyncio.gather(scrape_many(), bounded_gather(calls))
    assert codes_of(called) == {"OK"}
    assert all("grpc_server_handled_total" in text for text in scraped)
    for text in scraped:
        series_of(text)

    for writer in stalled:
        writer.close()
    after = series_of(await observed.scrape())
    assert (
        sample(
            after,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service=f"{PACKAGE}.OrganizationService",
            grpc_method="GetOrganization",
            grpc_code="OK",
        )
        == 600
    )
    check = await h.health.Check(health_pb2.HealthCheckRequest(), timeout=HANG)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


@SQLITE_ONLY
async def test_a_head_request_for_metrics_is_answered_without_a_body(observed: Observed) -> None:
    """HEAD /metrics (what some load balancers and uptime checkers send): whatever the status, a
    response to HEAD carries no content (RFC 9110 §9.3.2: "The server SHOULD send the same header
    fields ... However, a server MUST NOT send content in the response to HEAD"), or a client
    reading the next response on that connection reads these bytes as its start."""
    answer = await http_exchange(observed.metrics_port, get("/metrics", method="HEAD"), close_write=True)
    assert answer.status in (200, 405), answer.raw[:200]
    assert answer.body == b"", (
        f"HEAD answered {answer.status} with {len(answer.body)} bytes: {answer.body[:80]!r}"
    )


@SQLITE_ONLY
async def test_the_server_stops_while_metrics_connections_stall(backend: Backend, tmp_path: Path) -> None:
    """Connections to the metrics port that send half a request and never finish must not keep
    the server from stopping (SIGTERM's shutdown, README): it stops within the hang limit and
    the metrics port is closed afterwards."""
    async with observed_server(backend, tmp_path) as server:
        port = server.metrics_port
        stalled = []
        for _ in range(20):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            stalled.append(writer)
        assert "grpc_server_handled_total" in await server.scrape()
    # observed_server stopped the server within HANG seconds, or failed the test.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    for writer in stalled:
        writer.close()


# -- log injection ------------------------------------------------------------------------------

FORGED = "2030-01-01 00:00:00,000 ERROR service.forged [forged] forged line"
HOSTILE = {
    "newline": f"inj\n{FORGED}",
    "crlf": f"inj\r\n{FORGED}",
    "ansi": "inj\x1b[2J\x1b[1;31mred\x1b]0;title\x07",
    "json": 'inj"}\n{"level": "ERROR", "message": "forged", "x": "',
    "unicode-lines": f"inj\u2028{FORGED}\u2029\x85{FORGED}",
    "c1-csi": "inj\x9b31mred",
    "nul-del": "inj\x00nul\x7fdel",
    "format": "inj%s%d%(message)s{0}{message}",
    "quotes": "inj\\\"'`\\n",
}


def hostile_calls(h: Harness, org: Org, value: str) -> list[tuple[str, Awaitable[Any]]]:
    """A call for every request field a caller fills in with `value`, as the owner."""
    owner = auth(org.owner_secret)
    events = event_pb2_grpc.EventServiceStub(h.channel)
    env = org.default_environment.id
    return [
        (
            "env name",
            h.environments.CreateEnvironment(epb.CreateEnvironmentRequest(name=value), metadata=owner),
        ),
        (
            "env slug",
            h.environments.CreateEnvironment(
                epb.CreateEnvironmentRequest(name="Ok", slug=value), metadata=owner
            ),
        ),
        (
            "env description",
            h.environments.UpdateEnvironment(
                epb.UpdateEnvironmentRequest(
                    environment=epb.Environment(id=env, description=value),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                ),
                metadata=owner,
            ),
        ),
        ("get by slug", h.environments.GetEnvironment(epb.GetEnvironmentRequest(slug=value), metadata=owner)),
        ("get by id", h.environments.GetEnvironment(epb.GetEnvironmentRequest(id=value), metadata=owner)),
        (
            "page token",
            h.environments.ListEnvironments(epb.ListEnvironmentsRequest(page_token=value), metadata=owner),
        ),
        (
            "update mask",
            h.environments.UpdateEnvironment(
                epb.UpdateEnvironmentRequest(
                    environment=epb.Environment(id=env, name="Default"),
                    update_mask=field_mask_pb2.FieldMask(paths=[value]),
                ),
                metadata=owner,
            ),
        ),
        (
            "member email",
            h.members.CreateMember(mpb.CreateMemberRequest(email=value, role="MEMBER"), metadata=owner),
        ),
        (
            "member name",
            h.members.CreateMember(
                mpb.CreateMemberRequest(
                    email=f"n-{uuid.uuid4().hex[:8]}@example.com", display_name=value, role="MEMBER"
                ),
                metadata=owner,
            ),
        ),
        ("member id", h.members.GetMember(mpb.GetMemberRequest(id=value), metadata=owner)),
        (
            "key name",
            h.api_keys.CreateApiKey(
                kpb.CreateApiKeyRequest(name=value, scopes=["inboxes:read"]), metadata=owner
            ),
        ),
        (
            "key scope",
            h.api_keys.CreateApiKey(kpb.CreateApiKeyRequest(name="x", scopes=[value]), metadata=owner),
        ),
        ("key id", h.api_keys.RevokeApiKey(kpb.RevokeApiKeyRequest(id=value), metadata=owner)),
        (
            "verify secret",
            h.api_keys.VerifyApiKey(kpb.VerifyApiKeyRequest(secret=value), metadata=AS_VERIFIER),
        ),
        (
            "verify environment",
            h.api_keys.VerifyApiKey(
                kpb.VerifyApiKeyRequest(secret=org.owner_secret, environment=value), metadata=AS_VERIFIER
            ),
        ),
        (
            "verify scope",
            h.api_keys.VerifyApiKey(
                kpb.VerifyApiKeyRequest(secret=org.owner_secret, required_scopes=[value]),
                metadata=AS_VERIFIER,
            ),
        ),
        (
            "resource id",
            h.resources.RegisterResource(
                rpb.RegisterResourceRequest(kind=INBOX, resource_id=value), metadata=owner
            ),
        ),
        (
            "resource name",
            h.resources.RegisterResource(
                rpb.RegisterResourceRequest(
                    kind=INBOX, resource_id=f"r-{uuid.uuid4().hex[:8]}", display_name=value
                ),
                metadata=owner,
            ),
        ),
        (
            "resource lookup",
            h.resources.GetResource(rpb.GetResourceRequest(kind=INBOX, resource_id=value), metadata=owner),
        ),
        ("events filter", events.ListEvents(evpb.ListEventsRequest(resource_id=value), metadata=owner)),
        ("events page token", events.ListEvents(evpb.ListEventsRequest(page_token=value), metadata=owner)),
        (
            "organization name",
            h.organizations.CreateOrganization(
                opb.CreateOrganizationRequest(
                    name=value, owner_email=f"x-{uuid.uuid4().hex[:8]}@example.com"
                ),
                metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),),
            ),
        ),
    ]


def bad_text_lines(lines: Sequence[str]) -> list[str]:
    """Text-format lines that do not start as the format starts a line, start with the forged
    line's time, or hold a raw control character (the empty string after the last newline
    aside)."""
    return [
        line
        for line in lines
        if line and (not TEXT_LINE.match(line) or RAW_CONTROL.search(line) or line.startswith("2030-"))
    ]


def shapes_of(lines: Sequence[str]) -> str:
    """Each distinct kind of bad line once: its logger and message up to the hostile value."""
    shapes: dict[str, str] = {}
    for line in lines:
        shape = NOISE.sub("", line).split("inj", 1)[0].strip()[:110]
        shapes.setdefault(shape, line[:200])
    return f"{len(lines)} bad lines, {len(shapes)} kinds:\n" + "\n".join(
        repr(line) for line in shapes.values()
    )


async def test_hostile_values_cannot_forge_or_break_log_lines(observed: Observed) -> None:
    """Line breaks (LF, CRLF, U+2028/2029, NEL), ANSI and C1 escape sequences, NUL and DEL,
    JSON-breaking quotes and format directives, in every request field a caller fills in (names,
    slugs, descriptions, emails, ids, scopes, field masks, page tokens, VerifyApiKey's inputs,
    resource ids) and, over plain HTTP/2, in every header the service reads and in the method
    path. Whatever the service accepts, refuses and logs: every json line is one object with the
    README's fields; every text line starts as the format starts one and holds no raw control
    character (a forged line, or an escape sequence rewriting an operator's terminal, is an
    injection); no call is answered INTERNAL or UNKNOWN; the calls were logged."""
    h = observed.harness
    org = await new_org(observed)
    outcomes: dict[str, set[str]] = {}
    for kind, value in HOSTILE.items():
        for label, call in hostile_calls(h, org, value):
            result = await observed.attempt(f"{kind} {label}", call)
            outcomes.setdefault(result.code.name if isinstance(result, Failure) else "OK", set()).add(label)
    raw_headers = {
        "x-request-id": lambda value: [(b"x-request-id", value)],
        "x-agentpost-environment": lambda value: [(b"x-agentpost-environment", value)],
        "x-agentpost-min-revision": lambda value: [(b"x-agentpost-min-revision", value)],
    }
    raw_answers: dict[str, int | None] = {}
    for kind, value in HOSTILE.items():
        encoded = value.encode()
        for header, make in raw_headers.items():
            answer: RawAnswer = await raw_call(
                h.app.port,
                f"/{PACKAGE}.ResourceService/ListResources",
                [(b"authorization", f"Bearer {org.owner_secret}".encode()), *make(encoded)],
            )
            raw_answers[f"{kind} {header}"] = answer.status
        answer = await raw_call(
            h.app.port,
            f"/{PACKAGE}.OrganizationService/GetOrganization",
            [(b"authorization", b"Bearer " + encoded)],
        )
        raw_answers[f"{kind} authorization"] = answer.status
        answer = await raw_call(h.app.port, f"/{PACKAGE}.Nope{value}Service/M", [])
        raw_answers[f"{kind} raw path"] = answer.status

    assert "INTERNAL" not in outcomes and "UNKNOWN" not in outcomes, outcomes
    # OK with a made-up request id; the environment NOT_FOUND; the revision INVALID_ARGUMENT;
    # the credential UNAUTHENTICATED; the path UNIMPLEMENTED.
    expected = {"x-request-id": 0, "x-agentpost-environment": 5, "x-agentpost-min-revision": 3}
    expected |= {"authorization": 16, "raw path": 12}
    assert raw_answers == {f"{kind} {where}": code for kind in HOSTILE for where, code in expected.items()}
    outputs = await observed.outputs()
    json_lines = observed.json_lines()
    assert all(set(line) >= JSON_FIELDS for line in json_lines)
    access = [line for line in json_lines if line["logger"] == "service.access"]
    assert len(access) >= len(HOSTILE) * 22
    bad = bad_text_lines(outputs["text log"])
    assert not bad, shapes_of(bad)
    errors = [line for line in json_lines if line["level"] in ("ERROR", "CRITICAL") or "exception" in line]
    assert not errors, errors[:3]


@SQLITE_ONLY
async def test_oversized_headers_are_refused_before_they_reach_a_log_line(observed: Observed) -> None:
    """README "Documented transport-level exceptions": request metadata over 16 KiB in total is
    RESOURCE_EXHAUSTED, "refused while the headers arrive"; the service never sees it. That bound
    is also what keeps a quoted header value from making log lines of any size. Sent over plain
    HTTP/2 (any HTTP/2 client, or a proxy passing headers through): a 200 KB
    `x-agentpost-environment`, and 1,000 small entries. Each must be RESOURCE_EXHAUSTED, and no
    line logged is longer than the limit allows."""
    h = observed.harness
    org = await new_org(observed)
    bearer = (b"authorization", f"Bearer {org.owner_secret}".encode())
    path = f"/{PACKAGE}.ResourceService/ListResources"
    huge = await raw_call(h.app.port, path, [bearer, (b"x-agentpost-environment", b"e" * 200_000)])
    many = await raw_call(h.app.port, path, [bearer, *((f"x-pad-{n}".encode(), b"v") for n in range(1000))])
    await asyncio.sleep(0.2)
    longest = max(len(line) for line in observed.text_log.getvalue().split("\n"))
    answers = {"200 KB header": (huge.status, huge.reason), "1,000 entries": (many.status, many.reason)}
    too_large = (8, "METADATA_TOO_LARGE")
    assert answers == {"200 KB header": too_large, "1,000 entries": too_large}, (
        answers,
        f"longest log line {longest}",
    )
    assert longest <= 20_000, longest


async def test_a_request_id_cannot_pass_for_fields_of_a_text_line(observed: Observed) -> None:
    """A printable request id that looks like the end of the request-id field and the start of
    other fields (`] ERROR service.forged [`) is echoed and kept in JSON lines as sent, but in
    text lines it is %-escaped: the field after the logger is the whole escaped id, and no line
    shows the forged level or logger as fields."""
    h = observed.harness
    org = await new_org(observed)
    forged = "x] ERROR service.forged [y"
    call = h.environments.ListEnvironments(
        epb.ListEnvironmentsRequest(), metadata=(*auth(org.owner_secret), ("x-request-id", forged))
    )
    await call
    assert dict(await call.trailing_metadata()).get("x-request-id") == forged
    outputs = await observed.outputs()
    escaped = "[x%5D%20ERROR%20service.forged%20%5By]"
    lines = [line for line in outputs["text log"] if escaped in line]
    assert lines, "the call was not logged"
    assert not [line for line in outputs["text log"] if "] ERROR service.forged [" in line]
    for line in lines:
        assert TEXT_LINE.match(line), line
        assert line.split(" ", 5)[4] == escaped, line  # date, time, level, logger, [request id]
    assert any(entry.get("request_id") == forged for entry in observed.json_lines())
