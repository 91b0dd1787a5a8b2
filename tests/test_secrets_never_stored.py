"""Secrets are never stored or logged: the database and the captured logs are searched for them."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as pb
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.harness import Harness, Org, auth, body_of, corrupt, fails


async def _read_elsewhere(path: Path) -> bytes:
    """The file's bytes, read by a child process. Closing any descriptor of the database file in
    this process would drop every POSIX lock SQLite holds on it here; a server process that later
    closed its connection would then take itself for the last one and delete the WAL from under
    this process's server, which then fails with disk I/O errors."""
    reader = await asyncio.create_subprocess_exec("cat", str(path), stdout=asyncio.subprocess.PIPE)
    content, _ = await reader.communicate()
    assert reader.returncode == 0, path
    return content


async def stored_text(harness: Harness) -> bytes:
    """Everything the database holds that could contain a secret."""
    url = make_url(harness.app.settings.database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database
        path = Path(url.database)
        files = [path, path.with_name(path.name + "-wal")]
        return b"".join([await _read_elsewhere(file) for file in files if file.exists()])
    chunks: list[bytes] = []
    async with harness.app.engine.connect() as connection:
        columns = await connection.execute(
            text(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() "
                "AND data_type IN ('text', 'character varying', 'json', 'jsonb', 'character')"
            )
        )
        found = list(columns)
        assert any(row.table_name == "api_keys" for row in found)
        for table_name, column_name in found:
            values = await connection.execute(
                text(f'SELECT CAST("{column_name}" AS TEXT) FROM "{table_name}"')
            )
            chunks.extend(str(value).encode() for (value,) in values)
    return b"\n".join(chunks)


async def test_database_holds_no_secret(harness: Harness, org: Org) -> None:
    env = await harness.new_environment(org, "Vault")
    created = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(
            name="vault", scopes=["inboxes:read"], environment_ids=[env.id], mode=pb.ApiKey.DEV
        ),
        metadata=auth(org.owner_secret),
    )
    rolled = await harness.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=created.api_key.id), metadata=auth(org.owner_secret)
    )
    secrets = [org.owner_secret, created.secret, rolled.secret]
    stored = await stored_text(harness)
    # The search is meaningful: what was stored about these keys is found.
    assert created.api_key.id.encode() in stored and rolled.api_key.prefix.encode() in stored
    for secret in secrets:
        assert secret.encode() not in stored
        assert body_of(secret).encode() not in stored


async def test_logs_hold_no_secret(harness: Harness, org: Org, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    created = await harness.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(name="logged", scopes=["api_keys:read"]), metadata=auth(org.owner_secret)
    )
    secret = created.secret
    await harness.verify(secret, "", "inboxes:read")
    await fails(
        harness.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(name="x", scopes=["inboxes:read"]), metadata=auth(secret)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    await harness.api_keys.RevokeApiKey(
        pb.RevokeApiKeyRequest(id=created.api_key.id), metadata=auth(org.owner_secret)
    )
    failure = await fails(harness.whoami(secret), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
    corrupted = corrupt(secret, -1)
    await fails(harness.whoami(corrupted), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MALFORMED")
    assert caplog.records, "the calls above must have logged something for this test to mean anything"
    for record in caplog.records:
        line = f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        for value in (secret, body_of(secret), corrupted, org.owner_secret):
            assert value not in line
    assert secret not in failure.message
