"""Attacks on how the service reads request metadata (SPEC §2 "Request metadata", §7).

The headers the service reads are `authorization` (an API key, the operator token, or on
VerifyApiKey a verifier token), `x-agentpost-environment` (the environment context of
ResourceService calls) and `x-request-id` (echoed in trailing metadata, in log lines and in the
events a write records). `x-agentpost-min-revision` is attacked in `test_freshness_attacks.py`.
These tests send what a gRPC client sends and, over plain HTTP/2, bytes a conforming gRPC client
refuses to send but any other HTTP/2 client (or a REST transcoder passing HTTP/1.1 headers
through) can:

- non-ASCII, invalid UTF-8 and control bytes in each header: a clean answer, never
  `INTERNAL`/`UNKNOWN` (SPEC §2), never an environment of someone else, never a forged log line;
- a repeated `x-agentpost-environment` never silently picks one of the contexts it names;
- `-bin` headers named like the service's headers are not those headers;
- every refused `authorization` form counts once against the failed-authentication throttle,
  and refusals that are not about credentials (or VerifyApiKey answers) never count (SPEC §7);
- hundreds of metadata entries are served, or refused by the runtime, and the server stays up.

Header parsing does not depend on the database, so the tests that only parse run on SQLite;
those where a write commits run on both databases.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2, environment_pb2, environment_pb2_grpc
from agentpost.environments.v1 import resource_pb2 as rpb

from service.domain import keys
from service.domain.models import KeyMode
from tests.empty_database import empty_database
from tests.harness import Harness, Org, auth, fails, stored_events
from tests.plain_http2 import raw_call
from tests.servers import Backend, serving

Code = grpc.StatusCode
ENVIRONMENT = "x-agentpost-environment"
REQUEST_ID = "x-request-id"
INBOX = rpb.ScopedResource.INBOX
SERVICE = "/agentpost.environments.v1."
LIST_RESOURCES = SERVICE + "ResourceService/ListResources"
REGISTER_RESOURCE = SERVICE + "ResourceService/RegisterResource"
VERIFY_API_KEY = SERVICE + "ApiKeyService/VerifyApiKey"
WATCH_EVENTS = SERVICE + "EventService/WatchEvents"
LIST = environment_pb2.ListEnvironmentsRequest()
HANG = 10.0
# Header parsing does not depend on the database: these tests run on SQLite only.
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
# grpc-status codes as numbers, as they travel in HTTP/2 trailers.
OK, NOT_FOUND_STATUS, INTERNAL, UNAUTHENTICATED_STATUS = 0, 5, 13, 16


def bearer(secret: str) -> tuple[bytes, bytes]:
    """The `authorization` header of `secret`, as bytes."""
    return (b"authorization", f"Bearer {secret}".encode())


def register_request(resource_id: str) -> rpb.RegisterResourceRequest:
    return rpb.RegisterResourceRequest(kind=INBOX, resource_id=resource_id)


async def resources_in(harness: Harness, secret: str, environment: str) -> list[str]:
    """The ids of the resources listed in `environment`'s context."""
    page = await harness.resources.ListResources(
        rpb.ListResourcesRequest(page_size=500), metadata=auth(secret, environment)
    )
    return sorted(resource.resource_id for resource in page.resources)


@contextlib.asynccontextmanager
async def own_server(backend: Backend, folder: Path, **settings: object) -> AsyncIterator[Harness]:
    """A server and database of its own with `settings` (a throttle limit, verifier tokens)."""
    async with empty_database(backend, folder) as database, serving(database, **settings) as harness:
        yield harness


# -- the plain HTTP/2 call is faithful ----------------------------------------------------------


