"""Attacks on freshness: `x-agentpost-min-revision` and `VerifyApiKey.min_revision` (SPEC §2, §6).

Every write answers `x-agentpost-revision`; a caller that sends it back as
`x-agentpost-min-revision` (or `VerifyApiKey.min_revision`) must be answered from a view of at
least that revision of its organization, whichever replica serves it. The README bounds the wait:
a replica that has applied less catches up from the log, "waiting at most 2 s before answering
from what it has". These tests try to break that promise through the gRPC surface of real
servers, on both databases:

- malformed header values (gRPC clients' and raw HTTP/2 bytes a conforming client would refuse to
  send) are a clean `INVALID_ARGUMENT` `INVALID_MIN_REVISION`, never `UNKNOWN`/`INTERNAL`, never a
  hang; a repeated header never silently weakens the demand nor hides a malformed value;
- a revision far above the organization's answers OK after the documented bound, not a hang;
- another organization's revision number behaves as any other number for the caller, and
  reveals nothing of that organization;
- `VerifyApiKey.min_revision` on unknown, revoked, malformed and foreign secrets answers exactly
  what VerifyApiKey answers without it; the header sent to VerifyApiKey is not silently dropped;
- hundreds of calls demanding an unreachable revision leave the server responsive;
- read-your-writes across two replicas, round after round, for revokes and creates, and for a
  replica that fell further behind than it catches up from the log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2, environment_pb2

from service.domain import keys
from service.domain.models import KeyMode
from tests.harness import Harness, Org, auth, corrupt, fails, failure_of
from tests.plain_http2 import RawAnswer, raw_call
from tests.servers import Backend, serving
from tests.writes import register_call, revision_of, stored_revision

MIN_REVISION = "x-agentpost-min-revision"
REVISION = "x-agentpost-revision"
# The README's bound on a freshness wait is 2 s; this only detects a hang, it times nothing.
HANG = 10.0
Verify = api_key_pb2.VerifyApiKeyResponse


def fresh(
    secret: str, min_revision: str | int, environment: str | None = None
) -> tuple[tuple[str, str], ...]:
    """Call metadata for `secret` demanding `min_revision`."""
    return (*auth(secret, environment), (MIN_REVISION, str(min_revision)))


@contextlib.asynccontextmanager
async def replica(backend: Backend, refresh_seconds: float = 30.0) -> AsyncIterator[Harness]:
    """Another replica on the same database whose safety-net poll is far slower than anything
    checked here: on SQLite (where polling is all it has) it learns of other replicas' writes only
    when a freshness demand makes it read the log."""
    async with serving(backend, cache_refresh_seconds=refresh_seconds) as running:
        yield running


async def list_with(harness: Harness, metadata: tuple[tuple[str, str], ...]) -> tuple[str, list[str]]:
    """ListEnvironments with `metadata`: `("OK", ids)` or `("CODE REASON", [])`, within HANG."""
    try:
        page = await harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=500), metadata=metadata, timeout=HANG
        )
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        return f"{failure.code.name} {failure.reason}".strip(), []
    return "OK", sorted(env.id for env in page.environments)


async def warm(harness: Harness, secret: str) -> None:
    """Makes `harness` hold the key and its organization (a cached view that can go stale)."""
    await harness.environments.ListEnvironments(
        environment_pb2.ListEnvironmentsRequest(), metadata=auth(secret)
    )
    assert (await harness.api_keys.VerifyApiKey(api_key_pb2.VerifyApiKeyRequest(secret=secret))).valid


# -- 1. malformed header values ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "-1",
        " ",
        " 5",
        "5 ",
        "1e3",
        "0x10",
        "+5",
        "1.5",
        "5abc",
        str(2**63),
        str(2**64 + 1),
        "1" * 10_000,
    ],
    ids=lambda value: repr(value[:12]) + (f"...{len(value)}" if len(value) > 12 else ""),
)
async def test_malformed_header_is_invalid_argument(harness: Harness, org: Org, value: str) -> None:
    """Anything that is not a non-negative integer in the header is INVALID_ARGUMENT
    INVALID_MIN_REVISION with a field violation naming the header: not UNKNOWN or INTERNAL, not a
    hang, and the same for a valid, an unknown (well-formed, never issued) and a malformed secret
    (the header is judged first, so the answer says nothing about the key)."""
    started = time.monotonic()
    failure = await fails(
        harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(), metadata=fresh(org.owner_secret, value), timeout=HANG
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_MIN_REVISION",
    )
    assert MIN_REVISION in failure.violations
    for secret in (keys.generate(KeyMode.LIVE).secret, corrupt(org.owner_secret, -1)):
        other = await fails(
            harness.environments.ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(), metadata=fresh(secret, value), timeout=HANG
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_MIN_REVISION",
        )
        assert other.violations == failure.violations
    assert time.monotonic() - started < HANG


@pytest.mark.parametrize("form", ["", "0", "leading zeros"])
async def test_accepted_forms_answer_the_current_view(harness: Harness, org: Org, form: str) -> None:
    """An empty header is taken as absent, 0 as "any", and leading zeros as the number they spell:
    each answers OK with the organization's environments (the owner's view: the default one)."""
    revision = await stored_revision(harness, org.id)
    value = f"{revision:06d}" if form == "leading zeros" else form
    assert await list_with(harness, fresh(org.owner_secret, value)) == ("OK", [org.default_environment.id])


LIST_ENVIRONMENTS = "/agentpost.environments.v1.EnvironmentService/ListEnvironments"


async def with_min_revision(port: int, secret: str, value: bytes) -> RawAnswer:
    """ListEnvironments over plain HTTP/2 with exactly `value` as `x-agentpost-min-revision`."""
    return await raw_call(
        port,
        LIST_ENVIRONMENTS,
        [(b"authorization", f"Bearer {secret}".encode()), (MIN_REVISION.encode(), value)],
    )


async def test_raw_http2_call_answers_as_the_grpc_client_does(harness: Harness, org: Org) -> None:
    """The plain HTTP/2 call used below is faithful: a well-formed demand answers OK (0), an
    ASCII malformed one INVALID_ARGUMENT (3) naming the header, as through a gRPC client (whose
    ErrorInfo reason, INVALID_MIN_REVISION, the malformed-header tests above check)."""
    ok = await with_min_revision(harness.app.port, org.owner_secret, b"1")
    assert (ok.status, ok.reset) == (0, False)
    refused = await with_min_revision(harness.app.port, org.owner_secret, b"abc")
    assert (refused.status, refused.reset) == (3, False)
    assert refused.message.startswith(f"{MIN_REVISION}: ")


@pytest.mark.parametrize(
    "value",
    ["\u00b2", "1\u00b3", "\u2460", "\u0661", "\u0969", "\uff15"],
    ids=[
        "superscript-two",
        "one-superscript-three",
        "circled-one",
        "arabic-indic-one",
        "devanagari-three",
        "fullwidth-five",
    ],
)
async def test_non_ascii_digits_in_the_header_are_invalid_argument(
    harness: Harness, org: Org, value: str
) -> None:
    """A header value of Unicode "digits" (bytes any HTTP/2 client can send) is refused like any
    other non-integer: INVALID_ARGUMENT naming the header. Never INTERNAL (SPEC §2: never
    UNKNOWN/INTERNAL for anything a client sent), and never read as a revision: the header's
    revision is ASCII digits, as every revision the service answers."""
    answer = await with_min_revision(harness.app.port, org.owner_secret, value.encode())
    assert (answer.status, answer.reset) == (3, False), (
        f"{value!r}: grpc-status {answer.status} {answer.message!r} (13 is INTERNAL, 0 is OK)"
    )
    assert answer.message.startswith(f"{MIN_REVISION}: ")
    assert answer.reason == "INVALID_MIN_REVISION"


async def test_repeated_header_hides_no_malformed_value(harness: Harness, org: Org) -> None:
    """The header sent twice, one value malformed: the malformed one is refused whichever comes
    first (INVALID_ARGUMENT INVALID_MIN_REVISION), as `authorization` sent twice is refused
    whatever it holds. Answering OK means one of the two values was silently ignored."""
    revision = await stored_revision(harness, org.id)
    for values in (("abc", str(revision)), (str(revision), "abc")):
        metadata = (*auth(org.owner_secret), *((MIN_REVISION, value) for value in values))
        assert await list_with(harness, metadata) == ("INVALID_ARGUMENT INVALID_MIN_REVISION", []), values


async def test_repeated_header_never_weakens_the_demand(harness: Harness, backend: Backend, org: Org) -> None:
    """The header sent twice, the write's revision then 0, to a replica that has not applied the
    write: either refused (INVALID_ARGUMENT) or honoured (the new environment is found). Reading
    only the last value answers NOT_FOUND, the stale view the caller asked not to get."""
    async with replica(backend) as other:
        await warm(other, org.owner_secret)
        outcomes: collections.Counter[str] = collections.Counter()
        for round_ in range(5):
            call = harness.environments.CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name=f"Twice {round_}"),
                metadata=auth(org.owner_secret),
            )
            env = await call
            revision = await revision_of(call)
            metadata = (*auth(org.owner_secret), (MIN_REVISION, str(revision)), (MIN_REVISION, "0"))
            try:
                found = await other.environments.GetEnvironment(
                    environment_pb2.GetEnvironmentRequest(id=env.id), metadata=metadata, timeout=HANG
                )
                assert found.id == env.id
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                failure = failure_of(error)
                outcomes[f"{failure.code.name} {failure.reason}"] += 1
        assert set(outcomes) <= {"OK", "INVALID_ARGUMENT INVALID_MIN_REVISION"}, outcomes


# -- 2. a revision far above the organization's ------------------------------------------------


async def test_unreachable_revision_answers_after_the_bound(harness: Harness, org: Org) -> None:
    """A demand 1,000 revisions above the organization's is not a hang: per the README the
    replica waits at most 2 s, then answers OK from what it has (the organization's environments,
    nothing invented); VerifyApiKey likewise answers the key valid. Timed only as a hang
    detector."""
    revision = await stored_revision(harness, org.id)
    started = time.monotonic()
    listed = await list_with(harness, fresh(org.owner_secret, revision + 1000))
    listed_after = time.monotonic() - started
    assert listed == ("OK", [org.default_environment.id])
    started = time.monotonic()
    answer = await harness.api_keys.VerifyApiKey(
        api_key_pb2.VerifyApiKeyRequest(secret=org.owner_secret, min_revision=revision + 1000), timeout=HANG
    )
    verified_after = time.monotonic() - started
    assert answer.valid and answer.principal.organization_id == org.id
    started = time.monotonic()
    largest = await harness.api_keys.VerifyApiKey(
        api_key_pb2.VerifyApiKeyRequest(secret=org.owner_secret, min_revision=2**63 - 1), timeout=HANG
    )
    assert largest.valid
    largest_after = time.monotonic() - started
    print(
        f"\n[{harness.backend}] unreachable revision answered after {listed_after:.2f} s (header), "
        f"{verified_after:.2f} s (VerifyApiKey), {largest_after:.2f} s (int64 max)"
    )
    assert max(listed_after, verified_after, largest_after) < HANG
    # The organization's own revision is unchanged by the demands: they are reads.
    assert await stored_revision(harness, org.id) == revision


async def test_a_write_demanding_an_unreachable_revision_still_writes_once(
    harness: Harness, org: Org
) -> None:
    """A write that demands an unreachable revision waits the bound, then writes exactly once and
    answers the next revision: the demand neither refuses the write nor makes it skip revisions."""
    revision = await stored_revision(harness, org.id)
    call = harness.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name="Demanding"),
        metadata=fresh(org.owner_secret, revision + 1000),
        timeout=HANG,
    )
    env = await call
    assert await revision_of(call) == revision + 1
    assert await stored_revision(harness, org.id) == revision + 1
    assert (await list_with(harness, auth(org.owner_secret)))[1] == sorted(
        [org.default_environment.id, env.id]
    )


# -- 3. another organization's revision --------------------------------------------------------


async def test_another_organizations_revision_is_just_a_number(harness: Harness, org: Org) -> None:
    """Organization B's revision (far above A's) sent with A's key answers exactly as another
    unreachable number does: A's environments only, A's principal, no revision of B in any
    trailer. Once A's own revision passes that number, the demand is met like any other."""
    other = await harness.new_org("Other")
    for index in range(6):
        await harness.new_environment(other, f"B {index}")
    theirs = await stored_revision(harness, other.id)
    mine = await stored_revision(harness, org.id)
    assert theirs > mine + 1

    answers = {}
    for number in (theirs, theirs + 1):
        call = harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(), metadata=fresh(org.owner_secret, number), timeout=HANG
        )
        page = await call
        trailers = dict(await call.trailing_metadata() or ())
        assert REVISION not in trailers
        assert all(env.organization_id == org.id for env in page.environments)
        answers[number] = sorted(env.id for env in page.environments)
        verified = await harness.api_keys.VerifyApiKey(
            api_key_pb2.VerifyApiKeyRequest(secret=org.owner_secret, min_revision=number), timeout=HANG
        )
        assert verified.valid and verified.principal.organization_id == org.id
        assert set(verified.principal.allowed_environment_ids) <= {org.default_environment.id}
    assert answers[theirs] == answers[theirs + 1] == [org.default_environment.id]

    # A catches up past B's number with writes of its own: the demand is then simply met.
    made = [await harness.new_environment(org, f"A {index}") for index in range(theirs - mine)]
    assert await stored_revision(harness, org.id) >= theirs
    status, ids = await list_with(harness, fresh(org.owner_secret, theirs))
    assert status == "OK"
    assert ids == sorted([org.default_environment.id, *(env.id for env in made)])


