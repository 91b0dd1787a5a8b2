"""The server as a process: configuration, bootstrap, a taken port, and shutdown in order."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import environment_pb2, environment_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app.server import Application
from service.domain.policy import POLICY, Level, Rule
from tests.conftest import Backend
from tests.harness import auth

SECRET = re.compile(r"ap_sk_live_[0-9A-Za-z]{38}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPOST_")}
    env["AGENTPOST_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'served.db'}"
    env["AGENTPOST_LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
    env["AGENTPOST_SHUTDOWN_GRACE_SECONDS"] = "2"
    return env


async def _serve(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "serve",
        "--migrate",
        "--bootstrap-if-empty",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _read_secret(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(30):
        while True:
            line = (await process.stdout.readline()).decode()
            assert line, "the server exited before printing the owner key"
            found = SECRET.search(line)
            if found:
                return found.group(0)


async def test_serve_bootstraps_once_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    env = _environment(tmp_path, port)
    process = await _serve(env)
    try:
        secret = await _read_secret(process)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            listed = await environment_pb2_grpc.EnvironmentServiceStub(channel).ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(), metadata=auth(secret)
            )
            assert [e.slug for e in listed.environments] == ["default"]

        # A second server on the same port must fail to start rather than share it.
        second = await _serve(env)
        async with asyncio.timeout(30):
            _, second_err = await second.communicate()
        assert second.returncode == 2
        assert b"cannot listen" in second_err
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert b"stopped" in stderr

    # Restarting on the same database does not bootstrap again: the key is printed only once.
    again = await _serve(env)
    try:
        await asyncio.sleep(0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            async with asyncio.timeout(30):
                await channel.channel_ready()
            listed = await environment_pb2_grpc.EnvironmentServiceStub(channel).ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(), metadata=auth(secret)
            )
            assert len(listed.environments) == 1
    finally:
        again.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            stdout, _ = await again.communicate()
    assert SECRET.search(stdout.decode()) is None


async def test_help_documents_every_setting() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", "--help", stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await process.communicate()
    text = stdout.decode()
    for variable in (
        "AGENTPOST_DATABASE_URL",
        "AGENTPOST_LISTEN_ADDRESS",
        "AGENTPOST_OPERATOR_TOKEN",
        "AGENTPOST_KEY_PEPPER",
        "AGENTPOST_SHUTDOWN_GRACE_SECONDS",
    ):
        assert variable in text


async def test_in_flight_calls_finish_during_graceful_shutdown(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    async def slow(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        started.set()
        await asyncio.sleep(0.5)
        return request

    monkeypatch.setitem(POLICY, "/test.Slow/Call", Rule(Level.PUBLIC))
    app = Application(backend.settings())
    app.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)}
            ),
        )
    )
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        method = channel.unary_unary(
            "/test.Slow/Call", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        in_flight = asyncio.ensure_future(method(b"payload"))
        await started.wait()
        stopping = asyncio.ensure_future(app.stop(grace=5))
        assert await in_flight == b"payload"
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await method(b"late", timeout=1)
        assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        await channel.close()
