"""A non-Python client: `buf curl` drives the running server through server reflection only."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.buf import BUF
from tests.harness import Harness, Org


async def buf_curl(
    harness: Harness, method: str, body: dict[str, Any] | None, secret: str | None
) -> tuple[int, Any]:
    """Runs `buf curl` against the server; returns its exit code and parsed JSON output."""
    args = [BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    if secret is not None:
        args += ["-H", f"authorization: Bearer {secret}"]
    if body is not None:
        args += ["-d", json.dumps(body)]
    args.append(f"http://{harness.address}/agentpost.environments.v1.{method}")
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    text = (stdout or stderr).decode()
    return process.returncode or 0, json.loads(text) if text.strip() else None


async def test_environment_walkthrough_with_buf_curl(harness: Harness, org: Org) -> None:
    code, created = await buf_curl(
        harness,
        "EnvironmentService/CreateEnvironment",
        {"name": "Staging", "description": "pre-production"},
        org.owner_secret,
    )
    assert code == 0, created
    assert created["slug"] == "staging" and created["state"] == "ACTIVE"

    code, listed = await buf_curl(harness, "EnvironmentService/ListEnvironments", {}, org.owner_secret)
    assert code == 0
    assert sorted(env["slug"] for env in listed["environments"]) == ["default", "staging"]

    code, deleted = await buf_curl(
        harness,
        "EnvironmentService/DeleteEnvironment",
        {"id": created["id"], "etag": created["etag"]},
        org.owner_secret,
    )
    assert code == 0 and deleted["state"] == "DELETED"

    code, restored = await buf_curl(
        harness, "EnvironmentService/UndeleteEnvironment", {"id": created["id"]}, org.owner_secret
    )
    assert code == 0 and restored["state"] == "ACTIVE"

    code, refused = await buf_curl(
        harness, "EnvironmentService/DeleteEnvironment", {"id": org.default_environment.id}, org.owner_secret
    )
    assert code != 0
    assert refused["code"] == "failed_precondition"
    assert refused["details"][0]["type"] == "google.rpc.ErrorInfo"


async def test_buf_curl_without_credentials_is_unauthenticated(harness: Harness) -> None:
    code, refused = await buf_curl(harness, "EnvironmentService/ListEnvironments", {}, None)
    assert code != 0 and refused["code"] == "unauthenticated"
