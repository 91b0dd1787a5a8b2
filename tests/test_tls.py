"""TLS and mTLS (SPEC §7): certificates are made at run time; the real server serves them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import (
    environment_pb2,
    environment_pb2_grpc,
    organization_pb2,
    organization_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from service.app.config import Settings
from service.app.server import Application
from tests.buf import BUF
from tests.certificates import Authority, Pem
from tests.empty_database import empty_database
from tests.harness import OPERATOR_TOKEN, auth
from tests.servers import Backend


@dataclass
class Certificates:
    """A CA with a server and a client certificate, and a second CA with a client certificate."""

    ca: Authority
    server: Pem
    client: Pem
    stranger_ca: Authority
    stranger: Pem


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("tls")
    ca = Authority(folder, "agentpost")
    stranger_ca = Authority(folder, "stranger")
    return Certificates(
        ca=ca,
        server=ca.issue("server", server=True),
        client=ca.issue("backend", server=False),
        stranger_ca=stranger_ca,
        stranger=stranger_ca.issue("backend", server=False),
    )


@dataclass
class TlsServer:
    """A started server over TLS and where it listens."""

    app: Application
    address: str


async def _tls_server(
    backend: Backend, folder: Path, certificates: Certificates, mutual: bool
) -> AsyncIterator[TlsServer]:
    # A database of its own: other tests' servers come and go on the shared one.
    async with empty_database(backend, folder) as database:
        async for server in _started(database, certificates, mutual):
            yield server


async def _started(database: Backend, certificates: Certificates, mutual: bool) -> AsyncIterator[TlsServer]:
    app = Application(
        database.settings(
            tls_cert_file=str(certificates.server.cert),
            tls_key_file=str(certificates.server.key),
            tls_client_ca_file=str(certificates.ca.cert_file) if mutual else None,
        )
    )
    await app.migrate()
    await app.start()
    try:
        yield TlsServer(app, f"127.0.0.1:{app.port}")
    finally:
        await app.stop(grace=0)


@pytest.fixture
async def tls_server(
    backend: Backend, tmp_path: Path, certificates: Certificates
) -> AsyncIterator[TlsServer]:
    async for server in _tls_server(backend, tmp_path, certificates, mutual=False):
        yield server


@pytest.fixture
async def mtls_server(
    backend: Backend, tmp_path: Path, certificates: Certificates
) -> AsyncIterator[TlsServer]:
    async for server in _tls_server(backend, tmp_path, certificates, mutual=True):
        yield server


def _credentials(ca: Authority, client: Pem | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.pem)
    cert, key = client.read()
    return grpc.ssl_channel_credentials(root_certificates=ca.pem, private_key=key, certificate_chain=cert)


async def _new_owner_secret(channel: grpc.aio.Channel) -> str:
    created = await organization_pb2_grpc.OrganizationServiceStub(channel).CreateOrganization(
        organization_pb2.CreateOrganizationRequest(
            name="Over TLS", owner_email="owner@tls.example", owner_display_name="Owner"
        ),
        metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),),
    )
    return str(created.owner_api_key_secret)


async def _list_environments(channel: grpc.aio.Channel, secret: str) -> list[str]:
    listed = await environment_pb2_grpc.EnvironmentServiceStub(channel).ListEnvironments(
        environment_pb2.ListEnvironmentsRequest(), metadata=auth(secret), timeout=10
    )
    return [env.slug for env in listed.environments]


async def _refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The code of a health check that must not get through the handshake."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return raised.value.code()


async def test_a_tls_client_works_and_a_plaintext_one_is_refused(
    tls_server: TlsServer, certificates: Certificates
) -> None:
    async with grpc.aio.secure_channel(tls_server.address, _credentials(certificates.ca)) as channel:
        secret = await _new_owner_secret(channel)
        assert await _list_environments(channel, secret) == ["default"]

    async with grpc.aio.insecure_channel(tls_server.address) as plaintext:
        assert await _refused(plaintext) == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the server's CA does not get through either.
    async with grpc.aio.secure_channel(tls_server.address, _credentials(certificates.stranger_ca)) as wrong:
        assert await _refused(wrong) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_clients_without_a_certificate_or_with_another_cas(
    mtls_server: TlsServer, certificates: Certificates
) -> None:
    trusted = _credentials(certificates.ca, certificates.client)
    async with grpc.aio.secure_channel(mtls_server.address, trusted) as channel:
        secret = await _new_owner_secret(channel)
        assert await _list_environments(channel, secret) == ["default"]

    async with grpc.aio.secure_channel(mtls_server.address, _credentials(certificates.ca)) as anonymous:
        assert await _refused(anonymous) == grpc.StatusCode.UNAVAILABLE
    foreign = _credentials(certificates.ca, certificates.stranger)
    async with grpc.aio.secure_channel(mtls_server.address, foreign) as channel:
        assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(mtls_server.address) as plaintext:
        assert await _refused(plaintext) == grpc.StatusCode.UNAVAILABLE


async def _buf_curl(address: str, secret: str, *tls_options: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        BUF,
        "curl",
        "--protocol",
        "grpc",
        *tls_options,
        "-H",
        f"authorization: Bearer {secret}",
        f"https://{address}/agentpost.environments.v1.EnvironmentService/ListEnvironments",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    return process.returncode or 0, (stdout or stderr).decode()


async def test_buf_curl_over_tls(tls_server: TlsServer, certificates: Certificates) -> None:
    async with grpc.aio.secure_channel(tls_server.address, _credentials(certificates.ca)) as channel:
        secret = await _new_owner_secret(channel)
    code, output = await _buf_curl(tls_server.address, secret, "--cacert", str(certificates.ca.cert_file))
    assert code == 0, output
    assert [env["slug"] for env in json.loads(output)["environments"]] == ["default"]
    # Without the CA, buf refuses the server's certificate.
    code, output = await _buf_curl(tls_server.address, secret)
    assert code != 0 and '"slug"' not in output


async def test_buf_curl_over_mtls(mtls_server: TlsServer, certificates: Certificates) -> None:
    trusted = _credentials(certificates.ca, certificates.client)
    async with grpc.aio.secure_channel(mtls_server.address, trusted) as channel:
        secret = await _new_owner_secret(channel)
    ca = ("--cacert", str(certificates.ca.cert_file))
    client = ("--cert", str(certificates.client.cert), "--key", str(certificates.client.key))
    code, output = await _buf_curl(mtls_server.address, secret, *ca, *client)
    assert code == 0, output
    assert [env["slug"] for env in json.loads(output)["environments"]] == ["default"]
    # Without a client certificate the handshake fails.
    code, output = await _buf_curl(mtls_server.address, secret, *ca)
    assert code != 0 and '"slug"' not in output


def test_a_certificate_without_its_key_is_refused_naming_the_missing_setting(
    certificates: Certificates,
) -> None:
    with pytest.raises(
        ValidationError, match="AGENTPOST_TLS_KEY_FILE is required with AGENTPOST_TLS_CERT_FILE"
    ):
        Settings(tls_cert_file=str(certificates.server.cert))  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="AGENTPOST_TLS_CLIENT_CA_FILE needs AGENTPOST_TLS_CERT_FILE"):
        Settings(tls_client_ca_file=str(certificates.ca.cert_file))  # type: ignore[call-arg]
