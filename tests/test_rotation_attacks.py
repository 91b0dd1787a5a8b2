"""Attacks on credential rotation without a restart and on the etags of a member's access and of
key rolls (README, "Rotating credentials without a restart" and "ETags are opaque..."), from the
outside: real servers (in-process, a `serve` process, `serve --workers 2`), real TLS handshakes
whose certificate is read from the handshake itself, real gRPC calls.

- Rotation under load: many new connections (raw TLS and gRPC) while three pairs are rotated in
  turn, key and certificate as separate renames: every handshake succeeds with one of the pairs,
  every call answers, an open channel keeps working, the last pair is taken up.
- Kubernetes-style rotation (paths are symlinks through `..data`, swapped atomically): taken up,
  nothing refused.
- Files that cannot be used (a directory, 50 MB of PEM-looking garbage, a certificate whose key
  gRPC cannot load) leave the previous certificate serving, one warning, and the exported expiry
  is the expiry of the certificate that is served; a FIFO in place of a TLS file or of the
  verifier-token file must not hang handshakes or calls.
- Verifier tokens: an overlap rotation (old and new, then new), a file turned into non-UTF-8
  bytes or into a directory: VerifyApiKey never opens, one warning per change, not per call.
- `serve --workers 2`: both workers take up a rotated pair.
- mTLS: a client CA rotated to a bundle of the old and the new CA, then to the new one only.
- Etags: UpdateEnvironmentMember, RemoveEnvironmentMember and AddEnvironmentMember raced across
  two replicas holding one etag; RollApiKey racing RevokeApiKey and another roll with one etag;
  the etags a WatchEvents stream carries are the ones the writes answered, also for access removed
  with its member; an etag on a key or an access out of the caller's reach or right answers
  exactly as without it, and a stale etag does not turn OWNER_ESCALATION into ABORTED.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import ipaddress
import logging
import os
import random
import shutil
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import api_key_pb2_grpc, event_pb2
from agentpost.environments.v1 import member_pb2 as mem_pb
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import rotation
from tests.certificates import Authority, Pem
from tests.harness import Harness, Org, auth, fails, failure_of, mask
from tests.own_database import own_database
from tests.resource_calls import (
    RANDOM_ENV,
    RANDOM_KEY,
    RANDOM_MEMBER,
    access_of,
    add_access,
    events_of,
    leaves_no_trace,
    new_env,
    race,
    refusal_of,
    remove_access,
    revoke_key,
    roll_key,
    update_access,
    update_key,
)
from tests.servers import Backend, serving
from tests.watching import Watcher
from tests.workers import WORKER_LINE, Served, serve_workers

Code = grpc.StatusCode
Event = event_pb2.Event
# A handshake or a call answers well within this; past it, it hangs.
HANG_SECONDS = 5.0
# Longer than the server's look at the files (once a second).
PAST_A_LOOK = 1.5
EXPIRY = "agentpost_tls_certificate_expiry_timestamp_seconds"
LOADED = ("agentpost_tls_reloads_total", frozenset({("outcome", "loaded")}))
REFUSED = ("agentpost_tls_reloads_total", frozenset({("outcome", "refused")}))
VERIFY = "/agentpost.environments.v1.ApiKeyService/VerifyApiKey"
STALE = "ABORTED ETAG_MISMATCH"
GONE = "NOT_FOUND ENVIRONMENT_MEMBER_NOT_FOUND"
EXISTS = "ALREADY_EXISTS ENVIRONMENT_MEMBER_EXISTS"


# -- TLS helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Handshake:
    """What one new TLS connection was served."""

    subject: str
    not_after: float


def _handshake(port: int, ca: Authority, client: Pem | None = None) -> Handshake:
    """A new TLS connection (HTTP/2, as gRPC speaks), fully verified: the certificate it got. A
    hang raises after HANG_SECONDS."""
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=HANG_SECONDS) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return _described(der)


def _described(der: bytes) -> Handshake:
    certificate = x509.load_der_x509_certificate(der)
    name = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return Handshake(str(name), certificate.not_valid_after_utc.timestamp())


def _outcome_of_handshake(port: int, ca: Authority) -> str:
    """The served subject, or the exception a handshake ended with, by name."""
    try:
        return _handshake(port, ca).subject
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def _tls_call(
    port: int, ca: Authority, method: str, message: bytes, headers: list[tuple[str, str]]
) -> tuple[str, int | None]:
    """A unary gRPC call over a new TLS connection of its own (HTTP/2 by hand): the subject of the
    certificate that connection got, and the call's grpc-status."""
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=HANG_SECONDS) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        der = connection.getpeercert(binary_form=True)
        assert der is not None
        subject = _described(der).subject
        http2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        http2.initiate_connection()
        http2.send_headers(
            1,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", method),
                (":authority", f"localhost:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *headers,
            ],
        )
        http2.send_data(1, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
        connection.sendall(http2.data_to_send())
        status: int | None = None
        while True:
            received = connection.recv(65536)
            if not received:
                return subject, status
            for event in http2.receive_data(received):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    for name, value in event.headers or ():
                        if (name if isinstance(name, str) else name.decode()) == "grpc-status":
                            status = int(value)
                elif isinstance(event, h2.events.DataReceived):
                    http2.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(
                    event, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)
                ):
                    return subject, status
            connection.sendall(http2.data_to_send())