@SQLITE_ONLY
async def test_the_raw_http2_call_is_answered_as_a_grpc_client_is(harness: Harness, org: Org) -> None:
    """The plain HTTP/2 call the attacks below use is faithful: a valid key answers OK with the
    ASCII request id echoed, an unknown key UNAUTHENTICATED API_KEY_NOT_FOUND with its ErrorInfo,
    and a request message reaches the service (a registration lands in the default context)."""
    ok = await raw_call(
        harness.app.port, LIST_RESOURCES, [bearer(org.owner_secret), (b"x-request-id", b"raw-1")]
    )
    assert (ok.status, ok.reset, ok.request_id) == (OK, False, b"raw-1")
    refused = await raw_call(harness.app.port, LIST_RESOURCES, [bearer(keys.generate(KeyMode.LIVE).secret)])
    assert (refused.status, refused.reason) == (UNAUTHENTICATED_STATUS, "API_KEY_NOT_FOUND")
    written = await raw_call(
        harness.app.port,
        REGISTER_RESOURCE,
        [bearer(org.owner_secret)],
        register_request("raw-write").SerializeToString(),
    )
    assert written.status == OK, written
    assert await resources_in(harness, org.owner_secret, "default") == ["raw-write"]


# -- x-request-id -------------------------------------------------------------------------------

NON_ASCII_REQUEST_IDS = ["réq-1".encode(), "請求-1".encode(), b"r\xffq-invalid-utf8"]


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("method", "secret_kind", "expected"),
    [
        (LIST_RESOURCES, "valid", OK),
        (LIST_RESOURCES, "unknown", UNAUTHENTICATED_STATUS),
        (VERIFY_API_KEY, "none", OK),
        (WATCH_EVENTS, "unknown", UNAUTHENTICATED_STATUS),
    ],
    ids=["ok-call", "refused-call", "verify", "refused-stream"],
)
async def test_a_non_ascii_request_id_never_turns_an_answer_into_internal(
    harness: Harness, org: Org, method: str, secret_kind: str, expected: int
) -> None:
    """A request id of non-ASCII (printable) characters or invalid UTF-8, which any HTTP/2 client
    or a REST transcoder passing an HTTP/1.1 header through can send, must leave the answer as it
    is without it (SPEC §2: never INTERNAL for anything a client sent); the id echoed in the
    trailers must be one gRPC can carry (printable ASCII), e.g. a made-up one. A call that would
    succeed or be refused must not be answered INTERNAL "Invalid metadata" because its trailers
    could not be sent."""
    headers: list[tuple[bytes, bytes]] = []
    if secret_kind == "valid":
        headers.append(bearer(org.owner_secret))
    elif secret_kind == "unknown":
        headers.append(bearer(keys.generate(KeyMode.LIVE).secret))
    answers = {}
    for request_id in NON_ASCII_REQUEST_IDS:
        answer = await raw_call(harness.app.port, method, [*headers, (b"x-request-id", request_id)])
        answers[request_id] = (answer.status, answer.message, answer.request_id)
    wrong = {
        request_id: answer
        for request_id, answer in answers.items()
        if answer[0] != expected or answer[2] is None or not answer[2].isascii()
    }
    assert not wrong, f"expected grpc-status {expected} and an ASCII request id echoed; got {wrong}"


async def test_a_write_with_a_non_ascii_request_id_is_answered_as_it_committed(
    harness: Harness, org: Org
) -> None:
    """A registration sent with a non-ASCII request id commits (the resource is there) and must be
    answered OK. Answering INTERNAL for a committed write tells the client to retry what already
    happened (its retry is ALREADY_EXISTS) and leaves it without the registered resource."""
    answer = await raw_call(
        harness.app.port,
        REGISTER_RESOURCE,
        [bearer(org.owner_secret), (b"x-request-id", "réq-write".encode())],
        register_request("non-ascii-request-id").SerializeToString(),
    )
    committed = await resources_in(harness, org.owner_secret, "default") == ["non-ascii-request-id"]
    assert committed, f"nothing was registered; answer {answer}"
    assert answer.status == OK, (
        f"the write committed but was answered grpc-status {answer.status} {answer.message!r}"
        f" ({INTERNAL} is INTERNAL)"
    )


