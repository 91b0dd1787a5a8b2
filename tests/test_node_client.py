"""A client in another language: Node.js (@grpc/grpc-js, protos loaded at run time) creates an
environment and a scoped key, verifies the key and decodes a rich error's ErrorInfo.

The packages are pinned in tests/node/package-lock.json and installed with `npm ci` into
tests/node/node_modules, once per lockfile. Without node and npm the test is skipped, except
under CI=true, where it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import google.api
import grpc
import pytest
from agentpost.environments.v1 import environment_pb2

from tests.harness import ERROR_DOMAIN, Harness, Org, auth

NODE_DIR = Path(__file__).resolve().parent / "node"
INSTALLED_STAMP = NODE_DIR / "node_modules" / ".installed-package-lock.json"
# The install root of googleapis-common-protos, whose wheel ships google/api and google/rpc protos.
GOOGLEAPIS_PROTOS = Path(next(iter(google.api.__path__))).parents[1]


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "node and npm are not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires the Node.js client test")
        pytest.skip(reason)
    return node, npm


async def _run(*command: str, seconds: float, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        async with asyncio.timeout(seconds):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, stdout.decode(), stderr.decode()


async def _install(npm: str) -> None:
    """`npm ci`, unless node_modules already holds this very lockfile's packages."""
    lock = (NODE_DIR / "package-lock.json").read_text()
    if INSTALLED_STAMP.exists() and INSTALLED_STAMP.read_text() == lock:
        return
    code, stdout, stderr = await _run(npm, "ci", "--no-audit", "--no-fund", seconds=300)
    assert code == 0, f"npm ci failed:\n{stdout}\n{stderr}"
    INSTALLED_STAMP.write_text(lock)


async def test_node_client_creates_verifies_and_reads_error_info(harness: Harness, org: Org) -> None:
    node, npm = _tools()
    await _install(npm)

    code, stdout, stderr = await _run(
        node,
        "client.js",
        harness.address,
        org.owner_secret,
        seconds=120,
        env={"AGENTPOST_GOOGLEAPIS_PROTOS": str(GOOGLEAPIS_PROTOS)},
    )

    assert code == 0, f"node client failed:\n{stderr}"
    seen = json.loads(stdout)
    environment = seen["environment"]
    assert environment["state"] == "ACTIVE" and environment["slug"].startswith("node-")
    assert seen["api_key"]["environment_ids"] == [environment["id"]]
    assert seen["verification"] == {
        "valid": True,
        "denial_reason": "DENIAL_REASON_UNSPECIFIED",
        "api_key_id": seen["api_key"]["id"],
        "environment_id": environment["id"],
    }
    taken = seen["slug_taken"]
    assert taken["grpc_code"] == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert (taken["reason"], taken["domain"]) == ("SLUG_TAKEN", ERROR_DOMAIN)
    # What the Node client made is really there, as the Python client sees it.
    fetched = await harness.environments.GetEnvironment(
        environment_pb2.GetEnvironmentRequest(id=environment["id"]), metadata=auth(org.owner_secret)
    )
    assert fetched.slug == environment["slug"]