# -- 4. VerifyApiKey.min_revision and unusual secrets ------------------------------------------


async def test_verify_min_revision_changes_no_denial(harness: Harness, org: Org) -> None:
    """For a valid, a revoked, an unknown (well-formed, never issued), a malformed (bad checksum,
    garbage, empty, oversized) secret and another organization's key, VerifyApiKey with
    `min_revision` of the caller's organization, 1,000 above it or int64's largest answers exactly
    what it answers without one (valid, denial reason, principal), never an error: the demand
    reveals nothing VerifyApiKey does not already say."""
    key, revoked = await harness.new_key(org, ["inboxes:read"])
    await harness.api_keys.RevokeApiKey(
        api_key_pb2.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
    )
    foreign = await harness.new_org("Foreign")
    secrets = {
        "valid": org.owner_secret,
        "foreign": foreign.owner_secret,
        "revoked": revoked,
        "unknown": keys.generate(KeyMode.LIVE).secret,
        "malformed": "ap_sk_live_" + "0" * 38,
        "checksum": corrupt(org.owner_secret, 12),
        "garbage": "not a key at all",
        "empty": "",
        "huge": "x" * 5000,
    }
    expected = {
        "valid": Verify.DENIAL_REASON_UNSPECIFIED,
        "foreign": Verify.DENIAL_REASON_UNSPECIFIED,
        "revoked": Verify.REVOKED,
        "unknown": Verify.NOT_FOUND,
        "malformed": Verify.MALFORMED,
        "checksum": Verify.MALFORMED,
        "garbage": Verify.MALFORMED,
        "empty": Verify.MALFORMED,
        "huge": Verify.MALFORMED,
    }
    revision = await stored_revision(harness, org.id)
    for name, secret in secrets.items():
        plain = await harness.api_keys.VerifyApiKey(
            api_key_pb2.VerifyApiKeyRequest(secret=secret), timeout=HANG
        )
        for demand in (revision, revision + 1000, 2**63 - 1):
            demanded = await harness.api_keys.VerifyApiKey(
                api_key_pb2.VerifyApiKeyRequest(secret=secret, min_revision=demand), timeout=HANG
            )
            assert demanded.denial_reason == plain.denial_reason == expected[name], (name, demand)
            assert demanded.valid == plain.valid == (name in ("valid", "foreign"))
            assert demanded.principal == plain.principal, (name, demand)