@SQLITE_ONLY
@pytest.mark.parametrize(
    "request_id",
    [
        b"forged\n2026-01-01 ERROR service forged line",
        b"cr\rhere",
        b"nul\x00here",
        b"tab\there",
        b"esc\x1b[31m",
    ],
    ids=["newline", "carriage-return", "nul", "tab", "escape"],
)
async def test_control_characters_in_the_request_id_are_neither_echoed_nor_logged(
    harness: Harness, org: Org, caplog: pytest.LogCaptureFixture, request_id: bytes
) -> None:
    """A request id with control characters is replaced by a made-up one: the trailers echo the
    made-up id, every line the call logs carries it, and no logged message holds a line break (the
    environment header's bytes, quoted in the NOT_FOUND logged for the call, included): a text
    log cannot be given a forged line."""
    caplog.set_level(logging.INFO, logger="service")
    answer = await raw_call(
        harness.app.port,
        LIST_RESOURCES,
        [
            bearer(org.owner_secret),
            (b"x-request-id", request_id),
            (ENVIRONMENT.encode(), b"nope\n2026-01-01 ERROR service forged line"),
        ],
    )
    assert (answer.status, answer.reason) == (NOT_FOUND_STATUS, "ENVIRONMENT_NOT_FOUND")
    echoed = answer.request_id
    assert echoed is not None and echoed.isascii() and echoed.decode().isprintable()
    assert echoed != request_id and b"forged" not in echoed and b"here" not in echoed
    lines = [record for record in caplog.records if "ENVIRONMENT_NOT_FOUND" in record.getMessage()]
    assert lines, "the refusal was not logged"
    for record in lines:
        assert getattr(record, "request_id", None) == echoed.decode()
        assert "\n" not in record.getMessage() and "\r" not in record.getMessage()


@SQLITE_ONLY
async def test_a_repeated_request_id_is_echoed_and_recorded_as_one_id(harness: Harness, org: Org) -> None:
    """Two `x-request-id` entries: the answer echoes one id, one of those sent, and the event the
    write recorded carries that same id, so the trailer and the audit log agree."""
    call = harness.resources.RegisterResource(
        register_request("twice-request-id"),
        metadata=(*auth(org.owner_secret), (REQUEST_ID, "first-id"), (REQUEST_ID, "second-id")),
    )
    await call
    echoed = [value for key, value in tuple(await call.trailing_metadata()) if key == REQUEST_ID]
    assert len(echoed) == 1 and echoed[0] in ("first-id", "second-id"), echoed
    recorded = [event.request_id for event in await stored_events(harness, org.id)][-1]
    assert recorded == echoed[0]


# -- x-agentpost-environment --------------------------------------------------------------------


