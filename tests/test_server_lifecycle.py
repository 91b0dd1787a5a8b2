"""The server as a process: configuration, bootstrap, a taken port, and shutdown in order."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import environment_pb2, environment_pb2_grpc, organization_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app.server import Application
from service.domain.policy import POLICY, Level, Rule
from tests.harness import OPERATOR_TOKEN, auth, create_organization
from tests.servers import Backend, free_port, service_process

SECRET = re.compile(r"ap_sk_live_[0-9A-Za-z]{38}")


def _environment(tmp_path: Path, port: int) -> dict[str, str]:
    """A server with no operator token on a new SQLite file: it bootstraps and prints the key."""
    served = Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'served.db'}", None)
    return served.environment(
        {
            "AGENTPOST_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "AGENTPOST_SHUTDOWN_GRACE_SECONDS": "2",
            "AGENTPOST_SHUTDOWN_DRAIN_SECONDS": "0",
        }
    )


def _backend_environment(backend: Backend, port: int, drain: float, grace: float) -> dict[str, str]:
    return backend.environment(
        {
            "AGENTPOST_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "AGENTPOST_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "AGENTPOST_SHUTDOWN_DRAIN_SECONDS": str(drain),
            "AGENTPOST_SHUTDOWN_GRACE_SECONDS": str(grace),
        }
    )


async def _serve(env: dict[str, str], *flags: str) -> asyncio.subprocess.Process:
    """`serve --migrate` with `flags`, in a process of its own."""
    return await service_process(
        "serve",
        "--migrate",
        *flags,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _until_serving(process: asyncio.subprocess.Process, health: health_pb2_grpc.HealthStub) -> None:
    async with asyncio.timeout(30):
        while True:
            assert process.returncode is None, "the server exited while starting"
            try:
                checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if checked.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError as error:
                assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            await asyncio.sleep(0.1)


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
    port = free_port()
    env = _environment(tmp_path, port)
    process = await _serve(env, "--bootstrap-if-empty")
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
        second = await _serve(env, "--bootstrap-if-empty")
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
    again = await _serve(env, "--bootstrap-if-empty")
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
        "AGENTPOST_SHUTDOWN_DRAIN_SECONDS",
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
    await app.migrate()
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


async def test_sigterm_serves_through_the_drain_then_refuses_and_exits_without_waiting_out_the_grace(
    backend: Backend,
) -> None:
    # A grace far longer than the waits below: a Watch stream holding shutdown would time them out.
    port = free_port()
    process = await _serve(_backend_environment(backend, port, drain=2.0, grace=120.0))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            environments = environment_pb2_grpc.EnvironmentServiceStub(channel)
            await _until_serving(process, health)
            secret = (
                await create_organization(organization_pb2_grpc.OrganizationServiceStub(channel), "Drain")
            ).owner_api_key_secret
            watch = health.Watch(health_pb2.HealthCheckRequest())
            first = await watch.read()
            assert first is not grpc.aio.EOF and first.status == health_pb2.HealthCheckResponse.SERVING

            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                announced = await watch.read()
            assert announced is not grpc.aio.EOF
            assert announced.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # The drain window: health says NOT_SERVING while calls are still served.
            checked = await health.Check(health_pb2.HealthCheckRequest())
            assert checked.status == health_pb2.HealthCheckResponse.NOT_SERVING
            listed = await environments.ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(), metadata=auth(secret)
            )
            assert [e.slug for e in listed.environments] == ["default"]

            # When the server stops accepting, the Watch stream ends normally...
            async with asyncio.timeout(30):
                ended = await watch.read()
            assert ended is grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK
            # ...and new calls are UNAVAILABLE (never CANCELLED or UNKNOWN), so clients retry elsewhere.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await environments.ListEnvironments(
                    environment_pb2.ListEnvironmentsRequest(), metadata=auth(secret), timeout=10
                )
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

        async with asyncio.timeout(30):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    assert b"stopped" in stderr


async def test_a_second_signal_exits_at_once_during_the_drain(backend: Backend) -> None:
    port = free_port()
    process = await _serve(_backend_environment(backend, port, drain=120.0, grace=120.0))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await _until_serving(process, health)
            watch = health.Watch(health_pb2.HealthCheckRequest())
            assert await watch.read() != grpc.aio.EOF
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                announced = await watch.read()
            assert announced is not grpc.aio.EOF
            assert announced.status == health_pb2.HealthCheckResponse.NOT_SERVING
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 1, stderr.decode()
    assert b"second signal" in stderr


async def test_watch_streams_see_not_serving_then_end_without_holding_the_grace(backend: Backend) -> None:
    # No drain: the streams are closed right after NOT_SERVING is announced, and must still show it.
    app = Application(backend.settings(shutdown_drain_seconds=0.0, shutdown_grace_seconds=120.0))
    await app.migrate()
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        services = ("", "", "", "agentpost.environments.v1.EnvironmentService")
        watches = [health.Watch(health_pb2.HealthCheckRequest(service=name)) for name in services]
        for watch in watches:
            first = await watch.read()
            assert first is not grpc.aio.EOF and first.status == health_pb2.HealthCheckResponse.SERVING

        async def rest_of(watch: Any) -> list[int]:
            statuses = []
            while (message := await watch.read()) is not grpc.aio.EOF:
                statuses.append(message.status)
            assert await watch.code() == grpc.StatusCode.OK
            return statuses

        remaining = [asyncio.ensure_future(rest_of(watch)) for watch in watches]
        async with asyncio.timeout(30):
            await app.stop()
            seen = await asyncio.gather(*remaining)
        assert seen == [[health_pb2.HealthCheckResponse.NOT_SERVING]] * len(services)
    finally:
        await channel.close()