async def _health_of(channel: grpc.aio.Channel) -> str:
    """A health check's outcome: "health OK", or "health CODE" (a hang fails after HANG_SECONDS)."""
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HANG_SECONDS)
    except grpc.aio.AioRpcError as error:
        return f"health {error.code().name}"
    return "health OK"


def _expiry_of(pem: Pem) -> float:
    return x509.load_pem_x509_certificate(pem.cert.read_bytes()).not_valid_after_utc.timestamp()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings (and errors) about files that cannot be used: not those about expiry (the
    test certificates are valid for a day)."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == rotation.CREDENTIALS
        and record.levelno >= logging.WARNING
        and "expire" not in record.getMessage()
    ]


def _release(pipe: Path, content: bytes, seconds: float = 3.0) -> bool:
    """Feeds `content` once to whoever is stuck reading the FIFO `pipe` (waiting up to `seconds`
    for a reader); whether there was one."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            descriptor = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody reads it now
            time.sleep(0.05)
            continue
        try:
            os.write(descriptor, content)
        finally:
            os.close(descriptor)
        return True
    return False


def _pair(folder: Path, ca: Authority, *names: str) -> tuple[Pem, list[Pem]]:
    """The served files (the first pair installed) and pairs of the given names."""
    pairs = [ca.issue(name, server=True) for name in names]
    served = Pem(folder / "served.pem", folder / "served-key.pem")
    rotation.install(pairs[0], served)
    return served, pairs


# -- rotation under load ----------------------------------------------------------------------------


async def test_a_rotation_storm_never_fails_a_handshake_or_a_call(backend: Backend, tmp_path: Path) -> None:
    """Three pairs installed in turn for seconds, key then certificate as separate renames (so
    half-written pairs are seen), while 16 threads make raw TLS handshakes and 16 tasks open new
    gRPC channels and call Health: every handshake is verified with one of the three
    certificates (a mismatched pair could not complete one), every call is OK, a channel opened
    before keeps answering, and once the storm ends the last pair is served."""
    ca = Authority(tmp_path, "storm")
    names = ("red", "green", "blue")
    served, pairs = _pair(tmp_path, ca, *names)
    stop = threading.Event()
    last: list[str] = []

    def rotate() -> None:
        """Installs the pairs in turn until stopped, each in full (the last one stays)."""
        turn = 0
        chance = random.Random(7)
        while not stop.is_set():
            turn += 1
            pair = pairs[turn % 3]
            rotation.replace(served.key, pair.key.read_bytes())
            time.sleep(chance.uniform(0, 0.05))
            rotation.replace(served.cert, pair.cert.read_bytes())
            last.append(names[turn % 3])
            time.sleep(chance.uniform(0.05, 0.3))

    handshakes: list[str] = []
    calls: list[str] = []
    kept: list[str] = []

    def handshaking(port: int) -> None:
        while not stop.is_set():
            handshakes.append(_outcome_of_handshake(port, ca))

    async with rotation.server(
        backend, tmp_path, tls_cert_file=str(served.cert), tls_key_file=str(served.key)
    ) as app:
        credentials = rotation.channel_credentials(ca)

        async def calling() -> None:
            while not stop.is_set():
                async with grpc.aio.secure_channel(
                    f"127.0.0.1:{app.port}", credentials, options=[("grpc.use_local_subchannel_pool", 1)]
                ) as channel:
                    try:
                        await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=10
                        )
                        calls.append("OK")
                    except grpc.aio.AioRpcError as error:
                        calls.append(f"{error.code().name}: {error.details()}")

        async with grpc.aio.secure_channel(f"127.0.0.1:{app.port}", credentials) as before:
            health = health_pb2_grpc.HealthStub(before)
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)

            async def keeping() -> None:
                while not stop.is_set():
                    try:
                        await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                        kept.append("OK")
                    except grpc.aio.AioRpcError as error:
                        kept.append(f"{error.code().name}: {error.details()}")
                    await asyncio.sleep(0.05)

            loop = asyncio.get_running_loop()
            with concurrent.futures.ThreadPoolExecutor(max_workers=17) as pool:
                rotator = loop.run_in_executor(pool, rotate)
                threads = [loop.run_in_executor(pool, handshaking, app.port) for _ in range(16)]
                tasks = [asyncio.ensure_future(calling()) for _ in range(16)]
                tasks.append(asyncio.ensure_future(keeping()))
                await asyncio.sleep(6)
                stop.set()
                await asyncio.gather(rotator, *threads, *tasks)
        assert handshakes and calls and kept
        failed = [outcome for outcome in handshakes if outcome not in names]
        assert not failed, f"{len(failed)} of {len(handshakes)} handshakes failed: {sorted(set(failed))[:5]}"
        assert set(calls) == {"OK"}, f"{len(calls) - calls.count('OK')} of {len(calls)}: {set(calls)}"
        assert set(kept) == {"OK"}, set(kept)
        assert len(set(handshakes)) >= 2, "the rotation was never taken up during the storm"
        await rotation.subject_becomes(app.port, ca, last[-1])


# -- Kubernetes-style rotation ------------------------------------------------------------------


def _publish(secret: Path, pair: Pem, version: str) -> Path:
    """A Kubernetes secret update carrying `pair` as tls.crt and tls.key."""
    return rotation.publish(
        secret, {"tls.crt": pair.cert.read_bytes(), "tls.key": pair.key.read_bytes()}, version
    )


async def test_a_kubernetes_style_secret_swap_is_taken_up_without_refusals(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The configured paths are symlinks through `..data` to a timestamped folder; each rotation
    swaps `..data` atomically and removes the old folder: each new certificate is served, no
    rotation is refused and nothing is warned."""
    ca = Authority(tmp_path, "kube")
    pairs = [ca.issue(name, server=True) for name in ("first", "second", "third")]
    secret = tmp_path / "secret"
    secret.mkdir()
    old = _publish(secret, pairs[0], "2026_11_25_08_00_00.1")
    os.symlink("..data/tls.crt", secret / "tls.crt")
    os.symlink("..data/tls.key", secret / "tls.key")
    with caplog.at_level(logging.INFO, logger=rotation.CREDENTIALS):
        async with rotation.server(
            backend, tmp_path, tls_cert_file=str(secret / "tls.crt"), tls_key_file=str(secret / "tls.key")
        ) as app:
            assert (await asyncio.to_thread(_handshake, app.port, ca)).subject == "first"
            for number, (name, pair) in enumerate(zip(("second", "third"), pairs[1:], strict=True), start=2):
                new = _publish(secret, pair, f"2026_11_25_08_00_0{number}.{number}")
                shutil.rmtree(old)
                old = new
                await rotation.subject_becomes(app.port, ca, name)
            samples = await asyncio.to_thread(rotation.metrics, app)
    assert samples[REFUSED] == 0, _warnings(caplog)
    assert samples[LOADED] >= 2
    assert samples[(EXPIRY, frozenset())] == _expiry_of(pairs[2])
    assert _warnings(caplog) == []