async def test_a_repeated_environment_header_is_refused(harness: Harness, org: Org) -> None:
    """`x-agentpost-environment` sent twice naming two environments (staging then the default,
    the default then staging, an id then a slug): which one a proxy or library in between would
    have used is anyone's guess, so, as for a repeated `authorization` or
    `x-agentpost-min-revision`, the call must be refused, INVALID_ARGUMENT naming the header, and
    nothing may be written in either environment. Acting in one of them (today: the last) silently
    writes to production a resource the caller also named staging for."""
    staging = await harness.new_environment(org, "Staging")
    outcomes = {}
    for number, names in enumerate(
        (("staging", "default"), ("default", "staging"), (staging.id, "default"), ("default", staging.id))
    ):
        metadata = (*auth(org.owner_secret), *((ENVIRONMENT, name) for name in names))
        try:
            created = await harness.resources.RegisterResource(
                register_request(f"twice-{number}"), metadata=metadata
            )
            outcomes[names] = f"OK in {'staging' if created.environment_id == staging.id else 'default'}"
        except grpc.aio.AioRpcError as error:
            outcomes[names] = error.code().name
            if error.code() == Code.INVALID_ARGUMENT:
                failure = await fails(
                    harness.resources.ListResources(rpb.ListResourcesRequest(), metadata=metadata),
                    Code.INVALID_ARGUMENT,
                )
                assert ENVIRONMENT in failure.violations, failure
    assert set(outcomes.values()) == {"INVALID_ARGUMENT"}, outcomes
    await fails(
        harness.resources.ListResources(
            rpb.ListResourcesRequest(),
            metadata=(*auth(org.owner_secret), (ENVIRONMENT, "x"), (ENVIRONMENT, "x")),
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_ENVIRONMENT_HEADER",
    )
    assert await resources_in(harness, org.owner_secret, "default") == []
    assert await resources_in(harness, org.owner_secret, "staging") == []


async def test_an_empty_environment_header_is_refused_not_read_as_absent(harness: Harness, org: Org) -> None:
    """An empty `x-agentpost-environment` (say, a configuration variable that came out empty)
    names no environment. Read as absent it would act in the default environment, which is
    production in many organizations; so it is INVALID_ARGUMENT INVALID_ENVIRONMENT_HEADER naming
    the header, for a write and a read, and nothing is written. Left out, the header still means
    the default environment."""
    metadata = (*auth(org.owner_secret), (ENVIRONMENT, ""))
    refused = await fails(
        harness.resources.RegisterResource(register_request("empty-header"), metadata=metadata),
        Code.INVALID_ARGUMENT,
        "INVALID_ENVIRONMENT_HEADER",
    )
    assert ENVIRONMENT in refused.violations, refused
    await fails(
        harness.resources.ListResources(rpb.ListResourcesRequest(), metadata=metadata),
        Code.INVALID_ARGUMENT,
        "INVALID_ENVIRONMENT_HEADER",
    )
    assert await resources_in(harness, org.owner_secret, "default") == []
    created = await harness.resources.RegisterResource(
        register_request("no-header"), metadata=auth(org.owner_secret)
    )
    assert created.environment_id == org.default_environment.id


async def test_a_repeated_environment_header_never_reaches_another_organization(
    harness: Harness, org: Org
) -> None:
    """Own environment and another organization's environment id in two entries, in either order:
    never an answer from the other organization's environment (its resources stay invisible), and
    never a registration there."""
    other = await harness.new_org("Other")
    await harness.resources.RegisterResource(register_request("theirs"), metadata=auth(other.owner_secret))
    for names in (("default", other.default_environment.id), (other.default_environment.id, "default")):
        metadata = (*auth(org.owner_secret), *((ENVIRONMENT, name) for name in names))
        try:
            page = await harness.resources.ListResources(rpb.ListResourcesRequest(), metadata=metadata)
            assert [resource.resource_id for resource in page.resources] == [], names
        except grpc.aio.AioRpcError as error:
            assert error.code() in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), (names, error)
        with contextlib.suppress(grpc.aio.AioRpcError):
            created = await harness.resources.RegisterResource(register_request("mine"), metadata=metadata)
            assert (
                created.organization_id == org.id and created.environment_id != other.default_environment.id
            )
    assert await resources_in(harness, other.owner_secret, "default") == ["theirs"]


@SQLITE_ONLY
@pytest.mark.parametrize(
    "value",
    [
        b"STAGING",
        b"Staging",
        "\u0455taging".encode(),  # Cyrillic dze for the s
        "\uff53\uff54\uff41\uff47\uff49\uff4e\uff47".encode(),  # fullwidth
        "staging\u200b".encode(),  # zero-width space
        "stäging".encode(),
        b"st\xffging",  # invalid UTF-8
        b"staging\x00",
        b"staging\x01",
        b" staging",
        b"staging ",
        b"\tstaging",
        b"staging,default",
    ],
    ids=lambda value: repr(value)[2:-1][:24],
)
async def test_environment_header_bytes_that_only_resemble_a_slug_name_nothing(
    harness: Harness, org: Org, value: bytes
) -> None:
    """Values that only resemble the slug `staging` (case, confusables, invisible characters,
    white space, control bytes, invalid UTF-8, a comma-joined pair) find no environment: NOT_FOUND
    ENVIRONMENT_NOT_FOUND, as for a slug that does not exist, never INTERNAL and never the staging
    (or default) context."""
    await harness.new_environment(org, "Staging")
    answer = await raw_call(
        harness.app.port, LIST_RESOURCES, [bearer(org.owner_secret), (ENVIRONMENT.encode(), value)]
    )
    assert (answer.status, answer.reason, answer.reset) == (
        NOT_FOUND_STATUS,
        "ENVIRONMENT_NOT_FOUND",
        False,
    ), answer
    assert answer.message.startswith("environment ") and answer.message.endswith(" not found")


