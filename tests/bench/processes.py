"""The benchmark's server processes: the bare echo and replicas of this service, on 127.0.0.1.

Each server runs in a subprocess of its own so that the load client never shares an event loop
or a GIL with the server it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.bench.echo import ECHO_METHOD
from tests.servers import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Probe = Callable[[grpc.aio.Channel], Awaitable[bool]]


class ServerProcess:
    """A server in a subprocess, its address and its log file."""

    def __init__(
        self,
        name: str,
        process: subprocess.Popen[bytes],
        port: int,
        log_path: Path,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.log_path = log_path
        self.credentials = credentials

    def channel(self, options: list[tuple[str, int]] | None = None) -> grpc.aio.Channel:
        """A new channel to the server: TLS when it serves TLS."""
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.address, options=options)
        return grpc.aio.secure_channel(self.address, self.credentials, options=options)

    @property
    def address(self) -> str:
        """host:port the server listens on."""
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's output, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the process (all its threads) has used; None off Linux."""
        return _cpu_seconds(f"/proc/{self.process.pid}/stat")

    def loop_cpu_seconds(self) -> float | None:
        """The same for the process's main thread alone, which runs its event loop (with
        `--workers N` that is the supervisor's); None off Linux."""
        return _cpu_seconds(f"/proc/{self.process.pid}/task/{self.process.pid}/stat")

    async def wait_ready(self, probe: Probe) -> None:
        """Waits until `probe` succeeds on a channel to the server; fails if the process exits."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        async with self.channel() as channel:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                    if await asyncio.wait_for(probe(channel), timeout=1.0):
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(
            f"{self.name} was not ready within {START_TIMEOUT_SECONDS:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if the process has not exited within the timeout."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _cpu_seconds(stat_path: str) -> float | None:
    """User + system CPU seconds from a /proc stat file; None when it cannot be read."""
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def spawn(
    name: str,
    arguments: list[str],
    port: int,
    log_path: Path,
    credentials: grpc.ChannelCredentials | None = None,
) -> ServerProcess:
    """Starts `python <arguments>` in the project root, its output going to `log_path`."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *arguments],
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return ServerProcess(name, process, port, log_path, credentials)


async def start_server(
    name: str,
    arguments: Callable[[int], list[str]],
    probe: Probe,
    log_dir: Path,
    attempts: int = 3,
    credentials: grpc.ChannelCredentials | None = None,
) -> ServerProcess:
    """Starts `python <arguments(port)>` on a free port and waits until `probe` passes.

    The port is chosen before the process binds it, so another process may take it in between;
    a start that fails is retried on a new port.
    """
    error: RuntimeError | None = None
    for attempt in range(attempts):
        port = free_port()
        log_path = log_dir / f"{name.replace(' ', '-')}-{attempt}.log"
        server = spawn(name, arguments(port), port, log_path, credentials)
        try:
            await server.wait_ready(probe)
            return server
        except RuntimeError as failure:
            server.stop()
            error = failure
    assert error is not None
    raise error


async def echo_answers(channel: grpc.aio.Channel) -> bool:
    """Readiness of the echo server: an echo comes back."""
    call = channel.unary_unary(ECHO_METHOD)
    return bool(await call(b"ready", timeout=1.0) == b"ready")


async def health_serving(channel: grpc.aio.Channel) -> bool:
    """Readiness of this service: grpc.health.v1 says SERVING."""
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