@pytest.mark.parametrize("demand", [-1, -(2**63)])
async def test_verify_negative_min_revision_is_invalid_whatever_the_secret(
    harness: Harness, org: Org, demand: int
) -> None:
    """A negative `min_revision` is INVALID_ARGUMENT naming the field, the same code, reason and
    violation for a valid, a malformed and an unknown secret: it is judged before the key."""
    seen = set()
    for secret in (org.owner_secret, "garbage", corrupt(org.owner_secret, -1), ""):
        failure = await fails(
            harness.api_keys.VerifyApiKey(
                api_key_pb2.VerifyApiKeyRequest(secret=secret, min_revision=demand), timeout=HANG
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert failure.reason
        assert "min_revision" in failure.violations
        seen.add((failure.reason, tuple(sorted(failure.violations))))
    assert len(seen) == 1, seen


async def test_verify_api_key_does_not_ignore_a_malformed_header(harness: Harness, org: Org) -> None:
    """`x-agentpost-min-revision` is request metadata any call may send (SPEC §2). Sent malformed
    to VerifyApiKey it is INVALID_ARGUMENT INVALID_MIN_REVISION, as on every other call; an OK
    answer means the header was never read."""
    await fails(
        harness.api_keys.VerifyApiKey(
            api_key_pb2.VerifyApiKeyRequest(secret=org.owner_secret),
            metadata=((MIN_REVISION, "abc"),),
            timeout=HANG,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_MIN_REVISION",
    )


async def test_verify_api_key_honours_the_header_across_replicas(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """A key revoked on replica A, then verified on replica B (which held it valid) with the
    revoke's revision in `x-agentpost-min-revision` rather than in the field: B must answer
    REVOKED (or refuse the header as INVALID_ARGUMENT), never valid. Round after round."""
    async with replica(backend) as other:
        await warm(other, org.owner_secret)
        answers: collections.Counter[str] = collections.Counter()
        for _ in range(10):
            key, secret = await harness.new_key(org, ["inboxes:read"])
            assert (await other.api_keys.VerifyApiKey(api_key_pb2.VerifyApiKeyRequest(secret=secret))).valid
            revoke = harness.api_keys.RevokeApiKey(
                api_key_pb2.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
            )
            await revoke
            try:
                answer = await other.api_keys.VerifyApiKey(
                    api_key_pb2.VerifyApiKeyRequest(secret=secret),
                    metadata=((MIN_REVISION, str(await revision_of(revoke))),),
                    timeout=HANG,
                )
                answers["valid" if answer.valid else Verify.DenialReason.Name(answer.denial_reason)] += 1
            except grpc.aio.AioRpcError as error:
                failure = failure_of(error)
                answers[f"{failure.code.name} {failure.reason}"] += 1
        assert set(answers) <= {"REVOKED", "INVALID_ARGUMENT INVALID_MIN_REVISION"}, answers


# -- 5. many unreachable demands at once -------------------------------------------------------


async def test_many_unreachable_demands_leave_the_server_responsive(harness: Harness, org: Org) -> None:
    """200 calls demanding unreachable revisions at once (over four organizations, header and
    VerifyApiKey field): every one gets a clean code (OK after the bound), and meanwhile other
    callers' ordinary reads and writes still answer, each within a generous deadline."""
    orgs = [org, *[await harness.new_org(f"Crowd {index}") for index in range(3)]]
    bystander = await harness.new_org("Bystander")

    async def demanding(index: int) -> str:
        caller = orgs[index % len(orgs)]
        try:
            if index % 2:
                answer = await harness.api_keys.VerifyApiKey(
                    api_key_pb2.VerifyApiKeyRequest(secret=caller.owner_secret, min_revision=10**9 + index),
                    timeout=3 * HANG,
                )
                return "OK" if answer.valid else Verify.DenialReason.Name(answer.denial_reason)
            await harness.environments.ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(),
                metadata=fresh(caller.owner_secret, 10**9 + index),
                timeout=3 * HANG,
            )
            return "OK"
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            return f"{failure.code.name} {failure.reason}"

    started = time.monotonic()
    crowd = [asyncio.ensure_future(demanding(index)) for index in range(200)]
    await asyncio.sleep(0.2)  # the crowd is waiting now
    bystanding = time.monotonic()
    assert (await harness.whoami(bystander.owner_secret)).id == bystander.id
    env = await harness.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(name="Meanwhile"),
        metadata=auth(bystander.owner_secret),
        timeout=HANG,
    )
    found = await harness.environments.GetEnvironment(
        environment_pb2.GetEnvironmentRequest(id=env.id), metadata=auth(bystander.owner_secret), timeout=HANG
    )
    assert found.id == env.id
    assert (
        await harness.api_keys.VerifyApiKey(
            api_key_pb2.VerifyApiKeyRequest(secret=bystander.owner_secret), timeout=HANG
        )
    ).valid
    bystander_took = time.monotonic() - bystanding
    still_waiting = sum(not task.done() for task in crowd)
    outcomes = collections.Counter(await asyncio.gather(*crowd))
    crowd_took = time.monotonic() - started
    print(
        f"\n[{harness.backend}] 200 unreachable demands: {dict(outcomes)} in {crowd_took:.2f} s; "
        f"bystander's four calls {bystander_took:.2f} s with {still_waiting} demands still waiting"
    )
    assert outcomes == {"OK": 200}
    assert bystander_took < HANG
    assert crowd_took < 3 * HANG


async def test_callers_giving_up_on_unreachable_demands_cost_nothing_later(
    harness: Harness, org: Org
) -> None:
    """200 callers demanding an unreachable revision with a deadline shorter than the bound each
    get DEADLINE_EXCEEDED (never another code), and the server answers the next ordinary call."""

    async def impatient(index: int) -> str:
        try:
            await harness.environments.ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(),
                metadata=fresh(org.owner_secret, 10**9 + index),
                timeout=0.3,
            )
            return "OK"
        except grpc.aio.AioRpcError as error:
            return error.code().name

    outcomes = collections.Counter(await asyncio.gather(*(impatient(index) for index in range(200))))
    assert outcomes == {"DEADLINE_EXCEEDED": 200}
    assert await list_with(harness, auth(org.owner_secret)) == ("OK", [org.default_environment.id])


# -- 6. read-your-writes across two replicas ---------------------------------------------------


async def test_read_your_revokes_and_creates_across_replicas(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """50 rounds on two replicas, B's poll far too slow to help: a key B verified valid is revoked
    on A, and B, asked with the revoke's revision, says REVOKED (VerifyApiKey field) and refuses
    the key as a caller (header); an environment created on A is found on B with the create's
    revision (GetEnvironment by id and by slug, ListEnvironments)."""
    async with replica(backend) as other:
        await warm(other, org.owner_secret)
        stale: list[str] = []
        for round_ in range(50):
            key, secret = await harness.new_key(org, ["environments:read"])
            assert (await other.api_keys.VerifyApiKey(api_key_pb2.VerifyApiKeyRequest(secret=secret))).valid
            assert (await other.whoami(secret)).id == org.id
            revoke = harness.api_keys.RevokeApiKey(
                api_key_pb2.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
            )
            await revoke
            revoked_at = await revision_of(revoke)
            answer = await other.api_keys.VerifyApiKey(
                api_key_pb2.VerifyApiKeyRequest(secret=secret, min_revision=revoked_at), timeout=HANG
            )
            if answer.valid or answer.denial_reason != Verify.REVOKED:
                stale.append(f"round {round_}: verify {answer.valid} {answer.denial_reason}")
            try:
                await other.environments.ListEnvironments(
                    environment_pb2.ListEnvironmentsRequest(),
                    metadata=fresh(secret, revoked_at),
                    timeout=HANG,
                )
                stale.append(f"round {round_}: the revoked key was served")
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAUTHENTICATED or not failure_of(error).reason:
                    stale.append(f"round {round_}: revoked caller got {error.code().name}")

            slug = f"ryw-{round_}-{uuid.uuid4().hex[:6]}"
            create = harness.environments.CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name=f"Round {round_}", slug=slug),
                metadata=auth(org.owner_secret),
            )
            env = await create
            created_at = await revision_of(create)
            demand = fresh(org.owner_secret, created_at)
            for request in (
                environment_pb2.GetEnvironmentRequest(id=env.id),
                environment_pb2.GetEnvironmentRequest(slug=slug),
            ):
                try:
                    found = await other.environments.GetEnvironment(request, metadata=demand, timeout=HANG)
                    if found.id != env.id:
                        stale.append(f"round {round_}: found {found.id}, not {env.id}")
                except grpc.aio.AioRpcError as error:
                    stale.append(
                        f"round {round_}: GetEnvironment {error.code().name} {failure_of(error).reason}"
                    )
            status, ids = await list_with(other, demand)
            if status != "OK" or env.id not in ids:
                stale.append(f"round {round_}: ListEnvironments {status} without the new environment")
        assert not stale, stale


