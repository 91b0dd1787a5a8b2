"""JSON logs: one object per line with the fields of the README, the access log naming each
call's method, code and duration, and never a secret in any line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as pb
from agentpost.environments.v1 import organization_pb2

from service.app import logs
from tests.harness import Harness, auth, body_of, fails
from tests.own_database import own_database
from tests.servers import Backend, start_server

FIELDS = {"time", "level", "logger", "message", "request_id", "method", "code", "duration_ms"}
GET_ORGANIZATION = "/agentpost.environments.v1.OrganizationService/GetOrganization"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything logged at DEBUG and above, as the json format writes it."""
    stream = io.StringIO()
    handler = logs.handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
async def logged(backend: Backend, tmp_path: Path) -> AsyncIterator[Harness]:
    """A server of its own with the access log on."""
    app, channel = await start_server(own_database(backend, tmp_path), access_log=True, log_format="json")
    try:
        yield Harness(app, channel, backend.name)
    finally:
        await channel.close()
        await app.stop(grace=0)


def parse(stream: io.StringIO) -> list[dict[str, object]]:
    """Every line as its JSON object; fails on a line that is not one."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_each_line_is_one_object_and_each_call_one_access_line(
    logged: Harness, json_lines: io.StringIO
) -> None:
    org = await logged.new_org()
    await logged.organizations.GetOrganization(
        organization_pb2.GetOrganizationRequest(), metadata=auth(org.owner_secret, request_id="json-ok-1")
    )
    await fails(
        logged.organizations.GetOrganization(
            organization_pb2.GetOrganizationRequest(), metadata=auth("bad", request_id="json-refused-1")
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )

    # A refused call is answered before its access line is written: wait for it (at most 5 s).
    for _ in range(500):  # 10 ms apart: at most 5 s
        if any(
            line["logger"] == "service.access" and line["request_id"] == "json-refused-1"
            for line in parse(json_lines)
        ):
            break
        await asyncio.sleep(0.01)
    lines = parse(json_lines)
    assert lines
    for line in lines:
        assert set(line) >= FIELDS, line
        assert isinstance(line["time"], str) and line["time"].endswith("+00:00")
    access = {line["request_id"]: line for line in lines if line["logger"] == "service.access"}
    ok, refused = access["json-ok-1"], access["json-refused-1"]
    assert (ok["method"], ok["code"], ok["level"]) == (GET_ORGANIZATION, "OK", "INFO")
    assert (refused["method"], refused["code"]) == (GET_ORGANIZATION, "UNAUTHENTICATED")
    assert isinstance(ok["duration_ms"], float) and ok["duration_ms"] > 0
    # A line written during the call (the refusal) names the call's method and request id.
    refusal = [line for line in lines if line["request_id"] == "json-refused-1" and line is not refused]
    assert refusal and all(line["method"] == GET_ORGANIZATION for line in refusal)


async def test_json_logs_hold_no_secret(logged: Harness, json_lines: io.StringIO) -> None:
    org = await logged.new_org()
    created = await logged.api_keys.CreateApiKey(
        pb.CreateApiKeyRequest(name="logged", scopes=["api_keys:read"]), metadata=auth(org.owner_secret)
    )
    secret = created.secret
    await logged.api_keys.VerifyApiKey(
        pb.VerifyApiKeyRequest(secret=secret, required_scopes=["inboxes:read"])
    )
    await fails(
        logged.api_keys.CreateApiKey(
            pb.CreateApiKeyRequest(name="x", scopes=["inboxes:read"]), metadata=auth(secret)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    rolled = await logged.api_keys.RollApiKey(
        pb.RollApiKeyRequest(id=created.api_key.id), metadata=auth(org.owner_secret)
    )
    corrupted = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    await fails(
        logged.organizations.GetOrganization(
            organization_pb2.GetOrganizationRequest(), metadata=auth(corrupted)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_MALFORMED",
    )

    text = json_lines.getvalue()
    # The search is meaningful: these calls were logged, ids and all.
    assert "/agentpost.environments.v1.ApiKeyService/RollApiKey OK" in text
    assert len(parse(json_lines)) >= 6
    for value in (secret, rolled.secret, corrupted, org.owner_secret):
        assert value not in text
        assert body_of(value) not in text
