"""Credentials rotated under a running server, as the rotation tests do it: files replaced the way
rotation tools replace them, the certificate a new TLS connection gets, health over new channels,
the exported metrics, and a server with TLS settings of the test's choosing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.app.server import Application
from tests.certificates import Authority, Pem
from tests.harness import OPERATOR_TOKEN, Harness
from tests.own_database import own_database
from tests.servers import Backend, free_port, service_process, start_server, stop_process

# Longer than the server's look at the files (once a second), with room for a loaded machine.
TAKEN_UP_WITHIN = 10.0
CREDENTIALS = "service.app.credentials"  # the logger that tells of rotations


def replace(target: Path, content: bytes) -> None:
    """Writes `content` as `target` the way rotation tools do: a new file renamed over it."""
    fresh = target.with_name(target.name + ".new")
    fresh.write_bytes(content)
    os.replace(fresh, target)


def install(source: Pem, target: Pem) -> None:
    """Puts `source`'s certificate and key in `target`'s files (key first, then certificate)."""
    replace(target.key, source.key.read_bytes())
    replace(target.cert, source.cert.read_bytes())


def served_subject(port: int, ca: Authority, client: Pem | None = None) -> str:
    """The common name of the certificate a new TLS connection gets (HTTP/2, as gRPC speaks)."""
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        certificate = connection.getpeercert(binary_form=True)
    assert certificate is not None
    names = x509.load_der_x509_certificate(certificate).subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME
    )
    return str(names[0].value)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Polls `check` until it holds; fails naming `what` once TAKEN_UP_WITHIN has passed."""
    deadline = asyncio.get_running_loop().time() + TAKEN_UP_WITHIN
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"not within {TAKEN_UP_WITHIN} s: {what}"
        await asyncio.sleep(0.1)


async def subject_becomes(port: int, ca: Authority, subject: str, client: Pem | None = None) -> None:
    """Waits until new connections get the certificate named `subject`."""

    async def check() -> bool:
        return await asyncio.to_thread(served_subject, port, ca, client) == subject

    await eventually(check, f"new connections get {subject}")


async def healthy(port: int, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    """The code of a health check over a new channel with these credentials."""
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def channel_credentials(ca: Authority, client: Pem | None = None) -> grpc.ChannelCredentials:
    """Credentials trusting `ca`, presenting `client`'s certificate when one is given."""
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.pem)
    cert, key = client.read()
    return grpc.ssl_channel_credentials(root_certificates=ca.pem, private_key=key, certificate_chain=cert)


def metrics(app: Application) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample the server's metrics endpoint exports, by name and labels."""
    assert app.metrics is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@contextlib.asynccontextmanager
async def server(backend: Backend, folder: Path, **settings: object) -> AsyncIterator[Application]:
    """An in-process server on a database of its own, exporting metrics, with these settings."""
    app, channel = await start_server(
        own_database(backend, folder), metrics_address="127.0.0.1:0", **settings
    )
    await channel.close()  # plaintext; each test makes the channels it needs
    try:
        yield app
    finally:
        await app.stop(grace=0)


@contextlib.asynccontextmanager
async def served(backend: Backend, folder: Path, **settings: object) -> AsyncIterator[Harness]:
    """An in-process server on a database of its own, with these settings, and a plaintext
    harness to call it."""
    app, channel = await start_server(own_database(backend, folder), **settings)
    try:
        yield Harness(app, channel, backend.name)
    finally:
        await channel.close()
        await app.stop(grace=0)


@dataclass(frozen=True)
class MutualTls:
    """An mTLS set-up whose client CA is to be rotated: the server's CA, the old and the new
    client CA, the file the server reads its client CAs from (the old CA at first), and channel
    credentials of a client of each CA."""

    server_ca: Authority
    old_ca: Authority
    new_ca: Authority
    client_ca: Path
    old_client: grpc.ChannelCredentials
    new_client: grpc.ChannelCredentials


@contextlib.asynccontextmanager
async def mutual_tls_server(backend: Backend, folder: Path) -> AsyncIterator[tuple[Application, MutualTls]]:
    """`server` serving mTLS as `MutualTls` describes."""
    server_ca = Authority(folder, "servers")
    old_ca = Authority(folder, "old-clients")
    new_ca = Authority(folder, "new-clients")
    served = server_ca.issue("server", server=True)
    tls = MutualTls(
        server_ca,
        old_ca,
        new_ca,
        folder / "client-ca.pem",
        channel_credentials(server_ca, old_ca.issue("backend-old", server=False)),
        channel_credentials(server_ca, new_ca.issue("backend-new", server=False)),
    )
    replace(tls.client_ca, old_ca.pem)
    async with server(
        backend,
        folder,
        tls_cert_file=str(served.cert),
        tls_key_file=str(served.key),
        tls_client_ca_file=str(tls.client_ca),
    ) as app:
        yield app, tls


@dataclass
class Process:
    """`python -m service serve` as a process of its own."""

    process: asyncio.subprocess.Process
    port: int
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


@contextlib.asynccontextmanager
async def serve_process(backend: Backend, folder: Path, **variables: str) -> AsyncIterator[Process]:
    """A migrated server process on a database of its own (SQLite) or the run's schema, with the
    given AGENTPOST_* variables; killed at the end if it does not stop."""
    database = own_database(backend, folder / f"db-{uuid.uuid4().hex[:6]}")
    port = free_port()
    environment = database.environment(
        {
            "AGENTPOST_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "AGENTPOST_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "AGENTPOST_SHUTDOWN_DRAIN_SECONDS": "0",
            "AGENTPOST_SHUTDOWN_GRACE_SECONDS": "1",
            "AGENTPOST_AUTH_FAILURES_PER_MINUTE": "0",
            **variables,
        }
    )
    stderr = folder / f"server-{uuid.uuid4().hex[:6]}.log"
    with stderr.open("wb") as errors:
        process = await service_process(
            "serve", "--migrate", env=environment, stdout=asyncio.subprocess.DEVNULL, stderr=errors.fileno()
        )
    served = Process(process, port, stderr)
    try:
        async with asyncio.timeout(60):
            while f"serving on 127.0.0.1:{port}" not in served.log():
                assert process.returncode is None, served.log()
                await asyncio.sleep(0.1)
        yield served
    finally:
        await stop_process(process, 10)


def publish(secret: Path, files: dict[str, bytes], version: str) -> Path:
    """What the kubelet does for a mounted secret: the files in a new timestamped folder, then a
    new `..data` symlink renamed over the old one. Returns the new folder."""
    folder = secret / f"..{version}"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    fresh = secret / "..data_tmp"
    os.symlink(folder.name, fresh)
    os.replace(fresh, secret / "..data")
    return folder


def fifo_over(target: Path) -> Path:
    """Puts a FIFO where `target` was (a rename, as rotation tools do); returns another name of
    that FIFO, through which a reader stuck on it can be released."""
    pipe = target.with_name(target.name + ".pipe")
    os.mkfifo(pipe)
    alias = target.with_name(target.name + ".fifo")
    os.link(pipe, alias)
    os.replace(alias, target)
    return pipe