# -- files that cannot be used ------------------------------------------------------------------


def _garbage_pem(size: int) -> bytes:
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5\n"
    return b"-----BEGIN CERTIFICATE-----\n" + line * (size // len(line)) + b"-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    "broken", ["the certificate path made a directory", "a 50 MB PEM-looking certificate"]
)
async def test_a_certificate_path_that_cannot_serve_keeps_the_previous_one(
    backend: Backend, tmp_path: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The certificate file is replaced by a directory, or by 50 MB of PEM-looking garbage: new
    connections keep getting the previous certificate, calls answer, one warning is logged however
    many handshakes follow, the refusal is counted and the exported expiry stays the served
    certificate's; usable files are then taken up."""
    ca = Authority(tmp_path, "kinds")
    served, (first, second) = _pair(tmp_path, ca, "first", "second")
    async with rotation.server(
        backend, tmp_path, tls_cert_file=str(served.cert), tls_key_file=str(served.key)
    ) as app:
        with caplog.at_level(logging.WARNING, logger=rotation.CREDENTIALS):
            if broken.startswith("the certificate path made a directory"):
                served.cert.unlink()
                served.cert.mkdir()
            else:
                rotation.replace(served.cert, _garbage_pem(50 * 1024 * 1024))
            seen = []
            deadline = time.monotonic() + 3 * PAST_A_LOOK
            while time.monotonic() < deadline:
                seen.append(await asyncio.to_thread(_outcome_of_handshake, app.port, ca))
                await asyncio.sleep(0.1)
            assert set(seen) == {"first"}, seen
            assert await rotation.healthy(app.port, rotation.channel_credentials(ca)) == Code.OK
            samples = await asyncio.to_thread(rotation.metrics, app)
        assert samples[REFUSED] == 1, samples[REFUSED]
        assert samples[(EXPIRY, frozenset())] == _expiry_of(first)
        warnings = _warnings(caplog)
        assert len(warnings) == 1, warnings
        if served.cert.is_dir():
            served.cert.rmdir()
        rotation.install(second, served)
        await rotation.subject_becomes(app.port, ca, "second")


def _ed448_pair(folder: Path, ca: Authority, name: str, days: int) -> Pem:
    """A server certificate whose key is Ed448: OpenSSL (Python's ssl) loads it, BoringSSL (gRPC's)
    has no Ed448."""
    key = ed448.Ed448PrivateKey.generate()
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    pem = Pem(folder / f"{name}.pem", folder / f"{name}-key.pem")
    pem.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pem


async def test_the_exported_expiry_is_that_of_the_certificate_served(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The pair is rotated to an Ed448 certificate (valid 3 days; the first one, 1 day): either new
    connections get it, or it is refused (a warning, counted) and the first one stays served. In
    both cases `agentpost_tls_certificate_expiry_timestamp_seconds` is the expiry of the
    certificate new connections get: it is what an alert fires on before clients fail."""
    ca = Authority(tmp_path, "ed448")
    served, (first,) = _pair(tmp_path, ca, "first")
    other = _ed448_pair(tmp_path, ca, "edwards", days=3)
    async with rotation.server(
        backend, tmp_path, tls_cert_file=str(served.cert), tls_key_file=str(served.key)
    ) as app:
        with caplog.at_level(logging.INFO, logger=rotation.CREDENTIALS):
            rotation.install(other, served)

            async def looked() -> bool:
                await asyncio.to_thread(_outcome_of_handshake, app.port, ca)
                samples = await asyncio.to_thread(rotation.metrics, app)
                return samples[LOADED] + samples[REFUSED] >= 1

            await rotation.eventually(looked, "the server looked at the rotated files")
            got = await asyncio.to_thread(_handshake, app.port, ca)
            samples = await asyncio.to_thread(rotation.metrics, app)
        assert got.subject in ("first", "edwards")
        assert samples[(EXPIRY, frozenset())] == got.not_after, (
            f"new connections get {got.subject!r} (expiring {got.not_after}) but the exported expiry is "
            f"{samples[(EXPIRY, frozenset())]} (loaded {samples[LOADED]}, refused {samples[REFUSED]}); "
            f"logged: {[r.getMessage() for r in caplog.records if r.name == rotation.CREDENTIALS]}"
        )
        if got.subject == "first":
            assert samples[REFUSED] >= 1 and samples[LOADED] == 0, samples
            assert len(_warnings(caplog)) == 1, _warnings(caplog)
        assert _expiry_of(first) != _expiry_of(other)


async def test_a_fifo_in_place_of_the_key_does_not_hang_handshakes(backend: Backend, tmp_path: Path) -> None:
    """The key file is replaced by a FIFO nobody writes to (a process server, so that a hang
    cannot hang the test): TLS must not drop, i.e. every new connection is still served the
    previous certificate and a new channel's call answers. Then usable files are taken up."""
    ca = Authority(tmp_path, "fifo")
    served, (_, second) = _pair(tmp_path, ca, "first", "second")
    async with rotation.serve_process(
        backend, tmp_path, AGENTPOST_TLS_CERT_FILE=str(served.cert), AGENTPOST_TLS_KEY_FILE=str(served.key)
    ) as server:
        assert (await asyncio.to_thread(_handshake, server.port, ca)).subject == "first"
        pipe = rotation.fifo_over(served.key)
        await asyncio.sleep(PAST_A_LOOK)
        outcomes = [await asyncio.to_thread(_outcome_of_handshake, server.port, ca) for _ in range(3)]
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{server.port}",
            rotation.channel_credentials(ca),
            options=[("grpc.use_local_subchannel_pool", 1)],
        ) as channel:
            outcomes.append(await _health_of(channel))
        # Recovery: usable files, and whoever is stuck on the FIFO released.
        rotation.install(second, served)
        await asyncio.to_thread(_release, pipe, second.key.read_bytes())
        assert outcomes == ["first", "first", "first", "health OK"], (
            f"with a FIFO as the key file: {outcomes}; log: {server.log()[-2000:]}"
        )
        await rotation.subject_becomes(server.port, ca, "second")


# -- verifier tokens ----------------------------------------------------------------------------


async def test_a_fifo_as_the_verifier_token_file_does_not_hang_the_server(
    backend: Backend, tmp_path: Path
) -> None:
    """The verifier-token file is replaced by a FIFO nobody writes to (a process server): a
    VerifyApiKey call with a wrong token is still UNAUTHENTICATED VERIFIER_TOKEN_REQUIRED and a
    health check answers, within seconds; the server must not wait on the file."""
    tokens = tmp_path / "verifier-tokens"
    rotation.replace(tokens, b"old-token\n")
    async with (
        rotation.serve_process(backend, tmp_path, AGENTPOST_VERIFIER_TOKENS=f"@{tokens}") as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        keys = api_key_pb2_grpc.ApiKeyServiceStub(channel)
        request = key_pb.VerifyApiKeyRequest(secret="ap_sk_live_x", environment="default")
        answer = await keys.VerifyApiKey(
            request, metadata=(("authorization", "Bearer old-token"),), timeout=10
        )
        assert not answer.valid
        pipe = rotation.fifo_over(tokens)
        await asyncio.sleep(PAST_A_LOOK)
        outcomes = []
        try:
            await keys.VerifyApiKey(
                request, metadata=(("authorization", "Bearer wrong-token"),), timeout=HANG_SECONDS
            )
            outcomes.append("verified OK")
        except grpc.aio.AioRpcError as error:
            outcomes.append(f"verify {error.code().name}")
        outcomes.append(await _health_of(channel))
        rotation.replace(tokens, b"old-token\n")
        await asyncio.to_thread(_release, pipe, b"old-token\n")
        assert outcomes == ["verify UNAUTHENTICATED", "health OK"], (
            f"with a FIFO as the token file: {outcomes}; log: {server.log()[-2000:]}"
        )
        await fails(
            keys.VerifyApiKey(request, metadata=(("authorization", "Bearer wrong-token"),), timeout=10),
            Code.UNAUTHENTICATED,
            "VERIFIER_TOKEN_REQUIRED",
        )


async def test_verifier_tokens_overlap_then_survive_broken_files_with_one_warning_each(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`@FILE` rotated with an overlap (old, then old and new, then new): during the overlap both
    tokens verify, after it only the new one. The file is then made non-UTF-8 bytes, then a
    directory: for seconds of calls after each, the new token verifies, the old one, a made-up
    one, an empty one and none at all are UNAUTHENTICATED VERIFIER_TOKEN_REQUIRED, and each change
    is warned about once, not at every call. A usable file is then taken up."""
    tokens = tmp_path / "verifier-tokens"
    rotation.replace(tokens, b"old-token\n")
    async with rotation.served(backend, tmp_path, verifier_tokens=f"@{tokens}") as harness:
        org = await harness.new_org()
        request = key_pb.VerifyApiKeyRequest(secret=org.owner_secret, environment="default")

        async def verified(token: str | None) -> bool:
            metadata = () if token is None else (("authorization", f"Bearer {token}"),)
            try:
                answer = await harness.api_keys.VerifyApiKey(request, metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as error:
                failure = failure_of(error)
                assert (failure.code, failure.reason) == (Code.UNAUTHENTICATED, "VERIFIER_TOKEN_REQUIRED"), (
                    failure
                )
                return False
            assert answer.valid
            return True

        async def taken_up(token: str) -> None:
            async def check() -> bool:
                return await verified(token)

            await rotation.eventually(check, f"{token} verifies")

        assert await verified("old-token")
        rotation.replace(tokens, b"old-token\nnew-token\n")
        await taken_up("new-token")
        assert await verified("old-token"), "the overlap dropped the old token"
        rotation.replace(tokens, b"new-token\n")

        async def old_refused() -> bool:
            return not await verified("old-token")

        await rotation.eventually(old_refused, "the old token refused after the overlap")
        with caplog.at_level(logging.WARNING, logger=rotation.CREDENTIALS):
            for breaking in ("non-UTF-8", "a directory"):
                if breaking == "non-UTF-8":
                    rotation.replace(tokens, b"\xff\xfe\x80new-token\xc3\x28\n")
                else:
                    tokens.unlink()
                    tokens.mkdir()
                deadline = time.monotonic() + 2 * PAST_A_LOOK
                while time.monotonic() < deadline:
                    assert await verified("new-token"), breaking
                    for wrong in ("old-token", "made-up", "", None):
                        assert not await verified(wrong), (breaking, wrong)
                    await asyncio.sleep(0.1)
        warnings = _warnings(caplog)
        assert len(warnings) == 2, warnings
        tokens.rmdir()
        rotation.replace(tokens, b"newest-token\n")
        await taken_up("newest-token")
        assert not await verified("new-token")


# -- serve --workers 2 ------------------------------------------------------------------------


async def _worker_and_subject(served: Served, ca: Authority) -> tuple[int, str]:
    """A new TLS connection: which worker served it (from the log line of its refused call's
    request id) and the certificate it got."""
    request_id = f"rotation-{uuid.uuid4().hex}"
    subject, status = await asyncio.to_thread(
        _tls_call,
        served.port,
        ca,
        VERIFY,
        key_pb.VerifyApiKeyRequest(secret="ap_sk_live_x", required_scopes=["no:such"]).SerializeToString(),
        [("x-request-id", request_id)],
    )
    assert status == Code.INVALID_ARGUMENT.value[0], status
    async with asyncio.timeout(10):
        while True:
            for line in served.log().splitlines():
                found = WORKER_LINE.match(line)
                if found and f"[{request_id}]" in line:
                    return int(found.group(3)), subject
            await asyncio.sleep(0.05)


async def test_both_workers_take_up_a_rotated_pair(backend: Backend, tmp_path: Path) -> None:
    """`serve --workers 2` with TLS files: after the pair is rotated, new connections to each
    worker get the new certificate within seconds, and from then on every new connection does."""
    ca = Authority(tmp_path, "workers")
    served_files, (_, second) = _pair(tmp_path, ca, "first", "second")
    served = await serve_workers(
        own_database(backend, tmp_path / "db"),
        tmp_path,
        "--migrate",
        "--tls-cert-file",
        str(served_files.cert),
        "--tls-key-file",
        str(served_files.key),
    )
    try:
        await served.until_serving()
        workers = served.worker_pids()
        assert len(workers) == 2
        before: dict[int, str] = {}
        for _ in range(64):
            pid, subject = await _worker_and_subject(served, ca)
            before[pid] = subject
            if len(before) == 2:
                break
        assert before == dict.fromkeys(workers, "first"), before
        rotation.install(second, served_files)
        latest: dict[int, str] = {}

        async def both_rotated() -> bool:
            pid, subject = await _worker_and_subject(served, ca)
            latest[pid] = subject
            return latest == dict.fromkeys(workers, "second")

        await rotation.eventually(both_rotated, f"both workers serve the new certificate ({latest})")
        after = [await _worker_and_subject(served, ca) for _ in range(16)]
        assert {subject for _, subject in after} == {"second"}, after
    finally:
        assert await served.stop() == 0, served.log()[-3000:]


# -- mTLS ------------------------------------------------------------------------------------


async def test_a_client_ca_rotated_through_a_bundle_accepts_both_then_only_the_new(
    backend: Backend, tmp_path: Path
) -> None:
    """The client CA file becomes a bundle of the old and the new CA: clients of both are
    served; then only the new CA: the old CA's clients are refused on new connections, while a
    channel the old client opened before keeps answering."""
    async with rotation.mutual_tls_server(backend, tmp_path) as (app, tls):
        old_credentials, new_credentials = tls.old_client, tls.new_client
        client_ca, old_ca, new_ca = tls.client_ca, tls.old_ca, tls.new_ca
        assert await rotation.healthy(app.port, old_credentials) == Code.OK
        assert await rotation.healthy(app.port, new_credentials) == Code.UNAVAILABLE
        rotation.replace(client_ca, old_ca.pem + new_ca.pem)

        async def new_served() -> bool:
            return await rotation.healthy(app.port, new_credentials) == Code.OK

        await rotation.eventually(new_served, "the bundle's new CA")
        for _ in range(5):
            assert await rotation.healthy(app.port, old_credentials) == Code.OK
            assert await rotation.healthy(app.port, new_credentials) == Code.OK
        async with grpc.aio.secure_channel(f"127.0.0.1:{app.port}", old_credentials) as opened:
            health = health_pb2_grpc.HealthStub(opened)
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            rotation.replace(client_ca, new_ca.pem)

            async def old_refused() -> bool:
                return await rotation.healthy(app.port, old_credentials) == Code.UNAVAILABLE

            await rotation.eventually(old_refused, "the old CA dropped")
            assert await rotation.healthy(app.port, new_credentials) == Code.OK
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        samples = await asyncio.to_thread(rotation.metrics, app)
        assert samples[REFUSED] == 0 and samples[LOADED] >= 2, samples


# -- etags --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _replicas(backend: Backend, folder: Path) -> AsyncIterator[tuple[Harness, Harness]]:
    """Two servers on one database (a file of their own on SQLite)."""
    database = own_database(backend, folder)
    async with serving(database) as first, serving(database) as second:
        yield first, second


def _in_turn(turn: int, *calls: Callable[[], Any]) -> list[Any]:
    """The calls started in an order rotated by `turn`, listed in the order given."""
    started = {}
    for offset in range(len(calls)):
        index = (turn + offset) % len(calls)
        started[index] = calls[index]()
    return [started[index] for index in range(len(calls))]


async def _after(delay: float, call: Callable[..., Awaitable[Any]], *arguments: Any) -> Any:
    """`call(*arguments)` made `delay` seconds from now."""
    await asyncio.sleep(delay)
    return await call(*arguments)


ADMIN = mem_pb.EnvironmentMember.ADMIN
MEMBER = mem_pb.EnvironmentMember.MEMBER


async def _seen_by(replica: Harness, org: Org, access: mem_pb.EnvironmentMember) -> None:
    """Waits until the replica lists the access (its cache then knows the environment too)."""

    async def listed() -> bool:
        try:
            return await access_of(replica, org, access.environment_id, access.member_id) == access
        except grpc.aio.AioRpcError as error:
            assert error.code() == Code.NOT_FOUND, error
            return False

    await rotation.eventually(listed, "the other replica lists the access")


async def test_update_remove_and_add_again_raced_across_replicas_holding_one_etag(
    backend: Backend, tmp_path: Path
) -> None:
    """Rounds of: a member's access added; then, at once, through two replicas, two updates and a
    removal holding its etag, and an AddEnvironmentMember a moment later. Exactly one of the three
    holding the etag commits; an add commits only after the removal, with a new etag; an update
    holding the old etag never changes the new grant (afterwards either); what is stored is the
    winner's answer, on both replicas; and a WatchEvents stream on the other replica carries every
    answered EnvironmentMember exactly, etag included."""
    async with _replicas(backend, tmp_path) as (one, two):
        org = await one.new_org()
        secret = org.owner_secret
        watcher = Watcher(two.channel, secret, resource_types=[Event.ENVIRONMENT_MEMBER])
        try:
            await watcher.live()
            answered: list[mem_pb.EnvironmentMember] = []
            for round_number in range(9):
                env = await new_env(one, org)
                member = await one.new_member(org, "MEMBER")
                access = await add_access(one, secret, env.id, member.id)
                answered.append(access)
                held = access.etag
                await _seen_by(two, org, access)
                # Each of the three holding the etag is sent first in turn; the add follows at once
                # or a moment later.
                outcomes = await race(
                    *_in_turn(
                        round_number,
                        partial(update_access, one, secret, env.id, member.id, ADMIN, ("role",), held),
                        partial(update_access, two, secret, env.id, member.id, ADMIN, ("role",), held),
                        partial(
                            remove_access, two if round_number % 2 else one, secret, env.id, member.id, held
                        ),
                    ),
                    _after(
                        0.05 if (round_number // 3) % 2 == 0 else 0.0,
                        add_access,
                        two if round_number % 2 else one,
                        secret,
                        env.id,
                        member.id,
                        ADMIN,
                    ),
                )
                holders, (added_status, added) = outcomes[:3], outcomes[3]
                winners = [index for index, (status, _) in enumerate(holders) if status == "OK"]
                assert len(winners) == 1, outcomes
                assert all(status in (STALE, GONE) for status, _ in holders if status != "OK"), outcomes
                assert added_status in ("OK", EXISTS), outcomes
                if added_status == "OK":
                    assert winners == [2], f"an add committed while the access existed: {outcomes}"
                    assert added.etag != held
                    answered.append(added)
                if winners != [2]:
                    answered.append(holders[winners[0]][1])
                expected = (
                    added if added_status == "OK" else None if winners == [2] else holders[winners[0]][1]
                )
                for replica in (one, two):
                    assert await access_of(replica, org, env.id, member.id) == expected
                # The etag read before now names nothing: never a change to what is there.
                late = await race(
                    update_access(two, secret, env.id, member.id, MEMBER, ("role",), held),
                    remove_access(one, secret, env.id, member.id, held),
                )
                assert all(status in (STALE, GONE) for status, _ in late), late
                assert await access_of(one, org, env.id, member.id) == expected
            await watcher.until(
                lambda: all(
                    any(event.environment_member == answer for event in watcher.events) for answer in answered
                )
            )
        finally:
            await watcher.close()
        # Every event's access is one some write answered, or the removed one.
        for event in watcher.events:
            if event.action != Event.REMOVED:
                assert event.environment_member in answered, event


async def test_roll_revoke_and_roll_holding_one_etag_across_replicas(
    backend: Backend, tmp_path: Path
) -> None:
    """Rounds of: a key; then, at once, through two replicas, two RollApiKey calls and a
    RevokeApiKey holding its etag. Exactly one commits, the others are ABORTED ETAG_MISMATCH: a
    roll that won made exactly one successor and left the key unrevoked; a revoke that won left
    the key revoked and no successor."""
    async with _replicas(backend, tmp_path) as (one, two):
        org = await one.new_org()
        secret = org.owner_secret
        wins = {"roll": 0, "revoke": 0}
        for round_number in range(9):
            name = f"raced-{round_number}-{uuid.uuid4().hex[:6]}"
            key, _ = await one.new_key(org, ["inboxes:read"], name=name)
            outcomes = await race(
                *_in_turn(
                    round_number,
                    partial(roll_key, one, secret, key.id, 3600, key.etag),
                    partial(revoke_key, two, secret, key.id, key.etag),
                    partial(roll_key, two, secret, key.id, 3600, key.etag),
                )
            )
            winners = [index for index, (status, _) in enumerate(outcomes) if status == "OK"]
            assert len(winners) == 1, outcomes
            assert all(status == STALE for status, _ in outcomes if status != "OK"), outcomes
            for replica in (one, two):
                page = await replica.api_keys.ListApiKeys(
                    key_pb.ListApiKeysRequest(page_size=500, show_revoked=True), metadata=auth(secret)
                )
                named = {listed.id: listed for listed in page.api_keys if listed.name == name}
                winner = outcomes[winners[0]][1]
                if winners[0] == 1:
                    assert named == {key.id: winner}, named
                else:
                    assert named == {key.id: winner.previous_api_key, winner.api_key.id: winner.api_key}, (
                        named
                    )
                    assert not winner.previous_api_key.HasField("revoke_time")
            wins["revoke" if winners[0] == 1 else "roll"] += 1
        assert sum(wins.values()) == 9


async def test_an_etag_out_of_reach_answers_exactly_as_no_etag(harness: Harness, org: Org) -> None:
    """A key of another organization, a key and an access outside the caller's reach, and an
    access in an environment the caller may see but not administer, named with their current
    etag or a stale one: every changing call answers exactly what it answers without an etag
    (and for a random id where the id names nothing the caller may see), never ABORTED, and
    nothing changes."""
    secret = org.owner_secret
    other = await harness.new_org("Other")
    other_key, _ = await harness.new_key(other, ["inboxes:read"])
    other_member = await harness.new_member(other, "MEMBER")
    other_access = await harness.add_environment_member(
        other.owner_secret, other.default_environment.id, other_member.id
    )
    env_a = await new_env(harness, org, "A")
    env_b = await new_env(harness, org, "B")
    member = await harness.new_member(org, "MEMBER")
    access_b = await harness.add_environment_member(secret, env_b.id, member.id)
    key_b, _ = await harness.new_key(org, ["inboxes:read"], [env_b.id])
    writes = [
        f"{area}:{access}" for area in ("members", "api_keys", "inboxes") for access in ("read", "write")
    ]
    _, local = await harness.new_key(org, writes, [env_a.id])
    # A MEMBER of env A (not its ADMIN), whose own key may write members there.
    plain = await harness.new_member(org, "MEMBER")
    await harness.add_environment_member(secret, env_a.id, plain.id)
    shared = await harness.add_environment_member(secret, env_a.id, member.id)
    _, plain_key = await harness.new_key(org, writes, [env_a.id], owner_member_id=plain.id)

    def key_calls(caller: str, key_id: str, etag: str) -> list[Any]:
        return [
            roll_key(harness, caller, key_id, 60, etag),
            revoke_key(harness, caller, key_id, etag),
            update_key(harness, caller, key_pb.ApiKey(id=key_id, name="x", etag=etag), ("name",)),
        ]

    def access_calls(caller: str, env_id: str, member_id: str, etag: str) -> list[Any]:
        return [
            update_access(harness, caller, env_id, member_id, ADMIN, ("role",), etag),
            remove_access(harness, caller, env_id, member_id, etag),
        ]

    async def answers(calls: list[Any]) -> list[tuple[grpc.StatusCode, str]]:
        return [((refusal := await refusal_of(call)).code, refusal.reason) for call in calls]

    cases: list[tuple[str, Callable[[str], list[Any]], list[Any] | None]] = [
        (
            "another organization's key",
            lambda etag: key_calls(secret, other_key.id, etag),
            key_calls(secret, RANDOM_KEY, ""),
        ),
        (
            "a key outside the caller's environments",
            lambda etag: key_calls(local, key_b.id, etag),
            key_calls(local, RANDOM_KEY, ""),
        ),
        (
            "another organization's access",
            lambda etag: access_calls(secret, other.default_environment.id, other_member.id, etag),
            access_calls(secret, RANDOM_ENV, RANDOM_MEMBER, ""),
        ),
        (
            "an access outside the caller's environments",
            lambda etag: access_calls(local, env_b.id, member.id, etag),
            access_calls(local, RANDOM_ENV, RANDOM_MEMBER, ""),
        ),
        (
            "an access in an environment the caller does not administer",
            lambda etag: access_calls(plain_key, env_a.id, member.id, etag),
            None,
        ),
    ]
    current = {
        "another organization's key": other_key.etag,
        "a key outside the caller's environments": key_b.etag,
        "another organization's access": other_access.etag,
        "an access outside the caller's environments": access_b.etag,
        "an access in an environment the caller does not administer": shared.etag,
    }
    async with leaves_no_trace(harness, org), leaves_no_trace(harness, other):
        for what, calls, random_calls in cases:
            without = await answers(calls(""))
            assert all(code in (Code.NOT_FOUND, Code.PERMISSION_DENIED) for code, _ in without), (
                what,
                without,
            )
            if random_calls is not None:
                assert without == await answers(random_calls), what
            for etag in (current[what], "0" * 16):
                assert await answers(calls(etag)) == without, (what, etag)
    assert await access_of(harness, org, env_a.id, member.id) == shared


async def test_a_key_that_may_not_touch_an_owners_key_is_refused_whatever_etag_it_holds(
    harness: Harness, org: Org
) -> None:
    """An ADMIN's organization key may see the OWNER's key but not revoke, roll or change it
    (OWNER_ESCALATION). Holding a stale etag must not change that answer into ABORTED: permission
    is decided before the etag, as UpdateMember and DeleteMember of an OWNER do (OWNER_REQUIRED
    whatever the etag)."""
    admin = await harness.new_member(org, "ADMIN")
    _, admin_key = await harness.new_key(
        org,
        ["api_keys:read", "api_keys:write", "members:read", "members:write", "inboxes:read"],
        owner_member_id=admin.id,
    )
    target = await harness.api_keys.GetApiKey(
        key_pb.GetApiKeyRequest(id=org.owner_key_id), metadata=auth(admin_key)
    )
    owner = await harness.members.GetMember(
        mem_pb.GetMemberRequest(id=org.owner_member_id), metadata=auth(admin_key)
    )
    stale = "0" * 16

    async def answer(call: Any) -> tuple[grpc.StatusCode, str]:
        refusal = await refusal_of(call)
        return refusal.code, refusal.reason

    observed = {}
    async with leaves_no_trace(harness, org):
        for etag in (target.etag, stale):
            observed[("RevokeApiKey", etag == stale)] = await answer(
                revoke_key(harness, admin_key, target.id, etag)
            )
            observed[("UpdateApiKey", etag == stale)] = await answer(
                update_key(
                    harness, admin_key, key_pb.ApiKey(id=target.id, name="taken", etag=etag), ("name",)
                )
            )
        for etag in (owner.etag, stale):
            observed[("UpdateMember", etag == stale)] = await answer(
                harness.members.UpdateMember(
                    mem_pb.UpdateMemberRequest(
                        member=mem_pb.Member(id=owner.id, display_name="taken", etag=etag),
                        update_mask=mask("display_name"),
                    ),
                    metadata=auth(admin_key),
                )
            )
    for method in ("RevokeApiKey", "UpdateApiKey", "UpdateMember"):
        assert observed[(method, False)][0] == Code.PERMISSION_DENIED, (method, observed)
    differing = {
        method: (
            observed[(method, False)][1],
            f"{observed[(method, True)][0].name} {observed[(method, True)][1]}",
        )
        for method in ("RevokeApiKey", "UpdateApiKey", "UpdateMember")
        if observed[(method, True)] != observed[(method, False)]
    }
    assert not differing, f"with the current etag / with a stale one: {differing}"


async def test_access_removed_with_its_member_is_reported_with_its_last_etag(
    harness: Harness, org: Org
) -> None:
    """A member's access changed twice, then the member deleted (which takes its access with it):
    the REMOVED event of the access carries exactly the access as the last update answered it,
    etag included, on ListEvents and on a WatchEvents stream."""
    secret = org.owner_secret
    env = await new_env(harness, org)
    member = await harness.new_member(org, "MEMBER")
    added = await add_access(harness, secret, env.id, member.id)
    promoted = await update_access(harness, secret, env.id, member.id, ADMIN, ("role",), added.etag)
    demoted = await update_access(harness, secret, env.id, member.id, MEMBER, ("role",), promoted.etag)
    watcher = Watcher(harness.channel, secret, resource_types=[Event.ENVIRONMENT_MEMBER])
    try:
        await watcher.live()
        await harness.members.DeleteMember(mem_pb.DeleteMemberRequest(id=member.id), metadata=auth(secret))
        await watcher.until(lambda: any(event.action == Event.REMOVED for event in watcher.events))
    finally:
        await watcher.close()
    watched = [event.environment_member for event in watcher.events if event.action == Event.REMOVED]
    assert watched == [demoted]
    listed = await events_of(harness, org, f"{env.id}/{member.id}")
    assert [event.action for event in listed][:1] == [Event.REMOVED]
    assert listed[0].environment_member == demoted
    assert [event.environment_member.etag for event in reversed(listed)] == [
        added.etag,
        promoted.etag,
        demoted.etag,
        demoted.etag,
    ]
