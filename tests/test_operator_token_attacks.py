"""Attacks on the operator token read from a file (`AGENTPOST_OPERATOR_TOKEN=@FILE`) and on the
bound of a caller's `tracestate`, written from the README alone ("Configuration", "Security",
"Tracing") against real servers: what a line of the file is, files that cannot be used (a FIFO,
a folder, /dev/zero, 50 MB, over 1 MiB, not UTF-8, blanks, symlink loops), a Kubernetes `..data`
swap, withdrawn tokens, a rotation under 200 concurrent calls, `serve --workers 2`, starts with
an unusable value, what the tokens open, the throttle; and hostile `tracestate` forms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import (
    api_key_pb2,
    environment_pb2,
    event_pb2,
    event_pb2_grpc,
    organization_pb2,
    organization_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import OPERATOR_TOKEN, Harness, auth, fails, failure_of
from tests.observing import (
    PARENT_ID,
    SQLITE_ONLY,
    TRACE_ID,
    VALID_PARENT,
    observed_server,
    span_of,
)
from tests.own_database import own_database
from tests.rotation import CREDENTIALS, eventually, fifo_over, publish, replace, serve_process, served
from tests.servers import PROJECT_ROOT, Backend, process_environment
from tests.workers import serve_workers

Code = grpc.StatusCode
# Longer than the server's look at a changed file (at most once a second).
PAST_A_LOOK = 1.5
# Answers are expected well within this; it only keeps a hung call from hanging the test.
HANG = 20.0
MIB = 1 << 20
INVALID = "UNAUTHENTICATED OPERATOR_TOKEN_INVALID"


@contextlib.asynccontextmanager
async def _served(backend: Backend, folder: Path, tokens: Path, **settings: object) -> AsyncIterator[Harness]:
    """An in-process server on a database of its own, its operator tokens read from `tokens`."""
    async with served(backend, folder, operator_token=f"@{tokens}", **settings) as harness:
        yield harness


async def _outcome(organizations: organization_pb2_grpc.OrganizationServiceStub, token: str) -> str:
    """What CreateOrganization with `token` answers: "OK" (an organization made) or "CODE REASON"."""
    request = organization_pb2.CreateOrganizationRequest(
        name="Attacked", owner_email=f"owner-{uuid.uuid4().hex[:10]}@example.com"
    )
    try:
        answer = await organizations.CreateOrganization(
            request, metadata=(("authorization", f"Bearer {token}"),), timeout=HANG
        )
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        return f"{failure.code.name} {failure.reason}".strip()
    assert answer.organization.id and answer.owner_api_key_secret
    return "OK"


async def _outcomes(harness: Harness, *tokens: str) -> dict[str, str]:
    return {token: await _outcome(harness.organizations, token) for token in tokens}


async def _taken_up(harness: Harness, token: str) -> None:
    async def accepted() -> bool:
        return await _outcome(harness.organizations, token) == "OK"

    await eventually(accepted, f"the operator token {token!r} taken up")


def _token_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == CREDENTIALS and "operator token file" in record.getMessage()
    ]


def _release(pipe: Path) -> None:
    """Unblocks anyone stuck reading the FIFO (O_RDWR never blocks on Linux)."""
    descriptor = os.open(pipe, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(descriptor, b"released\n")
    finally:
        os.close(descriptor)


def _symlink_over(target: Path, points_to: str) -> None:
    link = target.with_name(target.name + ".link")
    os.symlink(points_to, link)
    os.replace(link, target)


async def test_a_line_of_the_file_is_one_token_commas_and_all(backend: Backend, tmp_path: Path) -> None:
    """README: `@/path/file` with one token per line. A line holding a comma is one token, as
    an inline value is: neither half of it, each a mere piece of the operator's secret, may open
    CreateOrganization."""
    tokens = tmp_path / "operator-token"
    replace(tokens, b"first-half,second-half\n")
    async with _served(backend, tmp_path, tokens) as harness:
        assert await _outcomes(harness, "first-half,second-half", "first-half", "second-half") == {
            "first-half,second-half": "OK",
            "first-half": INVALID,
            "second-half": INVALID,
        }


async def test_blanks_crlf_a_bom_and_inner_spaces_in_the_file(backend: Backend, tmp_path: Path) -> None:
    """Surrounding blanks and a Windows line end are no part of a token, a byte order mark is
    ignored, a space inside a line is part of its one token; after a rotation to such a file
    (BOM, CRLF), its token is taken up and the earlier ones are withdrawn."""
    tokens = tmp_path / "operator-token"
    replace(tokens, "\ufeff  padded-token \t\r\nsecond-token\r\nwith inner space\r\n".encode())
    async with _served(backend, tmp_path, tokens) as harness:
        assert await _outcomes(harness, "padded-token", "second-token", "with inner space", "with") == {
            "padded-token": "OK",
            "second-token": "OK",
            "with inner space": "OK",
            "with": INVALID,
        }
        replace(tokens, b"\xef\xbb\xbf\r\n  rotated-token\r\n\r\n")
        await _taken_up(harness, "rotated-token")
        assert await _outcomes(harness, "padded-token", "second-token", "rotated-token") == {
            "padded-token": INVALID,
            "second-token": INVALID,
            "rotated-token": "OK",
        }


def _breakings(tokens: Path, folder: Path) -> dict[str, Callable[[], None]]:
    """Ways to put something unusable where the token file is; each names `intruder-token`."""
    big = folder / "big-target"

    def big_file() -> None:
        with big.open("wb") as out:
            out.write(b"intruder-token\n")
            out.truncate(50 * MIB)  # sparse: 50 MB without writing them
        _symlink_over(tokens, str(big))

    def folder_in_place() -> None:
        tokens.unlink()
        tokens.mkdir()
        (tokens / "intruder-token").write_bytes(b"intruder-token\n")

    def loop() -> None:
        _symlink_over(tokens, tokens.name)

    return {
        "a symlink to a 50 MB file": big_file,
        "one byte over 1 MiB": lambda: replace(tokens, b"intruder-token\n" + b"\n" * (MIB - 14)),
        "not UTF-8": lambda: replace(tokens, b"intruder-token\n\xff\xfe\xfa\n"),
        "only blanks": lambda: replace(tokens, b" \n\t\r\n\n"),
        "a folder": folder_in_place,
        "a symlink loop": loop,
        "a symlink to /dev/zero": lambda: _symlink_over(tokens, "/dev/zero"),
        "a dangling symlink": lambda: _symlink_over(tokens, str(folder / "nowhere")),
    }


def _restore(tokens: Path) -> None:
    if tokens.is_dir() and not tokens.is_symlink():
        for child in tokens.iterdir():
            child.unlink()
        tokens.rmdir()


async def test_unusable_replacements_keep_the_current_token_and_open_nothing(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each unusable replacement (README: a file is read only when it is a regular file of at
    most 1 MiB; one that names no token keeps the tokens read before): past a look, the current
    token still works, the token an unusable file names and an empty bearer do not, and health
    answers; one warning each; a file of exactly 1 MiB is usable; a good file is taken up after."""
    tokens = tmp_path / "operator-token"
    replace(tokens, b"current-token\n")
    async with _served(backend, tmp_path / "server", tokens) as harness:
        with caplog.at_level(logging.WARNING, logger=CREDENTIALS):
            seen: dict[str, dict[str, str]] = {}
            for name, breaking in _breakings(tokens, tmp_path).items():
                breaking()
                await asyncio.sleep(PAST_A_LOOK)
                seen[name] = await _outcomes(harness, "current-token", "intruder-token", "x")
                health = await harness.health.Check(health_pb2.HealthCheckRequest(), timeout=HANG)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                _restore(tokens)
            expected = {"current-token": "OK", "intruder-token": INVALID, "x": INVALID}
            assert seen == dict.fromkeys(seen, expected)
            assert len(_token_warnings(caplog)) == len(seen), _token_warnings(caplog)
        # At most 1 MiB is read: exactly 1 MiB is a usable file.
        replace(tokens, b"mebibyte-token\n" + b"\n" * (MIB - 15))
        assert tokens.stat().st_size == MIB
        await _taken_up(harness, "mebibyte-token")
        assert await _outcome(harness.organizations, "current-token") == INVALID


