"""`serve --workers N` as a real process tree for tests: started with the test's settings, its
output read back, and which worker serves a connection (every worker's lines start with
`worker I/N pid P`, and a refused call logs its `x-request-id`)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from agentpost.environments.v1 import api_key_pb2 as pb
from agentpost.environments.v1 import api_key_pb2_grpc

from tests.harness import OPERATOR_TOKEN
from tests.servers import Backend, free_port

WORKER_LINE = re.compile(r"^worker (\d+)/(\d+) pid (\d+) ")
START_SECONDS = 60.0


@dataclass
class Served:
    """A `serve --workers N` process tree and its output."""

    process: asyncio.subprocess.Process
    port: int
    stdout: Path
    stderr: Path

    @property
    def address(self) -> str:
        """host:port the workers share."""
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the supervisor and the workers logged so far."""
        return self.stderr.read_text()

    def worker_pids(self) -> set[int]:
        """The supervisor's child processes, from the kernel."""
        pid = self.process.pid
        return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}

    async def until_serving(self, workers: int = 2) -> None:
        """Waits for the supervisor's line saying every worker serves."""
        async with asyncio.timeout(START_SECONDS):
            while f"{workers} workers serving on {self.address}" not in self.log():
                assert self.process.returncode is None, self.log()
                await asyncio.sleep(0.1)

    async def until_printed(self, pattern: re.Pattern[str]) -> str:
        """Waits for `pattern` on the supervisor's standard output; returns that output."""
        async with asyncio.timeout(START_SECONDS):
            while not pattern.search(self.stdout.read_text()):
                assert self.process.returncode is None, self.log()
                await asyncio.sleep(0.05)
        return self.stdout.read_text()

    def channel(self) -> grpc.aio.Channel:
        """A channel with a connection of its own, so the kernel may hand it to either worker."""
        return grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])

    async def worker_behind(self, channel: grpc.aio.Channel) -> int:
        """The pid of the worker serving `channel`'s connection: a refused call with a request id
        of its own, then the log line that carries that id. The call is bad input, not a bad
        credential, so that the failed-authentication throttle's quieter logging plays no part."""
        request_id = f"which-worker-{uuid.uuid4().hex}"
        stub = api_key_pb2_grpc.ApiKeyServiceStub(channel)
        try:
            await stub.VerifyApiKey(
                pb.VerifyApiKeyRequest(secret="ap_sk_live_x", required_scopes=["no:such"]),
                metadata=(("x-request-id", request_id),),
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("an unknown scope was accepted")
        async with asyncio.timeout(10):
            while True:
                for line in self.log().splitlines():
                    found = WORKER_LINE.match(line)
                    if found and f"[{request_id}]" in line:
                        return int(found.group(3))
                await asyncio.sleep(0.05)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signals the supervisor and waits for it; returns its exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
        async with asyncio.timeout(60):
            return await self.process.wait()


async def serve_workers(
    backend: Backend, tmp_path: Path, *flags: str, port: int | None = None, drain: float = 0.0
) -> Served:
    """Starts `serve --workers 2 FLAGS` on `backend` (on `port`, or a free one); does not wait for it."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPOST_")}
    env["AGENTPOST_DATABASE_URL"] = backend.url
    if backend.schema is not None:
        env["AGENTPOST_DATABASE_SCHEMA"] = backend.schema
    env["AGENTPOST_LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
    env["AGENTPOST_OPERATOR_TOKEN"] = OPERATOR_TOKEN
    env["AGENTPOST_SHUTDOWN_DRAIN_SECONDS"] = str(drain)
    env["AGENTPOST_SHUTDOWN_GRACE_SECONDS"] = "2"
    # Every worker runs as in production: the default refresh (the poll on SQLite, the safety net
    # behind LISTEN/NOTIFY on PostgreSQL).
    tag = uuid.uuid4().hex[:8]
    stdout, stderr = tmp_path / f"stdout-{tag}.txt", tmp_path / f"stderr-{tag}.txt"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "serve",
            "--workers",
            "2",
            *flags,
            env=env,
            stdout=out,
            stderr=err,
        )
    return Served(process, port, stdout, stderr)


def process_gone(pid: int) -> bool:
    """True once the process has exited (a zombie not yet reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
