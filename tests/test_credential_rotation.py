"""Credentials rotated while the server runs (README, "Rotating credentials"): new TLS files, a new
client CA and a new verifier-token file are taken up without a restart; files that cannot be
used leave the previous credentials in place, with a warning; a certificate's expiry is logged
and exported. Real servers, real handshakes: the certificate a new connection gets is read from
the handshake itself."""

from __future__ import annotations

import asyncio
import datetime
import logging
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app.server import Application, BindError
from tests import rotation
from tests.certificates import Authority, Pem
from tests.harness import fails
from tests.own_database import own_database
from tests.servers import Backend

Code = grpc.StatusCode


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


async def test_new_connections_get_rotated_files_and_open_ones_keep_working(
    backend: Backend, folder: Path
) -> None:
    """The served files are replaced by another certificate and key: within seconds every new
    connection gets the new certificate, a channel opened before keeps serving calls, and the
    exported expiry is the new certificate's."""
    ca = Authority(folder, "rotation")
    first = ca.issue("first", server=True)
    second = ca.issue(
        "second", server=True, not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    )
    served = Pem(folder / "served.pem", folder / "served-key.pem")
    rotation.install(first, served)
    async with rotation.server(
        backend, folder, tls_cert_file=str(served.cert), tls_key_file=str(served.key)
    ) as app:
        assert await asyncio.to_thread(rotation.served_subject, app.port, ca) == "first"
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{app.port}", rotation.channel_credentials(ca)
        ) as before:
            health = health_pb2_grpc.HealthStub(before)
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            rotation.install(second, served)
            await rotation.subject_becomes(app.port, ca, "second")
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert await rotation.healthy(app.port, rotation.channel_credentials(ca)) == Code.OK
        samples = await asyncio.to_thread(rotation.metrics, app)
        expiry = x509.load_pem_x509_certificate(second.cert.read_bytes()).not_valid_after_utc.timestamp()
        assert samples[("agentpost_tls_certificate_expiry_timestamp_seconds", frozenset())] == expiry
        assert samples[("agentpost_tls_reloads_total", frozenset({("outcome", "loaded")}))] >= 1


@pytest.mark.parametrize(
    "broken",
    ["a certificate without its key", "a file that is not PEM", "a deleted certificate", "an empty key file"],
)
async def test_files_that_cannot_be_used_leave_the_previous_certificate_serving(
    backend: Backend, folder: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The files are changed into something that cannot serve TLS: new connections keep getting
    the previous certificate (the handshake succeeds), one warning says why, and the refusal is
    counted; once usable files are written, they are taken up."""
    ca = Authority(folder, "broken")
    first = ca.issue("first", server=True)
    second = ca.issue("second", server=True)
    served = Pem(folder / "served.pem", folder / "served-key.pem")
    rotation.install(first, served)
    async with rotation.server(
        backend, folder, tls_cert_file=str(served.cert), tls_key_file=str(served.key)
    ) as app:
        with caplog.at_level(logging.WARNING, logger=rotation.CREDENTIALS):
            if broken == "a certificate without its key":
                rotation.replace(served.cert, second.cert.read_bytes())
            elif broken == "a file that is not PEM":
                rotation.replace(served.cert, b"not a certificate\n")
            elif broken == "a deleted certificate":
                served.cert.unlink()
            else:
                rotation.replace(served.key, b"")

            async def refused() -> bool:
                samples = await asyncio.to_thread(rotation.metrics, app)
                await asyncio.to_thread(
                    rotation.served_subject, app.port, ca
                )  # a handshake: a look at the files
                return samples[("agentpost_tls_reloads_total", frozenset({("outcome", "refused")}))] >= 1

            await rotation.eventually(refused, "the unusable files refused")
            assert await asyncio.to_thread(rotation.served_subject, app.port, ca) == "first"
            assert await rotation.healthy(app.port, rotation.channel_credentials(ca)) == Code.OK
        warnings = [
            record.getMessage()
            for record in caplog.records
            if record.name == rotation.CREDENTIALS and "cannot be used" in record.getMessage()
        ]
        assert len(warnings) == 1, warnings
        assert "still serving the previous ones" in warnings[0]
        rotation.install(second, served)
        await rotation.subject_becomes(app.port, ca, "second")


async def test_a_rotated_client_ca_is_taken_up(backend: Backend, folder: Path) -> None:
    """mTLS with a client CA that is then replaced by another: new connections with a client
    certificate of the new CA are served, and those of the old CA refused, without a restart."""
    async with rotation.mutual_tls_server(backend, folder) as (app, tls):
        assert await rotation.healthy(app.port, tls.old_client) == Code.OK
        assert await rotation.healthy(app.port, tls.new_client) == Code.UNAVAILABLE
        rotation.replace(tls.client_ca, tls.new_ca.pem)

        async def taken_up() -> bool:
            return await rotation.healthy(app.port, tls.new_client) == Code.OK

        await rotation.eventually(taken_up, "the new client CA")
        assert await rotation.healthy(app.port, tls.old_client) == Code.UNAVAILABLE
        assert (
            await rotation.healthy(app.port, rotation.channel_credentials(tls.server_ca)) == Code.UNAVAILABLE
        )


@pytest.mark.parametrize("days", [-1, 3])
async def test_an_expired_or_expiring_certificate_is_served_with_a_warning(
    backend: Backend, folder: Path, days: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate that expired (or expires in 3 days) still serves, as operators expect of a
    TLS server, but the start logs a warning with its expiry, which the metrics export."""
    ca = Authority(folder, "expiry")
    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.issue(
        "short-lived",
        server=True,
        not_before=now - datetime.timedelta(days=30),
        not_after=now + datetime.timedelta(days=days),
    )
    with caplog.at_level(logging.INFO, logger=rotation.CREDENTIALS):
        async with rotation.server(
            backend, folder, tls_cert_file=str(leaf.cert), tls_key_file=str(leaf.key)
        ) as app:
            samples = await asyncio.to_thread(rotation.metrics, app)
            exported = samples[("agentpost_tls_certificate_expiry_timestamp_seconds", frozenset())]
            assert (
                exported
                == x509.load_pem_x509_certificate(leaf.cert.read_bytes()).not_valid_after_utc.timestamp()
            )
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == rotation.CREDENTIALS and record.levelno == logging.WARNING
    ]
    assert len(warnings) == 1, warnings
    assert ("expired at" if days < 0 else "expires at") in warnings[0]
    assert "CN=short-lived" in warnings[0]