@SQLITE_ONLY
async def test_a_10_kb_environment_header_is_not_found_and_not_reflected(harness: Harness, org: Org) -> None:
    """A 10 KB `x-agentpost-environment` (under the 16 KiB metadata limit, so the service sees it)
    is NOT_FOUND ENVIRONMENT_NOT_FOUND like any unknown slug, and the answer does not reflect the
    10 KB back (a short message), so the header cannot amplify answers or overflow a client's
    limit on received metadata."""
    failure = await fails(
        harness.resources.ListResources(
            rpb.ListResourcesRequest(), metadata=auth(org.owner_secret, "s" * 10_000)
        ),
        Code.NOT_FOUND,
        "ENVIRONMENT_NOT_FOUND",
    )
    assert len(failure.message) < 200, len(failure.message)


# -- binary headers named like the service's ---------------------------------------------------


@SQLITE_ONLY
async def test_binary_headers_named_like_the_service_s_headers_are_not_those_headers(
    harness: Harness, org: Org
) -> None:
    """`authorization-bin`, `x-agentpost-environment-bin` and `x-request-id-bin` are other headers:
    a key sent only as `authorization-bin` is CREDENTIALS_MISSING, an environment sent only as
    `x-agentpost-environment-bin` does not set the context (the registration lands in the default
    environment, not staging), and `x-request-id-bin` is not echoed as the request id."""
    await harness.new_environment(org, "Staging")
    await fails(
        harness.environments.ListEnvironments(
            LIST, metadata=(("authorization-bin", f"Bearer {org.owner_secret}".encode()),)
        ),
        Code.UNAUTHENTICATED,
        "CREDENTIALS_MISSING",
    )
    call = harness.resources.RegisterResource(
        register_request("bin-headers"),
        metadata=(
            *auth(org.owner_secret),
            (ENVIRONMENT + "-bin", b"staging"),
            (REQUEST_ID + "-bin", b"bin-id"),
        ),
    )
    created = await call
    assert created.environment_id == org.default_environment.id
    echoed = dict(tuple(await call.trailing_metadata()))
    assert echoed.get(REQUEST_ID) not in (None, "bin-id", b"bin-id")
    assert await resources_in(harness, org.owner_secret, "staging") == []


# -- authorization ------------------------------------------------------------------------------


@SQLITE_ONLY
async def test_authorization_forms_that_are_not_one_bearer_key_are_refused(
    harness: Harness, org: Org
) -> None:
    """A valid key wrapped in anything but `Bearer <key>` is refused with the documented reason:
    no scheme or `Bearer:` is CREDENTIALS_MALFORMED; the key quoted, followed by junk, or two keys
    comma-joined (as a proxy merges repeated headers) are API_KEY_MALFORMED. None of them is
    served as the valid key inside. (`bearer`, any case, and surrounding spaces are accepted.)"""
    secret = org.owner_secret
    for value, reason in (
        (secret, "CREDENTIALS_MALFORMED"),
        (f"Bearer: {secret}", "CREDENTIALS_MALFORMED"),
        (f"Token {secret}", "CREDENTIALS_MALFORMED"),
        (f'Bearer "{secret}"', "API_KEY_MALFORMED"),
        (f"Bearer {secret} junk", "API_KEY_MALFORMED"),
        (f"Bearer {secret},{secret}", "API_KEY_MALFORMED"),
        (f"Bearer {secret}, Bearer {secret}", "API_KEY_MALFORMED"),
    ):
        await fails(
            harness.environments.ListEnvironments(LIST, metadata=(("authorization", value),)),
            Code.UNAUTHENTICATED,
            reason,
        )
    for value in (f"BEARER {secret}", f"  Bearer   {secret}  "):
        listed = await harness.environments.ListEnvironments(LIST, metadata=(("authorization", value),))
        assert [env.slug for env in listed.environments] == ["default"]
    # A tab for the space (bytes a gRPC client refuses to send) is not the Bearer scheme either.
    tabbed = await raw_call(
        harness.app.port, LIST_RESOURCES, [(b"authorization", f"Bearer\t{secret}".encode())]
    )
    assert (tabbed.status, tabbed.reason) == (UNAUTHENTICATED_STATUS, "CREDENTIALS_MALFORMED")
    for raw_value in ("Bearer é".encode(), f"Bearer {secret}".encode() + b"\xff"):
        answer = await raw_call(harness.app.port, LIST_RESOURCES, [(b"authorization", raw_value)])
        assert (answer.status, answer.reason) == (UNAUTHENTICATED_STATUS, "API_KEY_MALFORMED"), raw_value


