"""How the tests get a server: the database it keeps its data in, an in-process server on an
ephemeral port, the environment of a server process, and throwaway PostgreSQL schemas."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
from sqlalchemy.engine import make_url

from service.app.config import Settings
from service.app.server import Application
from tests.harness import OPERATOR_TOKEN, Harness

# The project root: where `python -m service` runs from.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Backend:
    """Where a test server keeps its data."""

    name: str
    url: str
    schema: str | None

    def settings(self, **overrides: object) -> Settings:
        """Server settings on this backend, on any free port, with the test operator token."""
        values: dict[str, object] = {
            "database_url": self.url,
            "database_schema": self.schema,
            "listen_address": "127.0.0.1:0",
            "operator_token": OPERATOR_TOKEN,
            "shutdown_grace_seconds": 1.0,
            "shutdown_drain_seconds": 0.0,
            "cache_refresh_seconds": 0.2,
            # The suite sends far more refused credentials a minute than any limit allows; the
            # throttle is tested on servers of its own.
            "auth_failures_per_minute": 0,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def environment(self, variables: Mapping[str, str]) -> dict[str, str]:
        """The environment of a server process on this backend, with the given AGENTPOST_* variables."""
        database = {"AGENTPOST_DATABASE_URL": self.url}
        if self.schema is not None:
            database["AGENTPOST_DATABASE_SCHEMA"] = self.schema
        return process_environment({**database, **variables})


def process_environment(variables: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any AGENTPOST_* variable of its own, plus `variables`:
    a server process sees exactly the settings its test gives it."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("AGENTPOST_")}
    environment.update(variables)
    return environment


async def service_process(
    *arguments: str,
    env: dict[str, str],
    cwd: Path = PROJECT_ROOT,
    stdout: int = asyncio.subprocess.PIPE,
    stderr: int = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """`python -m service ARGUMENTS` as a process of its own, with exactly `env`."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", *arguments, env=env, cwd=cwd, stdout=stdout, stderr=stderr
    )


async def stop_process(process: asyncio.subprocess.Process, seconds: float = 30.0) -> None:
    """Stops a server process as an operator would (SIGTERM), killing it if it has not exited
    within `seconds`; nothing when it already has."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(seconds):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def start_server(backend: Backend, **overrides: object) -> tuple[Application, grpc.aio.Channel]:
    """A migrated, started server on `backend` and a channel to it."""
    app = Application(backend.settings(**overrides))
    await app.migrate()
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return app, channel


@contextlib.asynccontextmanager
async def serving(backend: Backend, **overrides: object) -> AsyncIterator[Harness]:
    """A server of its own on `backend` (another replica when the database is shared), stopped
    at the end."""
    app, channel = await start_server(backend, **overrides)
    try:
        yield Harness(app, channel, backend.name)
    finally:
        await channel.close()
        await app.stop(grace=0)


def postgres_dsn(url: str) -> str:
    """The libpq form of a SQLAlchemy PostgreSQL URL, for asyncpg."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _execute(url: str, statement: str) -> None:
    connection = await asyncpg.connect(postgres_dsn(url))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def scratch_schema(url: str, prefix: str) -> AsyncIterator[str]:
    """A new, empty schema named `prefix_<random>` on the PostgreSQL server at `url`, dropped
    with everything in it at the end."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await _execute(url, f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        await _execute(url, f'DROP SCHEMA "{schema}" CASCADE')


@contextlib.asynccontextmanager
async def scratch_database(url: str, prefix: str, options: str = "") -> AsyncIterator[str]:
    """A new database named `prefix_<random>` (created with `options`) on the PostgreSQL server
    at `url`, and the SQLAlchemy URL of it; dropped at the end, whoever is still connected."""
    database = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await _execute(url, f'CREATE DATABASE "{database}" {options}')
    try:
        yield make_url(url).set(database=database).render_as_string(hide_password=False)
    finally:
        await _execute(url, f'DROP DATABASE "{database}" WITH (FORCE)')