# More events than a replica catches up from the log (the README: over 5,000, it loads afresh).
FAR_BEHIND_EVENTS = 5_001


async def put_far_ahead(harness: Harness, org: Org) -> None:
    """Commits FAR_BEHIND_EVENTS registrations on `harness`, 64 at a time, which a replica
    that does not hear of them falls behind by."""
    gate = asyncio.Semaphore(64)

    async def register(index: int) -> None:
        async with gate:
            await register_call(harness, org.owner_secret, f"far-{index}", timeout=3 * HANG)

    await asyncio.gather(*(register(index) for index in range(FAR_BEHIND_EVENTS)))


async def test_read_your_revoke_after_falling_far_behind(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """Replica B holds a key valid, then A commits more than 5,000 events (registrations) and
    the key's revoke. Asked with the revoke's revision, B must say REVOKED: a replica that finds
    itself too far behind to catch up from the log loads the organization afresh, and the
    freshness demand must be met by that load, not answered from the view it just dropped."""
    async with replica(backend, refresh_seconds=120.0) as other:
        key, secret = await harness.new_key(org, ["inboxes:read"])
        await warm(other, org.owner_secret)
        assert (await other.api_keys.VerifyApiKey(api_key_pb2.VerifyApiKeyRequest(secret=secret))).valid
        await put_far_ahead(harness, org)
        revoke = harness.api_keys.RevokeApiKey(
            api_key_pb2.RevokeApiKeyRequest(id=key.id), metadata=auth(org.owner_secret)
        )
        await revoke
        revoked_at = await revision_of(revoke)
        started = time.monotonic()
        answer = await other.api_keys.VerifyApiKey(
            api_key_pb2.VerifyApiKeyRequest(secret=secret, min_revision=revoked_at), timeout=HANG
        )
        took = time.monotonic() - started
        print(f"\n[{backend.name}] 5,001 events behind: verify answered {answer.valid} after {took:.2f} s")
        assert not answer.valid and answer.denial_reason == Verify.REVOKED, (
            f"replica B answered a key revoked at revision {revoked_at} valid={answer.valid} "
            f"(denial {Verify.DenialReason.Name(answer.denial_reason)}) after {took:.2f} s"
        )


async def test_read_your_create_after_falling_far_behind(
    harness: Harness, backend: Backend, org: Org
) -> None:
    """The same for a create through the header: after more than 5,000 events B has not applied,
    an environment created on A is found on B by GetEnvironment with the create's revision."""
    async with replica(backend, refresh_seconds=120.0) as other:
        await warm(other, org.owner_secret)
        await put_far_ahead(harness, org)
        create = harness.environments.CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name="Far behind"), metadata=auth(org.owner_secret)
        )
        env = await create
        try:
            found = await other.environments.GetEnvironment(
                environment_pb2.GetEnvironmentRequest(id=env.id),
                metadata=fresh(org.owner_secret, await revision_of(create)),
                timeout=HANG,
            )
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            raise AssertionError(
                f"replica B answered {failure.code.name} {failure.reason} for an environment created "
                "at the demanded revision"
            ) from error
        assert found.id == env.id