@SQLITE_ONLY
async def test_an_upper_case_header_name_is_never_read_as_the_service_s_header(
    harness: Harness, org: Org
) -> None:
    """HTTP/2 header names are lower case; `Authorization` or `X-Agentpost-Environment` sent as
    such (no gRPC client does) must never be served as the credential or the context: the call
    is not answered OK, nothing is registered in staging, and the server keeps serving."""
    await harness.new_environment(org, "Staging")
    upper_auth = await raw_call(
        harness.app.port, LIST_RESOURCES, [(b"Authorization", f"Bearer {org.owner_secret}".encode())]
    )
    assert upper_auth.status != OK, upper_auth
    upper_env = await raw_call(
        harness.app.port,
        REGISTER_RESOURCE,
        [bearer(org.owner_secret), (b"X-Agentpost-Environment", b"staging")],
        register_request("upper-case").SerializeToString(),
    )
    if upper_env.status == OK:
        assert await resources_in(harness, org.owner_secret, "default") == ["upper-case"]
    assert await resources_in(harness, org.owner_secret, "staging") == []
    listed = await harness.environments.ListEnvironments(LIST, metadata=auth(org.owner_secret))
    assert sorted(env.slug for env in listed.environments) == ["default", "staging"]


# -- the failed-authentication throttle ---------------------------------------------------------

LIMIT = 4


@SQLITE_ONLY
async def test_each_refused_credential_form_counts_once_and_nothing_else_counts(
    backend: Backend, tmp_path: Path
) -> None:
    """SPEC §7 counts refused credentials only. From one peer: many calls with a valid key refused
    for their environment header (NOT_FOUND, a repeated header), VerifyApiKey answers with a
    garbage `authorization` header (no verifier tokens configured: it is not read) and a bad
    secret: none of them counts. Then exactly LIMIT refused credentials of different forms (a tab
    for the space, `authorization-bin` only, two entries, a quoted key over raw HTTP/2 and gRPC)
    are each UNAUTHENTICATED with their reason, the next one is RESOURCE_EXHAUSTED
    TOO_MANY_AUTH_FAILURES, and the valid key still works."""
    async with own_server(backend, tmp_path, auth_failures_per_minute=LIMIT) as server:
        org = await server.new_org()
        for _ in range(3 * LIMIT):
            await fails(
                server.resources.ListResources(
                    rpb.ListResourcesRequest(), metadata=auth(org.owner_secret, "nope")
                ),
                Code.NOT_FOUND,
                "ENVIRONMENT_NOT_FOUND",
            )
            with contextlib.suppress(grpc.aio.AioRpcError):
                await server.resources.ListResources(
                    rpb.ListResourcesRequest(),
                    metadata=(*auth(org.owner_secret), (ENVIRONMENT, "default"), (ENVIRONMENT, "nope")),
                )
            verdict = await server.api_keys.VerifyApiKey(
                api_key_pb2.VerifyApiKeyRequest(secret=keys.generate(KeyMode.LIVE).secret),
                metadata=(("authorization", "Bearer garbage"),),
            )
            assert not verdict.valid
        refusals = [
            await raw_call(
                server.app.port, LIST_RESOURCES, [(b"authorization", f"Bearer\t{org.owner_secret}".encode())]
            ),
            await raw_call(server.app.port, LIST_RESOURCES, [(b"authorization-bin", b"QmVhcmVy")]),
            await raw_call(
                server.app.port, LIST_RESOURCES, [bearer(org.owner_secret), bearer(org.owner_secret)]
            ),
            await raw_call(
                server.app.port, LIST_RESOURCES, [(b"authorization", f'Bearer "{org.owner_secret}"'.encode())]
            ),
        ]
        assert [(answer.status, answer.reason) for answer in refusals] == [
            (UNAUTHENTICATED_STATUS, "CREDENTIALS_MALFORMED"),
            (UNAUTHENTICATED_STATUS, "CREDENTIALS_MISSING"),
            (UNAUTHENTICATED_STATUS, "CREDENTIALS_MALFORMED"),
            (UNAUTHENTICATED_STATUS, "API_KEY_MALFORMED"),
        ]
        await fails(
            server.environments.ListEnvironments(LIST, metadata=(("authorization", "Bearer nope"),)),
            Code.RESOURCE_EXHAUSTED,
            "TOO_MANY_AUTH_FAILURES",
        )
        listed = await server.environments.ListEnvironments(LIST, metadata=auth(org.owner_secret))
        assert [env.slug for env in listed.environments] == ["default"]