@SQLITE_ONLY
async def test_a_fifo_in_place_of_the_file_never_holds_up_create_organization(
    backend: Backend, tmp_path: Path
) -> None:
    """A FIFO nobody writes to renamed over the token file of a `serve` process: CreateOrganization
    is answered (the current token accepted, a wrong one refused) and health answers, before
    anyone feeds the FIFO; a good file is taken up afterwards."""
    tokens = tmp_path / "operator-token"
    replace(tokens, b"current-token\n")
    async with (
        serve_process(backend, tmp_path, AGENTPOST_OPERATOR_TOKEN=f"@{tokens}") as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
    ):
        organizations = organization_pb2_grpc.OrganizationServiceStub(channel)
        assert await _outcome(organizations, "current-token") == "OK"
        pipe = fifo_over(tokens)
        await asyncio.sleep(PAST_A_LOOK)
        try:
            answers = [await _outcome(organizations, token) for token in ("current-token", "wrong-token")]
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=HANG
            )
        finally:
            replace(tokens, b"next-token\n")
            _release(pipe)
        assert answers == ["OK", INVALID], served.log()[-2000:]
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        async def next_taken_up() -> bool:
            return await _outcome(organizations, "next-token") == "OK"

        await eventually(next_taken_up, "the token written after the FIFO")
        assert "operator token file changed but cannot be used" in served.log()