async def test_a_rewritten_verifier_token_file_is_taken_up(
    backend: Backend, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`AGENTPOST_VERIFIER_TOKENS=@FILE`, then the file is rewritten with another token: the new
    token is accepted and the old one refused, without a restart. A rewrite into a file that names
    no token, or its removal, keeps the tokens read before (VerifyApiKey never becomes open)."""
    tokens = folder / "verifier-tokens"
    rotation.replace(tokens, b"old-token\n")
    async with rotation.served(backend, folder, verifier_tokens=f"@{tokens}") as harness:
        org = await harness.new_org()
        request = api_key_pb2.VerifyApiKeyRequest(secret=org.owner_secret, environment="default")

        async def verified(token: str) -> bool:
            try:
                answer = await harness.api_keys.VerifyApiKey(
                    request, metadata=(("authorization", f"Bearer {token}"),)
                )
            except grpc.aio.AioRpcError as error:
                assert (error.code(), error.details() is not None) == (Code.UNAUTHENTICATED, True)
                return False
            assert answer.valid
            return True

        assert await verified("old-token")
        assert not await verified("new-token")
        rotation.replace(tokens, b"new-token\n")

        async def rotated() -> bool:
            return await verified("new-token")

        await rotation.eventually(rotated, "the new token")
        await fails(
            harness.api_keys.VerifyApiKey(request, metadata=(("authorization", "Bearer old-token"),)),
            Code.UNAUTHENTICATED,
            "VERIFIER_TOKEN_REQUIRED",
        )
        with caplog.at_level(logging.WARNING, logger=rotation.CREDENTIALS):
            for breaking in (lambda: rotation.replace(tokens, b"\n \n"), tokens.unlink):
                breaking()
                await asyncio.sleep(1.5)  # past the server's next look at the file
                assert await verified("new-token")
                assert not await verified("old-token")
                assert not await verified("")
        warnings = [
            record.getMessage()
            for record in caplog.records
            if record.name == rotation.CREDENTIALS and "cannot be used" in record.getMessage()
        ]
        assert len(warnings) == 2, warnings


@pytest.mark.parametrize(
    ("setting", "variable"),
    [("verifier_tokens", "AGENTPOST_VERIFIER_TOKENS"), ("operator_token", "AGENTPOST_OPERATOR_TOKEN")],
)
async def test_a_token_file_gone_between_the_settings_and_the_start_is_a_clean_refusal(
    backend: Backend, folder: Path, setting: str, variable: str
) -> None:
    """A token file (verifier or operator tokens) is checked with the settings and read again
    when the server starts; gone in between, the start is refused with an error naming the
    setting (the CLI's one line and exit 2), not a traceback, and nothing serves."""
    tokens = folder / "tokens"
    rotation.replace(tokens, b"token\n")
    database = own_database(backend, folder)
    settings = database.settings(**{setting: f"@{tokens}"})
    tokens.unlink()
    app = Application(settings)
    try:
        await app.migrate()
        with pytest.raises(BindError) as refused:
            await app.start()
        assert variable in str(refused.value) and str(tokens) in str(refused.value)
        assert app.port == 0
    finally:
        await app.database.dispose()