@SQLITE_ONLY
async def test_verifier_token_forms_and_what_the_throttle_counts(backend: Backend, tmp_path: Path) -> None:
    """With verifier tokens configured: VerifyApiKey denials answered to a caller with the right
    token are answers, never counted, however many; a token sent as `authorization-bin`, quoted,
    followed by junk, or after a tab (raw HTTP/2) is VERIFIER_TOKEN_REQUIRED, each counted once, so
    after exactly LIMIT of them the next refusal (two tokens comma-joined) is RESOURCE_EXHAUSTED
    TOO_MANY_AUTH_FAILURES, while the right token still verifies."""
    token = "verifier-token-alpha"
    async with own_server(
        backend, tmp_path, verifier_tokens=f"{token},verifier-token-beta", auth_failures_per_minute=LIMIT
    ) as server:
        org = await server.new_org()
        right = (("authorization", f"Bearer {token}"),)
        for _ in range(3 * LIMIT):
            verdict = await server.api_keys.VerifyApiKey(
                api_key_pb2.VerifyApiKeyRequest(secret=keys.generate(KeyMode.LIVE).secret), metadata=right
            )
            assert verdict.denial_reason == api_key_pb2.VerifyApiKeyResponse.DenialReason.NOT_FOUND
        request = api_key_pb2.VerifyApiKeyRequest(secret=org.owner_secret)
        for metadata in (
            (("authorization-bin", f"Bearer {token}".encode()),),
            (("authorization", f'Bearer "{token}"'),),
            (("authorization", f"Bearer {token} junk"),),
        ):
            await fails(
                server.api_keys.VerifyApiKey(request, metadata=metadata),
                Code.UNAUTHENTICATED,
                "VERIFIER_TOKEN_REQUIRED",
            )
        tabbed = await raw_call(
            server.app.port,
            VERIFY_API_KEY,
            [(b"authorization", f"Bearer\t{token}".encode())],
            request.SerializeToString(),
        )
        assert (tabbed.status, tabbed.reason) == (UNAUTHENTICATED_STATUS, "VERIFIER_TOKEN_REQUIRED")
        await fails(
            server.api_keys.VerifyApiKey(
                request, metadata=(("authorization", f"Bearer {token},verifier-token-beta"),)
            ),
            Code.RESOURCE_EXHAUSTED,
            "TOO_MANY_AUTH_FAILURES",
        )
        verdict = await server.api_keys.VerifyApiKey(request, metadata=right)
        assert verdict.valid and verdict.principal.organization_id == org.id


# -- many and large metadata entries ------------------------------------------------------------


@SQLITE_ONLY
async def test_hundreds_of_metadata_entries_are_served_or_cleanly_refused(harness: Harness, org: Org) -> None:
    """300 small entries (about 13 KB as the limit counts them) are served with the default
    context; 1,000 (over the 16 KiB limit) are RESOURCE_EXHAUSTED from the runtime, without an
    ErrorInfo, every time; and the server keeps serving other callers."""
    many = tuple((f"x-pad-{number}", "v") for number in range(300))
    page = await harness.resources.ListResources(
        rpb.ListResourcesRequest(), metadata=(*auth(org.owner_secret), *many)
    )
    assert list(page.resources) == []
    too_many = tuple((f"x-pad-{number}", "v") for number in range(1000))
    async with grpc.aio.insecure_channel(harness.address) as channel:
        environments = environment_pb2_grpc.EnvironmentServiceStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await environments.ListEnvironments(LIST, metadata=(*auth(org.owner_secret), *too_many))
            assert raised.value.code() == Code.RESOURCE_EXHAUSTED
    listed = await harness.environments.ListEnvironments(LIST, metadata=auth(org.owner_secret))
    assert [env.slug for env in listed.environments] == ["default"]