async def test_a_withdrawn_token_is_refused_on_the_first_call_past_a_look(
    backend: Backend, tmp_path: Path
) -> None:
    """Overlap rotation (old; old and new; new), written as rotation tools write (a rename) and
    in place (same inode, then the same size): once a look has passed after the old token left
    the file, the very first call with it is refused, never a later one."""
    tokens = tmp_path / "operator-token"
    replace(tokens, b"old-token-aaaa\n")
    async with _served(backend, tmp_path, tokens) as harness:
        assert await _outcome(harness.organizations, "old-token-aaaa") == "OK"
        replace(tokens, b"old-token-aaaa\nnew-token-bbbb\n")
        await asyncio.sleep(PAST_A_LOOK)
        assert await _outcomes(harness, "new-token-bbbb", "old-token-aaaa") == dict.fromkeys(
            ("new-token-bbbb", "old-token-aaaa"), "OK"
        )
        replace(tokens, b"new-token-bbbb\n")
        await asyncio.sleep(PAST_A_LOOK)
        assert await _outcome(harness.organizations, "old-token-aaaa") == INVALID
        assert await _outcome(harness.organizations, "new-token-bbbb") == "OK"
        # In place: same inode, other size.
        with tokens.open("wb") as rewritten:
            rewritten.write(b"third-token-cccc-longer\n")
        await asyncio.sleep(PAST_A_LOOK)
        assert await _outcome(harness.organizations, "new-token-bbbb") == INVALID
        # In place again: same inode, same size, a later modification time.
        with tokens.open("r+b") as rewritten:
            rewritten.write(b"forth-token-dddd-longer\n")
        await asyncio.sleep(PAST_A_LOOK)
        assert await _outcomes(harness, "third-token-cccc-longer", "forth-token-dddd-longer") == {
            "third-token-cccc-longer": INVALID,
            "forth-token-dddd-longer": "OK",
        }


def _publish(secret: Path, content: bytes, stamp: str) -> Path:
    """A Kubernetes secret update carrying `content` as operator-token."""
    return publish(secret, {"operator-token": content}, stamp)


