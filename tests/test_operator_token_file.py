"""The operator token from a file (`AGENTPOST_OPERATOR_TOKEN=@FILE`): read at start, read again
when it changes (no restart), two tokens accepted while the file names both, and a file that
cannot be used keeps the tokens read before, so CreateOrganization never becomes open. (A file
gone between the settings and the start: tests/test_credential_rotation.py.)"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import organization_pb2

from tests.harness import Harness, fails
from tests.rotation import CREDENTIALS, eventually, replace, served
from tests.servers import Backend

Code = grpc.StatusCode
# Longer than the server's look at a changed file (at most once a second).
PAST_A_LOOK = 1.5
PROJECT_ROOT = Path(__file__).resolve().parents[1]


async def _creates(harness: Harness, token: str) -> bool:
    """Whether CreateOrganization with `token` succeeds; any refusal must be the wrong token's."""
    request = organization_pb2.CreateOrganizationRequest(name="by file", owner_email="owner@example.com")
    try:
        answer = await harness.organizations.CreateOrganization(
            request, metadata=(("authorization", f"Bearer {token}"),)
        )
    except grpc.aio.AioRpcError as error:
        assert error.code() is Code.UNAUTHENTICATED, (error.code(), error.details())
        return False
    assert answer.organization.id and answer.owner_api_key_secret
    return True


async def test_a_rewritten_operator_token_file_is_taken_up(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file names one token, then the old and the new one (both accepted), then only the new
    one (the old refused with OPERATOR_TOKEN_INVALID). Blanked or deleted afterwards, the new
    token still works and no other does: the operator door never opens nor locks its holder out."""
    tokens = tmp_path / "operator-token"
    replace(tokens, b"old-operator-token\n")
    async with served(backend, tmp_path, operator_token=f"@{tokens}") as harness:
        assert await _creates(harness, "old-operator-token")
        assert not await _creates(harness, "new-operator-token")
        # The file's name is not a token, nor is the setting's value.
        assert not await _creates(harness, f"@{tokens}")

        replace(tokens, b"old-operator-token\nnew-operator-token\n")

        async def both() -> bool:
            return await _creates(harness, "new-operator-token")

        await eventually(both, "the added token")
        assert await _creates(harness, "old-operator-token")

        replace(tokens, b"new-operator-token\n")

        async def old_withdrawn() -> bool:
            return not await _creates(harness, "old-operator-token")

        await eventually(old_withdrawn, "the withdrawn token refused")
        await fails(
            harness.organizations.CreateOrganization(
                organization_pb2.CreateOrganizationRequest(name="x", owner_email="x@example.com"),
                metadata=(("authorization", "Bearer old-operator-token"),),
            ),
            Code.UNAUTHENTICATED,
            "OPERATOR_TOKEN_INVALID",
        )
        with caplog.at_level(logging.WARNING, logger=CREDENTIALS):
            for breaking in (lambda: replace(tokens, b"\n \n"), tokens.unlink):
                breaking()
                await asyncio.sleep(PAST_A_LOOK)
                assert await _creates(harness, "new-operator-token")
                assert not await _creates(harness, "old-operator-token")
                assert not await _creates(harness, "")
        warnings = [
            record.getMessage()
            for record in caplog.records
            if record.name == CREDENTIALS and "operator token file" in record.getMessage()
        ]
        assert len(warnings) == 2, warnings
        # Written again, it is taken up again.
        replace(tokens, b"third-operator-token\n")

        async def third() -> bool:
            return await _creates(harness, "third-operator-token")

        await eventually(third, "the token written after the file was gone")
        assert not await _creates(harness, "new-operator-token")


async def test_an_inline_operator_token_is_one_token_commas_and_all(backend: Backend, tmp_path: Path) -> None:
    """An operator token given inline is taken as written: commas do not split it (only a file
    holds several tokens), so neither half of `a,b` is a token."""
    async with served(backend, tmp_path, operator_token="first-half,second-half") as harness:
        assert await _creates(harness, "first-half,second-half")
        assert not await _creates(harness, "first-half")
        assert not await _creates(harness, "second-half")


async def test_the_operator_token_file_is_no_verifier_or_api_key(backend: Backend, tmp_path: Path) -> None:
    """A token read from the operator file authenticates CreateOrganization only: as an API key it
    is refused like any unknown secret."""
    tokens = tmp_path / "operator-token"
    replace(tokens, b"only-for-operators\n")
    async with served(backend, tmp_path, operator_token=f"@{tokens}") as harness:
        await fails(
            harness.organizations.GetOrganization(
                organization_pb2.GetOrganizationRequest(),
                metadata=(("authorization", "Bearer only-for-operators"),),
            ),
            Code.UNAUTHENTICATED,
        )


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"\xff\xfe not utf-8"])
def test_an_unusable_operator_token_file_stops_serve_naming_the_setting(
    tmp_path: Path, content: bytes
) -> None:
    """`serve` with a token file that names no token, or is not UTF-8, or does not exist: one
    line naming the variable, exit 2, nothing created."""
    tokens = tmp_path / "operator-token"
    tokens.write_bytes(content)
    for path in (tokens, tmp_path / "missing"):
        database = tmp_path / "never.db"
        finished = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--listen-address", "127.0.0.1:0"],
            cwd=PROJECT_ROOT,
            env={
                **os.environ,
                "AGENTPOST_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
                "AGENTPOST_OPERATOR_TOKEN": f"@{path}",
            },
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert finished.returncode == 2, (finished.returncode, finished.stderr)
        lines = [line for line in finished.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "AGENTPOST_OPERATOR_TOKEN" in lines[0], lines
        assert "Traceback" not in finished.stderr
        assert not database.exists()
