"""Attacks on the production security surface (SPEC §7, README "Security" and "Configuration"),
where tests/test_tls.py, tests/test_verifier_tokens.py, tests/test_auth_throttle.py and
tests/test_metadata_attacks.py do not go.

- TLS settings a careless operator gives: a missing, empty, non-PEM or directory certificate,
  key or client CA file, a certificate and key swapped or not belonging together, a key
  protected by a passphrase, a CA file holding a key: `serve` must refuse with one line naming
  the setting and its flag, exit code 2, nothing created, never a traceback, never a server
  whose every handshake fails. The PEM forms operators do have (SEC1 and PKCS#1 keys, CRLF,
  text before the block) must serve.
- mTLS with client certificates that must not get in: expired, not yet valid, signed by a leaf
  certificate of the trusted CA, self-signed under the trusted CA's name, issued for servers
  only; and those that must: a bundle of two client CAs, a client certificate sent with its
  intermediate; a server certificate served with its intermediate.
- Plaintext and TLS meeting each other on the wrong port: a clear failure, never a hang, and
  the server keeps serving.
- AGENTPOST_VERIFIER_TOKENS in the forms operators write (a file with CRLF, a byte order mark,
  blank lines and padded tokens, duplicates, an empty entry, a token with a space or non-ASCII)
  and the forms that name no token (a file that does not exist, is empty, is a folder): what
  they let in, and that a token is never logged.
- A VerifyApiKey refused for its verifier token says nothing of the secret or the request it
  was asked about; a verifier token is no credential anywhere else.
- The failed-authentication throttle: the default limit, 0, 1 and a huge limit as a process
  reads them; one peer across many connections and channels, whatever forwarding headers it
  sends; other addresses (also through a dual-stack listener) unaffected; health and reflection
  never throttled nor needing credentials; what is not a refused credential never counted;
  streams; revoked keys; a throttled backend's VerifyApiKey answers, and a valid key made on
  another replica, from a throttled address.

Settings are tested by starting real `python -m service serve` processes. Transport-only
attacks run on SQLite; those where a key's state lives in the database run on both databases.
Nothing depends on timing except generous hang limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import (
    api_key_pb2,
    api_key_pb2_grpc,
    environment_pb2,
    environment_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    organization_pb2,
    organization_pb2_grpc,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from service.domain import keys
from service.domain.models import KeyMode
from tests.certificates import Authority, Pem, PrivateKey, key_pem
from tests.empty_database import empty_database
from tests.harness import AS_OPERATOR, OPERATOR_TOKEN, Failure, Harness, auth, corrupt, fails, failure_of
from tests.plain_http2 import raw_call
from tests.servers import PROJECT_ROOT, Backend, process_environment, service_process, serving, stop_process

Code = grpc.StatusCode
Denial = api_key_pb2.VerifyApiKeyResponse.DenialReason
LIST = environment_pb2.ListEnvironmentsRequest()
# Generous hang detectors: nothing here is timed, these only end a wait that would never end.
HANG = 10.0
COMMAND_TIMEOUT = 60.0
# Transport and setting attacks do not depend on the database: they run on SQLite only.
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
LIST_METHOD = "/agentpost.environments.v1.EnvironmentService/ListEnvironments"
VERIFY_METHOD = "/agentpost.environments.v1.ApiKeyService/VerifyApiKey"
REFLECTION_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HEALTH_SERVICE = "grpc.health.v1.Health"
UNAUTHENTICATED_STATUS, RESOURCE_EXHAUSTED_STATUS = 16, 8


def _unknown_secret() -> str:
    """Well formed, with a valid checksum, and no such key."""
    return keys.generate(KeyMode.LIVE).secret


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _retry_delay(failure: Failure) -> float:
    """The RetryInfo delay of a failure, in seconds."""
    status = status_pb2.Status.FromString(failure.trailers["grpc-status-details-bin"])
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError(f"no RetryInfo in {failure}")


async def _refused_key(stub: Harness | grpc.aio.Channel, expected: grpc.StatusCode, reason: str) -> Failure:
    """ListEnvironments with a made-up key, which must fail with `expected` and `reason`."""
    channel = stub.channel if isinstance(stub, Harness) else stub
    return await fails(
        environment_pb2_grpc.EnvironmentServiceStub(channel).ListEnvironments(
            LIST, metadata=auth(_unknown_secret()), timeout=HANG
        ),
        expected,
        reason,
    )


async def _exhaust(harness: Harness, limit: int) -> Failure:
    """Sends exactly `limit` refused credentials (each UNAUTHENTICATED), then one more, which
    must be RESOURCE_EXHAUSTED TOO_MANY_AUTH_FAILURES; returns that last failure."""
    for _ in range(limit):
        await _refused_key(harness, Code.UNAUTHENTICATED, "API_KEY_NOT_FOUND")
    return await _refused_key(harness, Code.RESOURCE_EXHAUSTED, "TOO_MANY_AUTH_FAILURES")


@contextlib.asynccontextmanager
async def _own_server(backend: Backend, folder: Path, **settings: object) -> AsyncIterator[Harness]:
    """A server and database of its own with `settings`."""
    async with empty_database(backend, folder) as database, serving(database, **settings) as harness:
        yield harness


# -- certificates ---------------------------------------------------------------------------------


@dataclass
class Certificates:
    """The trusted CA with a server certificate and a good client certificate."""

    folder: Path
    ca: Authority
    server: Pem
    client: Pem


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("tls-attacks")
    ca = Authority(folder, "trusted")
    return Certificates(folder, ca, ca.issue("server", server=True), ca.issue("backend", server=False))


def _credentials(root: bytes, client: Pem | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    cert, key = client.read()
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


async def _health(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> int:
    """The health status of the whole server, checked over `channel`."""
    answer = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), metadata=metadata, timeout=HANG
    )
    return int(answer.status)


async def _handshake_refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The code of a health check that must not get through the handshake."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _health(channel)
    return raised.value.code()


# -- server processes -----------------------------------------------------------------------------

SERVING = re.compile(r"serving on \S+ \(port (\d+)")


@dataclass
class Process:
    """A `serve` process: the port it serves on, or the code it exited with before serving, and
    everything it wrote to stderr (still growing while it runs)."""

    process: asyncio.subprocess.Process
    port: int | None = None
    code: int | None = None
    stderr: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr if line.strip()]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _environment(folder: Path, **variables: str) -> dict[str, str]:
    """A process environment on a new SQLite file in `folder`, on any free port, with the test
    operator token and `variables` (AGENTPOST_ names without the prefix, lower case) on top."""
    values = {
        "AGENTPOST_DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'agentpost.db'}",
        "AGENTPOST_LISTEN_ADDRESS": "127.0.0.1:0",
        "AGENTPOST_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "AGENTPOST_SHUTDOWN_DRAIN_SECONDS": "0",
        "AGENTPOST_SHUTDOWN_GRACE_SECONDS": "1",
    }
    values.update({f"AGENTPOST_{name.upper()}": value for name, value in variables.items()})
    return process_environment(values)


@contextlib.asynccontextmanager
async def _serve(env: dict[str, str]) -> AsyncIterator[Process]:
    """`serve --migrate` as a process of its own, until it serves (`port`) or exits (`code`);
    stopped with SIGTERM at the end."""
    process = await service_process(
        "serve", "--migrate", env=env, cwd=PROJECT_ROOT, stdout=asyncio.subprocess.DEVNULL
    )
    assert process.stderr is not None
    stream = process.stderr
    running = Process(process)
    serving_or_gone = asyncio.Event()

    async def read() -> None:
        while line := (await stream.readline()).decode(errors="replace"):
            running.stderr.append(line)
            matched = SERVING.search(line)
            if matched:
                running.port = int(matched.group(1))
                serving_or_gone.set()
        serving_or_gone.set()

    reading = asyncio.ensure_future(read())
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            await serving_or_gone.wait()
            if running.port is None:
                running.code = await process.wait()
                await reading
        yield running
    finally:
        await stop_process(process)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await reading
        reading.cancel()


async def _refuses_setting(env: dict[str, str], folder: Path, variable: str | tuple[str, ...]) -> Process:
    """`serve --migrate` with `env` must refuse a setting the documented way: exit 2 before
    serving, one line naming the variable (one of them, when several may be to blame) and its
    flag, no traceback, no database created."""
    names = (variable,) if isinstance(variable, str) else variable
    async with _serve(env) as outcome:
        assert outcome.port is None, (
            f"it started serving instead of refusing {names}:\n{''.join(outcome.stderr)}"
        )
    said = "".join(outcome.stderr)
    assert "Traceback" not in said, said[-3000:]
    assert outcome.code == 2, f"exit {outcome.code}:\n{said[-3000:]}"
    assert len(outcome.lines) == 1, said[-3000:]
    line = outcome.lines[0]
    flags = [f"--{name.removeprefix('AGENTPOST_').lower().replace('_', '-')}" for name in names]
    assert any(name in line and flag in line for name, flag in zip(names, flags, strict=True)), line
    assert not (folder / "agentpost.db").exists(), "the database was created although a setting was refused"
    return outcome


# -- TLS settings ---------------------------------------------------------------------------------

CERT, KEY, CLIENT_CA = "AGENTPOST_TLS_CERT_FILE", "AGENTPOST_TLS_KEY_FILE", "AGENTPOST_TLS_CLIENT_CA_FILE"


def _tls_case(case: str, certificates: Certificates, folder: Path) -> tuple[dict[str, str], tuple[str, ...]]:
    """The TLS variables of a wrong configuration, and the settings a refusal may name."""
    cert, key = str(certificates.server.cert), str(certificates.server.key)
    garbage = folder / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    empty = folder / "empty.pem"
    empty.write_bytes(b"")
    stranger_key = folder / "stranger-key.pem"
    stranger_key.write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    # The same key, protected by a passphrase the server cannot know.
    own_locked = folder / "own-locked-key.pem"
    own_locked.write_bytes(
        key_pem(
            serialization.load_pem_private_key(certificates.server.key.read_bytes(), None),  # type: ignore[arg-type]
            passphrase=b"passphrase",
        )
    )
    # A pair Python's ssl module takes but gRPC's TLS does not serve (it refuses to bind).
    unserved = certificates.ca.issue("server-ed448", server=True, key=ed448.Ed448PrivateKey.generate())  # type: ignore[arg-type]
    fifo = folder / "key.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    cases: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
        "key-of-a-type-grpc-does-not-serve": (
            {"tls_cert_file": str(unserved.cert), "tls_key_file": str(unserved.key)},
            (KEY,),
        ),
        "key-is-a-fifo": ({"tls_cert_file": cert, "tls_key_file": str(fifo)}, (KEY,)),
        "cert-missing": ({"tls_cert_file": str(folder / "nope.pem"), "tls_key_file": key}, (CERT,)),
        "cert-directory": ({"tls_cert_file": str(folder), "tls_key_file": key}, (CERT,)),
        "cert-not-pem": ({"tls_cert_file": str(garbage), "tls_key_file": key}, (CERT,)),
        "cert-empty": ({"tls_cert_file": str(empty), "tls_key_file": key}, (CERT,)),
        "key-empty": ({"tls_cert_file": cert, "tls_key_file": str(empty)}, (KEY,)),
        "key-not-pem": ({"tls_cert_file": cert, "tls_key_file": str(garbage)}, (KEY,)),
        "cert-and-key-swapped": ({"tls_cert_file": key, "tls_key_file": cert}, (CERT, KEY)),
        "key-of-another-certificate": (
            {"tls_cert_file": cert, "tls_key_file": str(stranger_key)},
            (CERT, KEY),
        ),
        "key-behind-a-passphrase": ({"tls_cert_file": cert, "tls_key_file": str(own_locked)}, (KEY,)),
        "client-ca-is-a-key": (
            {"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": str(stranger_key)},
            (CLIENT_CA,),
        ),
        "client-ca-not-pem": (
            {"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": str(garbage)},
            (CLIENT_CA,),
        ),
        "client-ca-empty": (
            {"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": str(empty)},
            (CLIENT_CA,),
        ),
        "client-ca-missing": (
            {"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": str(folder / "nope.pem")},
            (CLIENT_CA,),
        ),
    }
    return cases[case]


TLS_CASES = [
    "key-of-a-type-grpc-does-not-serve",
    "key-is-a-fifo",
    "cert-missing",
    "cert-directory",
    "cert-not-pem",
    "cert-empty",
    "key-empty",
    "key-not-pem",
    "cert-and-key-swapped",
    "key-of-another-certificate",
    "key-behind-a-passphrase",
    "client-ca-is-a-key",
    "client-ca-not-pem",
    "client-ca-empty",
    "client-ca-missing",
]


@pytest.mark.parametrize("case", TLS_CASES)
async def test_a_tls_file_the_server_cannot_use_is_one_line_naming_it_and_exit_2(
    tmp_path: Path, certificates: Certificates, case: str
) -> None:
    """README: a missing, unreadable or non-PEM TLS file, or a certificate without its key, stops
    the start with one line naming the setting (exit 2), and nothing is created. A key that is not
    the certificate's, the two files swapped, a key the server cannot decrypt, or a client CA file
    holding no certificate leave the server unable to complete any handshake (or, for the CA, to
    accept any client): the same mistake, to be refused the same way, not found out by the first
    client."""
    folder = tmp_path / "run"
    folder.mkdir()
    variables, named = _tls_case(case, certificates, tmp_path)
    await _refuses_setting(_environment(folder, **variables), folder, named)


PEM_FORMS = ["ec-sec1-key", "rsa-pkcs1-key", "crlf-with-text-before-each-block"]


@pytest.mark.parametrize("form", PEM_FORMS)
async def test_tls_files_in_every_common_pem_form_serve(
    tmp_path: Path, certificates: Certificates, form: str
) -> None:
    """The PEM files operators have: an EC key as `openssl ecparam -genkey` writes it (`BEGIN EC
    PRIVATE KEY`), an RSA key as `openssl genrsa` and most CAs' tooling write it (`BEGIN RSA
    PRIVATE KEY`), and files saved on Windows (CRLF) with the text `openssl x509 -text` puts
    before the block. Each is a PEM certificate and key: `serve` starts over TLS and a client
    that trusts the CA completes a health check."""
    folder = tmp_path / "run"
    folder.mkdir()
    key: PrivateKey
    if form == "rsa-pkcs1-key":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    server = certificates.ca.issue(f"server-{form}", server=True, key=key)
    if form != "crlf-with-text-before-each-block":
        server.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    else:
        for path, text in (
            (server.cert, b"subject=CN = server\nissuer=CN = trusted test CA\n"),
            (server.key, b"Private-Key: (256 bit)\n"),
        ):
            path.write_bytes((text + path.read_bytes()).replace(b"\n", b"\r\n"))
    env = _environment(folder, tls_cert_file=str(server.cert), tls_key_file=str(server.key))
    async with _serve(env) as process:
        assert process.port is not None, "".join(process.stderr)[-3000:]
        async with grpc.aio.secure_channel(process.address, _credentials(certificates.ca.pem)) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


# -- TLS and mTLS handshakes ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _tls_server(
    backend: Backend, folder: Path, server: Pem, client_ca: Path | None = None
) -> AsyncIterator[Harness]:
    async with _own_server(
        backend,
        folder,
        tls_cert_file=str(server.cert),
        tls_key_file=str(server.key),
        tls_client_ca_file=str(client_ca) if client_ca else None,
    ) as harness:
        yield harness


@SQLITE_ONLY
async def test_mtls_refuses_client_certificates_out_of_date_misissued_or_impersonating_the_ca(
    backend: Backend, tmp_path: Path, certificates: Certificates
) -> None:
    """With AGENTPOST_TLS_CLIENT_CA_FILE, only client certificates the CA signed get in (SPEC §7),
    and only while they are valid: an expired certificate, one not valid yet, one signed with the
    key of a (non-CA) client certificate the CA issued, and a self-signed one bearing the CA's
    exact name must each fail the handshake (UNAVAILABLE, not a hang), while the CA's own client
    certificate keeps working."""
    ca = certificates.ca
    now = datetime.datetime.now(datetime.UTC)
    expired = ca.issue(
        "expired",
        server=False,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    future = ca.issue(
        "future",
        server=False,
        not_before=now + datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=30),
    )
    # A client certificate the CA really issued, whose key then signs a certificate of its own.
    leaf_issuer = Authority(tmp_path, "leaf-as-issuer", parent=ca, ca=False, subject="backend-leaf")
    chained = leaf_issuer.issue("chained", server=False, with_chain=True)
    # A stranger's self-signed CA named exactly as the trusted one.
    impostor_ca = Authority(tmp_path, "impostor", subject="trusted test CA")
    impostor = impostor_ca.issue("impostor-client", server=False)
    async with _tls_server(backend, tmp_path, certificates.server, ca.cert_file) as server:
        refused = {}
        for name, client in [
            ("expired", expired),
            ("not-yet-valid", future),
            ("signed-by-a-leaf", chained),
            ("impostor", impostor),
        ]:
            async with grpc.aio.secure_channel(server.address, _credentials(ca.pem, client)) as channel:
                refused[name] = await _handshake_refused(channel)
        assert refused == dict.fromkeys(refused, Code.UNAVAILABLE)
        async with grpc.aio.secure_channel(
            server.address, _credentials(ca.pem, certificates.client)
        ) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


@SQLITE_ONLY
async def test_mtls_refuses_a_certificate_issued_for_servers_only(
    backend: Backend, tmp_path: Path, certificates: Certificates
) -> None:
    """A certificate the trusted CA issued for server authentication only (extended key usage
    serverAuth) is not a client certificate: presented by a client it must fail the handshake,
    as Go's and Java's TLS servers refuse it, so that a server certificate of the platform (or
    its leaked key) does not double as a client credential."""
    server_only = certificates.ca.issue(
        "server-only-client", server=False, usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    credentials = _credentials(certificates.ca.pem, server_only)
    async with (
        _tls_server(backend, tmp_path, certificates.server, certificates.ca.cert_file) as server,
        grpc.aio.secure_channel(server.address, credentials) as channel,
    ):
        assert await _handshake_refused(channel) == Code.UNAVAILABLE


@SQLITE_ONLY
async def test_a_client_ca_bundle_trusts_each_of_its_cas_and_a_chain_is_served_whole(
    backend: Backend, tmp_path: Path, certificates: Certificates
) -> None:
    """README: AGENTPOST_TLS_CLIENT_CA_FILE holds "PEM CA certificates", and
    AGENTPOST_TLS_CERT_FILE a "PEM certificate chain". A server certificate issued by an
    intermediate CA, served with it, is trusted by clients that know only the root; client
    certificates of either CA of a two-CA bundle get in, a third CA's do not; health needs no
    credentials over mTLS either."""
    intermediate = Authority(tmp_path, "intermediate", parent=certificates.ca)
    server = intermediate.issue("chained-server", server=True, with_chain=True)
    second = Authority(tmp_path, "second")
    third = Authority(tmp_path, "third")
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(certificates.ca.pem + second.pem)
    from_second = second.issue("second-client", server=False)
    from_third = third.issue("third-client", server=False)
    async with _tls_server(backend, tmp_path, server, bundle) as running:
        root = certificates.ca.pem
        for client in (certificates.client, from_second):
            async with grpc.aio.secure_channel(running.address, _credentials(root, client)) as channel:
                assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
                created = await organization_pb2_grpc.OrganizationServiceStub(channel).CreateOrganization(
                    organization_pb2.CreateOrganizationRequest(
                        name="Bundle", owner_email=f"owner@{client.cert.stem}.example", owner_display_name="O"
                    ),
                    metadata=AS_OPERATOR,
                    timeout=HANG,
                )
                assert created.default_environment.slug == "default"
        async with grpc.aio.secure_channel(running.address, _credentials(root, from_third)) as channel:
            assert await _handshake_refused(channel) == Code.UNAVAILABLE


@SQLITE_ONLY
async def test_a_client_certificate_sent_with_its_intermediate_gets_in(
    backend: Backend, tmp_path: Path, certificates: Certificates
) -> None:
    """A client certificate issued by an intermediate CA under the trusted root, sent with that
    intermediate (as every PKI with an issuing CA hands them out), chains to the root in
    AGENTPOST_TLS_CLIENT_CA_FILE and gets in; the same certificate sent without its intermediate
    does not chain and is refused."""
    intermediate = Authority(tmp_path, "issuing", parent=certificates.ca)
    with_chain = intermediate.issue("issued-client", server=False, with_chain=True)
    alone = Pem(tmp_path / "issued-client-alone.pem", with_chain.key)
    alone.cert.write_bytes(
        with_chain.cert.read_bytes().split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    )
    root = certificates.ca.pem
    async with _tls_server(backend, tmp_path, certificates.server, certificates.ca.cert_file) as server:
        async with grpc.aio.secure_channel(server.address, _credentials(root, with_chain)) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.secure_channel(server.address, _credentials(root, alone)) as channel:
            assert await _handshake_refused(channel) == Code.UNAVAILABLE


async def _closed_by_server(port: int, data: bytes) -> bytes:
    """Sends `data` on a new TCP connection and reads until the server closes it (within HANG);
    returns what the server sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(HANG):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionResetError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return received


def _client_hello() -> bytes:
    """The first bytes of a TLS handshake, as any TLS client sends them."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@SQLITE_ONLY
async def test_a_tls_client_on_a_plaintext_port_fails_at_once_and_the_server_keeps_serving(
    backend: Backend, tmp_path: Path, certificates: Certificates
) -> None:
    """A client that speaks TLS to a plaintext server (a wrong URL scheme) fails with UNAVAILABLE
    within the hang limit, not DEADLINE_EXCEEDED after a stall; a raw TLS ClientHello on that
    port gets the connection closed; plaintext clients are served throughout."""
    async with _own_server(backend, tmp_path) as server:
        async with grpc.aio.secure_channel(server.address, _credentials(certificates.ca.pem)) as channel:
            assert await _handshake_refused(channel) == Code.UNAVAILABLE
        sent = await _closed_by_server(server.app.port, _client_hello())
        assert not sent.startswith(b"\x16\x03"), "a plaintext server answered a TLS handshake"
        assert await _health(server.channel) == health_pb2.HealthCheckResponse.SERVING


@SQLITE_ONLY
async def test_a_plaintext_client_on_a_tls_port_is_closed_not_held(
    backend: Backend, tmp_path: Path, certificates: Certificates
) -> None:
    """A plaintext HTTP/2 client (the preface, then a SETTINGS frame) on a TLS port has its
    connection closed within the hang limit, learning nothing but a TLS alert, and the server
    keeps serving TLS clients, with health and reflection callable without credentials."""
    async with _tls_server(backend, tmp_path, certificates.server) as server:
        sent = await _closed_by_server(server.app.port, HTTP2_PREFACE)
        assert b"grpc" not in sent.lower() and b"HTTP" not in sent
        async with grpc.aio.secure_channel(server.address, _credentials(certificates.ca.pem)) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert HEALTH_SERVICE in await _reflected_services(channel)


# -- reflection ------------------------------------------------------------------------------------


async def _reflected_services(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
) -> list[str]:
    """The services server reflection lists."""
    call = channel.stream_stream(
        REFLECTION_METHOD,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=HANG)
    services: list[str] = []
    async for answer in call:
        services.extend(service.name for service in answer.list_services_response.service)
    return services


# -- verifier tokens: settings --------------------------------------------------------------------

VERIFIER = "AGENTPOST_VERIFIER_TOKENS"


@pytest.mark.parametrize(
    "case", ["missing-file", "empty-file", "blank-lines-file", "directory", "at-sign-alone", "blank-entries"]
)
async def test_verifier_tokens_that_name_no_token_are_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    """AGENTPOST_VERIFIER_TOKENS is meant to close VerifyApiKey to everyone but the platform's
    backends. A value that names no token (`@` a file that does not exist, an empty file, one of
    blank lines, a folder, `@` alone, commas and blanks only) is a mistake the operator must hear
    of at the start: one line naming the variable and its flag, exit 2, nothing created; never a
    server whose VerifyApiKey is open, or closed to everyone, without a word."""
    folder = tmp_path / "run"
    folder.mkdir()
    empty = tmp_path / "empty-tokens"
    empty.write_bytes(b"")
    blank = tmp_path / "blank-tokens"
    blank.write_bytes(b"\n  \r\n\t\n")
    value = {
        "missing-file": f"@{tmp_path / 'no-such-file'}",
        "empty-file": f"@{empty}",
        "blank-lines-file": f"@{blank}",
        "directory": f"@{tmp_path}",
        "at-sign-alone": "@",
        "blank-entries": " , ,",
    }[case]
    await _refuses_setting(_environment(folder, verifier_tokens=value), folder, VERIFIER)


async def _verify(
    channel: grpc.aio.Channel,
    secret: str,
    metadata: tuple[tuple[str, str], ...],
    environment: str = "default",
    min_revision: int = 0,
) -> api_key_pb2.VerifyApiKeyResponse:
    """VerifyApiKey of `secret` in `environment` with `metadata`."""
    answer: api_key_pb2.VerifyApiKeyResponse = await api_key_pb2_grpc.ApiKeyServiceStub(channel).VerifyApiKey(
        api_key_pb2.VerifyApiKeyRequest(secret=secret, environment=environment, min_revision=min_revision),
        metadata=metadata,
        timeout=HANG,
    )
    return answer


@pytest.mark.parametrize(
    "form",
    [
        "file-with-crlf-blanks-and-padding",
        "file-with-a-byte-order-mark",
        "inline-with-padding-duplicates-and-an-empty-entry",
    ],
)
async def test_verifier_tokens_as_operators_write_them(tmp_path: Path, form: str) -> None:
    """The forms an operator writes: a token file saved on Windows (CRLF), with blank lines, a
    token padded with spaces and tabs, a duplicate; the same file as Windows PowerShell's
    `Set-Content -Encoding UTF8` writes it, after a UTF-8 byte order mark; or the comma list with
    spaces after commas, a duplicate and an empty entry. Each token, read without surrounding
    white space (as the operator token is), verifies; nothing else does: no `authorization`, an
    empty bearer token, a token in another case, a comma-joined pair, a token with a space
    inside. The tokens are never written to the log, even at DEBUG with the access log on."""
    folder = tmp_path / "run"
    folder.mkdir()
    if form.startswith("file"):
        token_file = tmp_path / "verifier-tokens"
        mark = b"\xef\xbb\xbf" if form == "file-with-a-byte-order-mark" else b""
        token_file.write_bytes(mark + b"token-one \r\n\r\n\ttoken-two\t\r\n  token-two\r\n   \r\n")
        value = f"@{token_file}"
    else:
        value = "token-one, token-two ,,token-one"
    env = _environment(folder, verifier_tokens=value, log_level="DEBUG", access_log="true")
    async with _serve(env) as process:
        assert process.port is not None, "".join(process.stderr)[-3000:]
        async with grpc.aio.insecure_channel(process.address) as channel:
            created = await organization_pb2_grpc.OrganizationServiceStub(channel).CreateOrganization(
                organization_pb2.CreateOrganizationRequest(
                    name="Tokens", owner_email="owner@tokens.example", owner_display_name="O"
                ),
                metadata=AS_OPERATOR,
                timeout=HANG,
            )
            secret = created.owner_api_key_secret
            for token in ("token-one", "token-two"):
                answer = await _verify(channel, secret, _bearer(token))
                assert answer.valid and answer.principal.organization_id == created.organization.id, token
            refused = {}
            for name, metadata in {
                "none": (),
                "empty": (("authorization", "Bearer "),),
                "upper-case": _bearer("TOKEN-ONE"),
                "comma-joined": _bearer("token-one,token-two"),
                "padded-inside": _bearer("token- one"),
            }.items():
                try:
                    await _verify(channel, secret, metadata)
                    refused[name] = "answered"
                except grpc.aio.AioRpcError as error:
                    failure = failure_of(error)
                    refused[name] = f"{failure.code.name} {failure.reason}"
            assert refused == dict.fromkeys(refused, "UNAUTHENTICATED VERIFIER_TOKEN_REQUIRED")
    said = "".join(process.stderr)
    assert "token-one" not in said and "token-two" not in said


@pytest.mark.parametrize(
    ("token", "sent"),
    [("two words", b"Bearer two words"), ("t\u00f6k\u00e9n", "Bearer t\u00f6k\u00e9n".encode())],
    ids=["inner-space", "non-ascii"],
)
async def test_a_verifier_token_no_client_can_present_is_refused_at_the_start(
    tmp_path: Path, token: str, sent: bytes
) -> None:
    """A configured verifier token must be one a backend can send as `authorization: Bearer
    <token>`. A token with a space inside cannot be one bearer token (the service refuses
    `Bearer a b` as junk after the token); a non-ASCII one cannot be sent by a gRPC client at all.
    Either the start refuses such a value (one line naming AGENTPOST_VERIFIER_TOKENS, exit 2, as
    it refuses a value naming no token), or the token, sent byte for byte over HTTP/2, verifies;
    never a server on which the backend given that token is locked out without a word."""
    folder = tmp_path / "run"
    folder.mkdir()
    env = _environment(folder, verifier_tokens=f"usable-token,{token}")
    async with _serve(env) as process:
        if process.port is None:
            said = "".join(process.stderr)
            assert process.code == 2 and len(process.lines) == 1, said[-3000:]
            assert VERIFIER in process.lines[0] and "--verifier-tokens" in process.lines[0]
            assert token not in said
            return
        async with grpc.aio.insecure_channel(process.address) as channel:
            created = await organization_pb2_grpc.OrganizationServiceStub(channel).CreateOrganization(
                organization_pb2.CreateOrganizationRequest(
                    name="Tokens", owner_email="owner@tokens.example", owner_display_name="O"
                ),
                metadata=AS_OPERATOR,
                timeout=HANG,
            )
            assert (await _verify(channel, created.owner_api_key_secret, _bearer("usable-token"))).valid
        request = api_key_pb2.VerifyApiKeyRequest(secret=created.owner_api_key_secret)
        answer = await raw_call(
            process.port, VERIFY_METHOD, [(b"authorization", sent)], request.SerializeToString()
        )
        assert (answer.status, answer.reason) == (0, ""), (
            f"the configured token {token!r} is refused ({answer.status} {answer.reason}) and the "
            "server started without a word"
        )
        assert api_key_pb2.VerifyApiKeyResponse.FromString(answer.data).valid


# -- verifier tokens: what a refusal says, and where a token is no credential ---------------------

TOKEN = "verifier-token-alpha"


@pytest.fixture
async def guarded(backend: Backend, tmp_path: Path) -> AsyncIterator[Harness]:
    """A server of its own whose VerifyApiKey needs TOKEN; no throttle."""
    async with _own_server(backend, tmp_path, verifier_tokens=TOKEN) as harness:
        yield harness


async def test_a_verify_refused_for_its_token_says_nothing_of_the_secret(guarded: Harness) -> None:
    """A caller without the verifier token learns nothing from VerifyApiKey (README: only the
    platform's backends may ask). Without a token, with a wrong one, or with an API key in its
    place, the refusal for a valid secret, a revoked one, an unknown one, a malformed one, an
    empty one, a valid one in an environment that does not exist, and one asked with a negative
    `min_revision` (which the right token gets INVALID_ARGUMENT for: the caller is authenticated
    before its request is judged) is the same in code, reason, message and ErrorInfo metadata;
    the right token then tells them apart."""
    org = await guarded.new_org()
    revoked_key, revoked = await guarded.new_key(org, ["environments:read"])
    await guarded.api_keys.RevokeApiKey(
        api_key_pb2.RevokeApiKeyRequest(id=revoked_key.id), metadata=auth(org.owner_secret)
    )
    secrets = {
        "valid": org.owner_secret,
        "revoked": revoked,
        "unknown": _unknown_secret(),
        "malformed": corrupt(org.owner_secret, -1),
        "empty": "",
    }
    seen: dict[tuple[str, str, str, str], list[str]] = {}
    odd_requests = {
        "no-such-environment": {"environment": "no-such-environment"},
        "negative-min-revision": {"min_revision": -1},
    }
    for credential_name, metadata in {
        "no token": (),
        "wrong token": _bearer("verifier-token-omega"),
        "an api key": auth(org.owner_secret),
    }.items():
        for secret_name, secret in secrets.items():
            failure = await fails(
                _verify(guarded.channel, secret, metadata), Code.UNAUTHENTICATED, "VERIFIER_TOKEN_REQUIRED"
            )
            shape = (
                failure.code.name,
                failure.reason,
                failure.message,
                repr(sorted(failure.metadata.items())),
            )
            seen.setdefault(shape, []).append(f"{credential_name}/{secret_name}")
        for request_name, fields in odd_requests.items():
            failure = await fails(
                _verify(guarded.channel, org.owner_secret, metadata, **fields),  # type: ignore[arg-type]
                Code.UNAUTHENTICATED,
                "VERIFIER_TOKEN_REQUIRED",
            )
            shape = (
                failure.code.name,
                failure.reason,
                failure.message,
                repr(sorted(failure.metadata.items())),
            )
            seen.setdefault(shape, []).append(f"{credential_name}/{request_name}")
    assert len(seen) == 1, seen
    await fails(
        _verify(guarded.channel, org.owner_secret, _bearer(TOKEN), min_revision=-1),
        Code.INVALID_ARGUMENT,
        "INVALID_MIN_REVISION",
    )
    unknown_environment = await _verify(
        guarded.channel, org.owner_secret, _bearer(TOKEN), "no-such-environment"
    )
    assert unknown_environment.denial_reason == Denial.ENVIRONMENT_NOT_FOUND
    verdicts = {
        name: (await _verify(guarded.channel, secret, _bearer(TOKEN))).denial_reason
        for name, secret in secrets.items()
    }
    assert verdicts == {
        "valid": Denial.DENIAL_REASON_UNSPECIFIED,
        "revoked": Denial.REVOKED,
        "unknown": Denial.NOT_FOUND,
        "malformed": Denial.MALFORMED,
        "empty": Denial.MALFORMED,
    }


@SQLITE_ONLY
async def test_a_verifier_token_is_no_credential_anywhere_else(guarded: Harness) -> None:
    """A verifier token lets a backend ask VerifyApiKey, nothing else: as the operator token on
    CreateOrganization it is UNAUTHENTICATED OPERATOR_TOKEN_INVALID; as an API key on a unary call
    and on the WatchEvents stream it is UNAUTHENTICATED (not a key); nothing was created."""
    org = await guarded.new_org()
    await fails(
        guarded.organizations.CreateOrganization(
            organization_pb2.CreateOrganizationRequest(name="Via token", owner_email="v@token.example"),
            metadata=_bearer(TOKEN),
        ),
        Code.UNAUTHENTICATED,
        "OPERATOR_TOKEN_INVALID",
    )
    await fails(
        guarded.organizations.GetOrganization(
            organization_pb2.GetOrganizationRequest(), metadata=_bearer(TOKEN)
        ),
        Code.UNAUTHENTICATED,
        "API_KEY_MALFORMED",
    )
    stream = event_pb2_grpc.EventServiceStub(guarded.channel).WatchEvents(
        event_pb2.WatchEventsRequest(after_revision=1), metadata=_bearer(TOKEN), timeout=HANG
    )

    async def first_message() -> object:
        async for message in stream:
            return message
        return None

    await fails(first_message(), Code.UNAUTHENTICATED, "API_KEY_MALFORMED")
    # The owner still sees one organization with one environment: nothing was made by the token.
    listed = await guarded.environments.ListEnvironments(LIST, metadata=auth(org.owner_secret))
    assert [env.slug for env in listed.environments] == ["default"]


# -- the throttle: its limit as a setting ---------------------------------------------------------


async def _count_until_throttled(address: str, at_most: int) -> int:
    """Sends refused credentials from this address until one is RESOURCE_EXHAUSTED (returns how
    many were UNAUTHENTICATED before it) or `at_most` were all UNAUTHENTICATED (returns at_most)."""
    async with grpc.aio.insecure_channel(address) as channel:
        environments = environment_pb2_grpc.EnvironmentServiceStub(channel)
        for sent in range(at_most):
            try:
                await environments.ListEnvironments(LIST, metadata=auth(_unknown_secret()), timeout=HANG)
            except grpc.aio.AioRpcError as error:
                failure = failure_of(error)
                if (failure.code, failure.reason) == (Code.RESOURCE_EXHAUSTED, "TOO_MANY_AUTH_FAILURES"):
                    return sent
                assert (failure.code, failure.reason) == (Code.UNAUTHENTICATED, "API_KEY_NOT_FOUND"), failure
                continue
            raise AssertionError("a made-up key was served")
    return at_most


@pytest.mark.parametrize(
    ("value", "allowed"),
    [(None, 120), ("1", 1), ("0", 300), ("100000000000000000000000000000", 300)],
    ids=["default", "one", "zero-is-off", "huge"],
)
async def test_the_limit_setting_means_what_it_says(tmp_path: Path, value: str | None, allowed: int) -> None:
    """AGENTPOST_AUTH_FAILURES_PER_MINUTE as a real process reads it: unset, exactly 120 refused
    credentials are UNAUTHENTICATED and the 121st is RESOURCE_EXHAUSTED; 1 allows one; 0 is off
    (300, far past the default, are all UNAUTHENTICATED); a limit beyond any 64-bit integer is
    either refused as a setting (exit 2, one line) or served as no practical limit, never a crash
    on the first refusal."""
    folder = tmp_path / "run"
    folder.mkdir()
    env = _environment(folder) if value is None else _environment(folder, auth_failures_per_minute=value)
    async with _serve(env) as process:
        if process.port is None:
            said = "".join(process.stderr)
            assert value is not None and value.startswith("1000"), said[-3000:]
            assert process.code == 2 and len(process.lines) == 1, said[-3000:]
            assert "AGENTPOST_AUTH_FAILURES_PER_MINUTE" in process.lines[0]
            return
        assert await _count_until_throttled(process.address, allowed + 1 if allowed < 300 else 300) == allowed
        assert "Traceback" not in "".join(process.stderr)


# -- the throttle: one peer, many connections; other peers ----------------------------------------


async def _raw_refusal(port: int, source: str, target: str = "127.0.0.1") -> tuple[int | None, str]:
    """ListEnvironments with a made-up key over plain HTTP/2 from the local address `source`:
    (grpc-status, ErrorInfo reason)."""
    answer = await raw_call(
        port,
        LIST_METHOD,
        [(b"authorization", f"Bearer {_unknown_secret()}".encode())],
        source=source,
        target=target,
    )
    return answer.status, answer.reason


LIMIT = 4


@SQLITE_ONLY
async def test_one_address_is_one_peer_across_connections_and_other_addresses_are_apart(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The throttle counts a peer address, not a connection (README: the IP): LIMIT refusals each
    on a new channel, then the next on yet another channel and on raw HTTP/2 connections are
    RESOURCE_EXHAUSTED. Another loopback address (127.0.0.2) is another peer: it still gets
    UNAUTHENTICATED for its first LIMIT refusals. Many connections from one address add no
    state: 30 more connections from it and the throttle still knows two addresses, and logs one
    refusal line per address."""
    caplog.set_level(logging.DEBUG, logger="service")
    async with _own_server(backend, tmp_path, auth_failures_per_minute=LIMIT) as server:
        for _ in range(LIMIT):
            async with grpc.aio.insecure_channel(server.address) as channel:
                await _refused_key(channel, Code.UNAUTHENTICATED, "API_KEY_NOT_FOUND")
        async with grpc.aio.insecure_channel(server.address) as channel:
            failure = await _refused_key(channel, Code.RESOURCE_EXHAUSTED, "TOO_MANY_AUTH_FAILURES")
            assert 0 < _retry_delay(failure) <= 60
        for _ in range(30):
            assert await _raw_refusal(server.app.port, "127.0.0.1") == (
                RESOURCE_EXHAUSTED_STATUS,
                "TOO_MANY_AUTH_FAILURES",
            )
        other = [await _raw_refusal(server.app.port, "127.0.0.2") for _ in range(LIMIT + 1)]
        assert other == [(UNAUTHENTICATED_STATUS, "API_KEY_NOT_FOUND")] * LIMIT + [
            (RESOURCE_EXHAUSTED_STATUS, "TOO_MANY_AUTH_FAILURES")
        ]
        assert len(server.app.throttle) == 2
    refused = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("refused credentials from")
    ]
    assert sorted(line.split()[3].rstrip(":") for line in refused) == ["127.0.0.1", "127.0.0.2"], refused


@SQLITE_ONLY
async def test_forwarding_headers_do_not_make_one_peer_many(backend: Backend, tmp_path: Path) -> None:
    """The throttle counts the connection's address (README: the IP), not what a client writes
    about itself: refused credentials each sent with another `x-forwarded-for`, `x-real-ip` and
    `forwarded` naming a new address still come from one peer, and after LIMIT of them the next
    is RESOURCE_EXHAUSTED, whatever address it claims."""
    async with _own_server(backend, tmp_path, auth_failures_per_minute=LIMIT) as server:

        def claimed(number: int) -> tuple[tuple[str, str], ...]:
            address = f"198.51.100.{number}"
            return (
                *auth(_unknown_secret()),
                ("x-forwarded-for", address),
                ("x-real-ip", address),
                ("forwarded", f"for={address}"),
            )

        for number in range(LIMIT):
            await fails(
                server.environments.ListEnvironments(LIST, metadata=claimed(number), timeout=HANG),
                Code.UNAUTHENTICATED,
                "API_KEY_NOT_FOUND",
            )
        await fails(
            server.environments.ListEnvironments(LIST, metadata=claimed(99), timeout=HANG),
            Code.RESOURCE_EXHAUSTED,
            "TOO_MANY_AUTH_FAILURES",
        )


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@SQLITE_ONLY
async def test_a_dual_stack_listener_keeps_ipv4_peers_apart(backend: Backend, tmp_path: Path) -> None:
    """Listening on `[::]:PORT` (every address, IPv4 and IPv6) is how a server in a container is
    usually configured; IPv4 clients then reach it through an IPv6 socket. Each IPv4 address is
    still a peer of its own: 127.0.0.2 throttled leaves 127.0.0.1 and ::1 unthrottled (grouping
    IPv4-mapped addresses by their IPv6 /64 would make every IPv4 client on the internet one
    peer, so that one attacker throttles all of them)."""
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    async with _own_server(
        backend, tmp_path, auth_failures_per_minute=LIMIT, listen_address="[::]:0"
    ) as server:
        answers = [await _raw_refusal(server.app.port, "127.0.0.2") for _ in range(LIMIT + 1)]
        assert answers[-1] == (RESOURCE_EXHAUSTED_STATUS, "TOO_MANY_AUTH_FAILURES"), answers
        assert await _raw_refusal(server.app.port, "127.0.0.1") == (
            UNAUTHENTICATED_STATUS,
            "API_KEY_NOT_FOUND",
        )
        assert await _raw_refusal(server.app.port, "::1", "::1") == (
            UNAUTHENTICATED_STATUS,
            "API_KEY_NOT_FOUND",
        )


# -- the throttle: what it never touches, and what it never counts --------------------------------


@SQLITE_ONLY
async def test_health_and_reflection_need_no_credentials_are_never_counted_nor_throttled(
    backend: Backend, tmp_path: Path
) -> None:
    """SPEC §2: health and reflection are callable without credentials. Called many times with a
    garbage `authorization` they answer and count nothing (the peer's next refused credential is
    still UNAUTHENTICATED); once the peer is throttled, health Check, health Watch and reflection
    still answer, with and without a garbage `authorization`."""
    async with _own_server(backend, tmp_path, auth_failures_per_minute=LIMIT) as server:
        junk = _bearer("junk")
        for _ in range(3 * LIMIT):
            assert await _health(server.channel, junk) == health_pb2.HealthCheckResponse.SERVING
            assert HEALTH_SERVICE in await _reflected_services(server.channel, junk)
        await _exhaust(server, LIMIT)
        for metadata in ((), junk, auth(_unknown_secret())):
            assert await _health(server.channel, metadata) == health_pb2.HealthCheckResponse.SERVING
            assert HEALTH_SERVICE in await _reflected_services(server.channel, metadata)
            watch = server.health.Watch(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=HANG)
            async for answer in watch:
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                break
            watch.cancel()


@SQLITE_ONLY
async def test_refusals_that_are_not_about_credentials_are_never_counted(
    backend: Backend, tmp_path: Path
) -> None:
    """SPEC §7 throttles refused credentials. A valid key refused for what it may do
    (PERMISSION_DENIED: a missing scope, an organization-level call by an environment key), a bad
    argument (INVALID_ARGUMENT) and an unknown method are answers to a known caller: many of each
    leave the peer unthrottled. Refused credentials of every kind count together: a wrong
    verifier token, an unknown key and a wrong operator token make up the limit, and the next
    refusal of any kind is RESOURCE_EXHAUSTED."""
    async with _own_server(
        backend, tmp_path, auth_failures_per_minute=LIMIT, verifier_tokens=TOKEN
    ) as server:
        org = await server.new_org()
        _, narrow = await server.new_key(org, ["inboxes:read"], [org.default_environment.id])
        for _ in range(3 * LIMIT):
            await fails(
                server.environments.ListEnvironments(LIST, metadata=auth(narrow)), Code.PERMISSION_DENIED
            )
            await fails(
                server.environments.CreateEnvironment(
                    environment_pb2.CreateEnvironmentRequest(name="Nope"), metadata=auth(narrow)
                ),
                Code.PERMISSION_DENIED,
            )
            await fails(
                server.environments.ListEnvironments(
                    environment_pb2.ListEnvironmentsRequest(page_size=-1), metadata=auth(org.owner_secret)
                ),
                Code.INVALID_ARGUMENT,
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await server.channel.unary_unary("/agentpost.environments.v1.EnvironmentService/Nope")(
                    b"", metadata=auth(_unknown_secret()), timeout=HANG
                )
            assert raised.value.code() == Code.UNIMPLEMENTED
        await fails(
            _verify(server.channel, org.owner_secret, _bearer("wrong")),
            Code.UNAUTHENTICATED,
            "VERIFIER_TOKEN_REQUIRED",
        )
        await fails(
            _verify(server.channel, org.owner_secret, ()), Code.UNAUTHENTICATED, "VERIFIER_TOKEN_REQUIRED"
        )
        await _refused_key(server, Code.UNAUTHENTICATED, "API_KEY_NOT_FOUND")
        await fails(
            server.organizations.CreateOrganization(
                organization_pb2.CreateOrganizationRequest(name="Guess", owner_email="g@guess.example"),
                metadata=_bearer("guess"),
            ),
            Code.UNAUTHENTICATED,
            "OPERATOR_TOKEN_INVALID",
        )
        await fails(
            _verify(server.channel, org.owner_secret, ()), Code.RESOURCE_EXHAUSTED, "TOO_MANY_AUTH_FAILURES"
        )
        # The valid key and the right verifier token still work.
        assert (await _verify(server.channel, org.owner_secret, _bearer(TOKEN))).valid
        listed = await server.environments.ListEnvironments(LIST, metadata=auth(org.owner_secret))
        assert [env.slug for env in listed.environments] == ["default"]


async def _first_watch_message(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> event_pb2.WatchEventsResponse:
    stream = event_pb2_grpc.EventServiceStub(channel).WatchEvents(
        event_pb2.WatchEventsRequest(after_revision=1), metadata=metadata, timeout=HANG
    )
    try:
        async for message in stream:
            return message
    finally:
        stream.cancel()
    raise AssertionError("the stream ended without a message")


async def test_streams_count_and_are_throttled_and_revoked_keys_learn_nothing_more(
    backend: Backend, tmp_path: Path
) -> None:
    """WatchEvents with refused credentials counts like any call: an unknown key and a revoked
    key on the stream (UNAUTHENTICATED) and unknown keys on unary calls make up the limit; then a
    stream with an unknown key, with the revoked key and with a malformed one is
    RESOURCE_EXHAUSTED TOO_MANY_AUTH_FAILURES with a RetryInfo (the throttled answer says nothing
    of which of them exists), while the owner's stream opens and delivers."""
    async with _own_server(backend, tmp_path, auth_failures_per_minute=LIMIT) as server:
        org = await server.new_org()
        revoked_key, revoked = await server.new_key(org, ["events:read"])
        await server.api_keys.RevokeApiKey(
            api_key_pb2.RevokeApiKeyRequest(id=revoked_key.id), metadata=auth(org.owner_secret)
        )
        await fails(
            _first_watch_message(server.channel, auth(_unknown_secret())),
            Code.UNAUTHENTICATED,
            "API_KEY_NOT_FOUND",
        )
        await fails(
            _first_watch_message(server.channel, auth(revoked)), Code.UNAUTHENTICATED, "API_KEY_REVOKED"
        )
        for _ in range(LIMIT - 2):
            await _refused_key(server, Code.UNAUTHENTICATED, "API_KEY_NOT_FOUND")
        throttled = {}
        for name, secret in {
            "unknown": _unknown_secret(),
            "revoked": revoked,
            "malformed": "ap_sk_live_nope",
        }.items():
            failure = await fails(
                _first_watch_message(server.channel, auth(secret)),
                Code.RESOURCE_EXHAUSTED,
                "TOO_MANY_AUTH_FAILURES",
            )
            assert 0 < _retry_delay(failure) <= 60
            throttled[name] = (failure.message, sorted(failure.metadata))
        assert len(set(map(repr, throttled.values()))) == 1, throttled
        message = await _first_watch_message(server.channel, auth(org.owner_secret))
        assert message.revision >= 1


# -- the throttle and VerifyApiKey from a throttled address ---------------------------------------


@contextlib.asynccontextmanager
async def _two_replicas(
    backend: Backend, folder: Path, **settings: object
) -> AsyncIterator[tuple[Harness, Harness]]:
    """A throttled server with `settings` and another replica on the same database (no throttle)."""
    async with (
        empty_database(backend, folder) as database,
        serving(database, **settings) as throttled,
        serving(database) as other,
    ):
        yield throttled, other


@pytest.mark.parametrize("guarded_verify", [True, False], ids=["with-verifier-token", "open-verify"])
async def test_a_throttled_backend_still_gets_true_verify_answers(
    backend: Backend, tmp_path: Path, guarded_verify: bool
) -> None:
    """A backend sharing its address with an attacker (a NAT, a node's egress) is throttled by the
    attacker's refused credentials. Its VerifyApiKey calls authenticate with the verifier token
    (or need none), and SPEC §7 says VerifyApiKey answers are not counted: they must stay true
    answers. A valid key made on another replica and never seen here verifies valid (not
    NOT_FOUND, which would log real users out); an unknown one is a NOT_FOUND answer, not an
    error."""
    settings: dict[str, object] = {"auth_failures_per_minute": LIMIT}
    if guarded_verify:
        settings["verifier_tokens"] = TOKEN
    metadata = _bearer(TOKEN) if guarded_verify else ()
    async with _two_replicas(backend, tmp_path, **settings) as (throttled, other):
        org = await other.new_org()
        await _exhaust(throttled, LIMIT)
        answer = await _verify(throttled.channel, org.owner_secret, metadata)
        assert (answer.valid, answer.denial_reason, answer.principal.organization_id) == (
            True,
            Denial.DENIAL_REASON_UNSPECIFIED,
            org.id,
        )
        unknown = await _verify(throttled.channel, _unknown_secret(), metadata)
        assert (unknown.valid, unknown.denial_reason) == (False, Denial.NOT_FOUND)


async def test_a_valid_key_made_on_another_replica_works_from_a_throttled_address(
    backend: Backend, tmp_path: Path
) -> None:
    """SPEC §7: "Valid keys from the same peer are unaffected." A key made on another replica
    (or on another worker of the same `serve --workers N`) and used for the first time on this
    one, from an address this one throttles, must be served, as a key made here is. (README
    documents the opposite, refusing it until the window passes, which the contract does not
    allow: a customer behind the same NAT as an attacker is locked out for a minute per
    replica.)"""
    async with _two_replicas(backend, tmp_path, auth_failures_per_minute=LIMIT) as (throttled, other):
        org = await other.new_org()
        await _exhaust(throttled, LIMIT)
        listed = await throttled.environments.ListEnvironments(
            LIST, metadata=auth(org.owner_secret), timeout=HANG
        )
        assert [env.slug for env in listed.environments] == ["default"]