async def test_a_kubernetes_style_data_swap_rotates_the_token(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The configured path is `operator-token` -> `..data/operator-token`; each update swaps
    `..data` and deletes the old folder: its token is taken up, the previous one withdrawn, and
    nothing is warned."""
    secret = tmp_path / "secret"
    secret.mkdir()
    old = _publish(secret, b"kube-first\n", "2026_11_25_10_00_00.1")
    os.symlink("..data/operator-token", secret / "operator-token")
    with caplog.at_level(logging.WARNING, logger=CREDENTIALS):
        async with _served(backend, tmp_path, secret / "operator-token") as harness:
            assert await _outcome(harness.organizations, "kube-first") == "OK"
            for number, token in enumerate(("kube-second", "kube-third"), start=2):
                new = _publish(secret, f"{token}\n".encode(), f"2026_11_25_10_00_0{number}.{number}")
                for child in old.iterdir():
                    child.unlink()
                old.rmdir()
                old = new
                await _taken_up(harness, token)
            assert await _outcomes(harness, "kube-first", "kube-second") == dict.fromkeys(
                ("kube-first", "kube-second"), INVALID
            )
    assert _token_warnings(caplog) == []


async def test_a_rotation_under_200_concurrent_calls_never_fails_them_or_opens_a_stranger(
    backend: Backend, tmp_path: Path
) -> None:
    """The file flips between {alpha, beta} and {beta, gamma} (renames) while 200
    CreateOrganization calls are in flight: beta, in every version, is always accepted; delta,
    in none, never; no call ends INTERNAL, UNKNOWN or anything but OK or OPERATOR_TOKEN_INVALID."""
    tokens = tmp_path / "operator-token"
    versions = (b"alpha\nbeta\n", b"beta\ngamma\n")
    replace(tokens, versions[0])
    async with _served(backend, tmp_path, tokens) as harness:
        done = asyncio.Event()

        async def rotate() -> int:
            flips = 0
            while not done.is_set():
                flips += 1
                replace(tokens, versions[flips % 2])
                await asyncio.sleep(0.05)
            return flips

        rotating = asyncio.create_task(rotate())
        sent = [("alpha", "beta", "gamma", "delta")[n % 4] for n in range(200)]
        try:
            answers = await asyncio.gather(*(_outcome(harness.organizations, token) for token in sent))
        finally:
            done.set()
            flips = await rotating
        assert flips > 1
        by_token: dict[str, set[str]] = {}
        for token, answer in zip(sent, answers, strict=True):
            by_token.setdefault(token, set()).add(answer)
        assert by_token["beta"] == {"OK"}, by_token
        assert by_token["delta"] == {INVALID}, by_token
        assert by_token["alpha"] | by_token["gamma"] <= {"OK", INVALID}, by_token


@SQLITE_ONLY
async def test_every_worker_takes_up_a_rotation(backend: Backend, tmp_path: Path) -> None:
    """`serve --workers 2 --operator-token=@FILE`: each worker accepts the file's token (and not
    the environment's inline one the flag overrides); after the token is rotated and a look has
    passed, the first call with the old token on each worker is refused and the new one works."""
    tokens = tmp_path / "operator-token"
    replace(tokens, b"workers-first\n")
    served = await serve_workers(
        own_database(backend, tmp_path / "db"), tmp_path, "--migrate", f"--operator-token=@{tokens}"
    )
    pinned: dict[int, grpc.aio.Channel] = {}
    try:
        await served.until_serving()
        for _ in range(64):
            channel = served.channel()
            pid = await served.worker_behind(channel)
            if pid in pinned:
                await channel.close()
            else:
                pinned[pid] = channel
            if len(pinned) == 2:
                break
        assert set(pinned) == served.worker_pids()
        stubs = {pid: organization_pb2_grpc.OrganizationServiceStub(c) for pid, c in pinned.items()}
        before = {
            pid: (await _outcome(s, "workers-first"), await _outcome(s, OPERATOR_TOKEN))
            for pid, s in stubs.items()
        }
        assert before == dict.fromkeys(stubs, ("OK", INVALID))
        replace(tokens, b"workers-second\n")
        await asyncio.sleep(PAST_A_LOOK)
        after = {
            pid: (await _outcome(s, "workers-first"), await _outcome(s, "workers-second"))
            for pid, s in stubs.items()
        }
        assert after == dict.fromkeys(stubs, (INVALID, "OK"))
    finally:
        for channel in pinned.values():
            await channel.close()
        assert await served.stop() == 0, served.log()[-3000:]


async def test_file_tokens_open_create_organization_and_nothing_else(
    backend: Backend, tmp_path: Path
) -> None:
    """A token from the operator file (current or withdrawn) is no API key on any service, no
    verifier token, and no key or verifier token is an operator token."""
    tokens = tmp_path / "operator-token"
    replace(tokens, b"withdrawn-operator\n")
    async with _served(backend, tmp_path, tokens, verifier_tokens="verifier-only") as harness:
        replace(tokens, b"file-operator\n")
        await _taken_up(harness, "file-operator")
        made = await harness.organizations.CreateOrganization(
            organization_pb2.CreateOrganizationRequest(name="Owned", owner_email="owner@example.com"),
            metadata=(("authorization", "Bearer file-operator"),),
            timeout=HANG,
        )
        verify = api_key_pb2.VerifyApiKeyRequest(secret=made.owner_api_key_secret, environment="default")
        for token in ("file-operator", "withdrawn-operator"):
            calls = {
                "GetOrganization": (
                    harness.organizations.GetOrganization,
                    organization_pb2.GetOrganizationRequest(),
                ),
                "ListEnvironments": (
                    harness.environments.ListEnvironments,
                    environment_pb2.ListEnvironmentsRequest(),
                ),
                "CreateApiKey": (harness.api_keys.CreateApiKey, api_key_pb2.CreateApiKeyRequest(name="k")),
            }
            for name, (method, request) in calls.items():
                failure = await fails(
                    method(request, metadata=auth(token), timeout=HANG), Code.UNAUTHENTICATED
                )
                assert failure.reason.startswith(("API_KEY", "CREDENTIALS")), (token, name, failure)
            verifying = harness.api_keys.VerifyApiKey(verify, metadata=auth(token), timeout=HANG)
            await fails(verifying, Code.UNAUTHENTICATED, "VERIFIER_TOKEN_REQUIRED")
            events = event_pb2_grpc.EventServiceStub(harness.channel)
            watch = events.WatchEvents(event_pb2.WatchEventsRequest(), metadata=auth(token), timeout=HANG)
            await fails(watch.read(), Code.UNAUTHENTICATED)
        assert await _outcomes(harness, made.owner_api_key_secret, "verifier-only") == {
            made.owner_api_key_secret: INVALID,
            "verifier-only": INVALID,
        }


async def test_wrong_file_tokens_are_throttled_while_the_right_one_and_a_new_one_work(
    backend: Backend, tmp_path: Path
) -> None:
    """With 5 refusals a minute allowed: 5 wrong operator tokens are UNAUTHENTICATED, the 6th
    (and a withdrawn token) RESOURCE_EXHAUSTED TOO_MANY_AUTH_FAILURES; the file's token still
    works, and a token added to the file meanwhile is taken up although the address is throttled."""
    tokens = tmp_path / "operator-token"
    replace(tokens, b"right-token\nleaving-token\n")
    async with _served(backend, tmp_path, tokens, auth_failures_per_minute=5) as harness:
        replace(tokens, b"right-token\n")
        await asyncio.sleep(PAST_A_LOOK)
        first = [await _outcome(harness.organizations, f"wrong-{n}") for n in range(5)]
        assert first == [INVALID] * 5
        assert await _outcomes(harness, "wrong-5", "leaving-token", "right-token") == {
            "wrong-5": "RESOURCE_EXHAUSTED TOO_MANY_AUTH_FAILURES",
            "leaving-token": "RESOURCE_EXHAUSTED TOO_MANY_AUTH_FAILURES",
            "right-token": "OK",
        }
        replace(tokens, b"right-token\nadded-token\n")
        await _taken_up(harness, "added-token")


def test_a_value_naming_no_usable_file_stops_serve_with_one_line(tmp_path: Path) -> None:
    """`@` alone (or with blanks), a missing path, a folder, a FIFO, /dev/zero, a 2 MiB file, a
    file holding only a byte order mark: README, one line naming the variable and the flag, exit
    code 2, nothing created, and never a hang on the FIFO; as a variable and as a flag."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"big-token\n" + b"\n" * (2 * MIB))
    bom = tmp_path / "bom-only"
    bom.write_bytes(b"\xef\xbb\xbf\r\n")
    values = ["@", "@   ", "@/nowhere/token", f"@{folder}", f"@{fifo}", "@/dev/zero", f"@{big}", f"@{bom}"]
    lines = {}
    for number, value in enumerate(values):
        database = tmp_path / f"never-{number}.db"
        variables = {"AGENTPOST_DATABASE_URL": f"sqlite+aiosqlite:///{database}"}
        flags = ["--listen-address", "127.0.0.1:0"]
        if number % 2:
            flags.append(f"--operator-token={value}")
        else:
            variables["AGENTPOST_OPERATOR_TOKEN"] = value
        finished = subprocess.run(
            [sys.executable, "-m", "service", "serve", *flags],
            cwd=PROJECT_ROOT,
            env=process_environment(variables),
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        printed = [line for line in finished.stderr.splitlines() if line.strip()]
        named = all(name in printed[0] for name in ("AGENTPOST_OPERATOR_TOKEN", "--operator-token"))
        lines[value] = (
            finished.returncode,
            len(printed),
            named,
            "Traceback" in finished.stderr,
            database.exists(),
        )
    assert lines == dict.fromkeys(values, (2, 1, True, False, False)), lines


def _members(*lengths: int, first: int = 0) -> list[str]:
    """Valid tracestate members of exactly these lengths, keys k00, k01, ..."""
    return [f"k{first + n:02d}=" + "v" * (length - 4) for n, length in enumerate(lengths)]


def _tracestate_cases() -> dict[str, tuple[tuple[str, ...], str | None]]:
    """Name: (the tracestate header values sent, the trace state expected on the span, or None
    where the README leaves it to OpenTelemetry)."""
    at_512 = _members(128, 128, 128, 125)
    at_513 = _members(128, 128, 128, 126)
    edges = _members(129, 100, 128, 100, 100)
    six = _members(100, 100, 100, 100, 100, 100)
    wide = _members(250, 250, 20)
    many = _members(*[16] * 33)
    spaced = [" k00=a ", " " * 520, " k01=b  "]
    return {
        "exactly 512": ((",".join(at_512),), ",".join(at_512)),
        "513: the last member goes": ((",".join(at_513),), ",".join(at_513[:3])),
        "129 dropped, 128 kept": ((",".join(edges),), ",".join(edges[1:])),
        "then from the end": ((",".join(six),), ",".join(six[:5])),
        "two wide members go first": ((",".join(wide),), wide[2]),
        "33 short members": ((",".join(_members(*[5] * 33)),), None),
        "33 members over 512": ((",".join(many),), ",".join(many[:30])),
        "empty members": ((",,, ,k00=v,, ,",), "k00=v"),
        "empty members over 512": (("," * 600 + "k00=v" + ",,",), "k00=v"),
        "blanks around members over 512": ((",".join(spaced),), "k00=a,k01=b"),
        # Repeated headers are one list (W3C, as HTTP joins them), bounded as a whole.
        "repeated header": (("first=1", "second=2"), "first=1,second=2"),
        "repeated long headers": (
            (",".join(six[:4]), ",".join(later := _members(100, 100, 100, 100, first=10))),
            ",".join([*six[:4], later[0]]),
        ),
    }


@SQLITE_ONLY
async def test_hostile_tracestates_are_cut_to_512_and_the_trace_continued(
    backend: Backend, tmp_path: Path
) -> None:
    """Each call with a valid `traceparent` and a hostile `tracestate` is answered OK; its span
    continues the caller's trace with at most 512 characters of trace state, members over 128
    characters dropped first, then members from the end (README "Tracing")."""
    cases = _tracestate_cases()
    async with observed_server(backend, tmp_path) as observed:
        harness = observed.harness
        org = await harness.new_org()
        for number, (states, _) in enumerate(cases.values()):
            metadata = (
                *auth(org.owner_secret, request_id=f"tracestate-{number}"),
                ("traceparent", VALID_PARENT),
                *(("tracestate", state) for state in states),
            )
            request = organization_pb2.GetOrganizationRequest()
            got = await harness.organizations.GetOrganization(request, metadata=metadata, timeout=HANG)
            assert got.id == org.id
        await asyncio.sleep(0.3)  # spans end as their calls finish
        found = {}
        for number, (name, (_, expected)) in enumerate(cases.items()):
            span = span_of(observed, f"tracestate-{number}")
            assert span.context.trace_id == int(TRACE_ID, 16), name
            assert span.parent is not None and span.parent.span_id == int(PARENT_ID, 16), name
            header = span.context.trace_state.to_header()
            assert len(header) <= 512 and len(span.context.trace_state) <= 32, (name, header)
            found[name] = header if expected is not None else None
        assert found == {name: expected for name, (_, expected) in cases.items()}
