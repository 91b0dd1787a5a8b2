"""Fixtures: a real server per database backend, started in-process on an ephemeral port.

The same tests run on SQLite and on PostgreSQL. PostgreSQL needs AGENTPOST_TEST_POSTGRES_URL;
each run gets its own schema, dropped at the end. Under CI=true a skipped PostgreSQL test fails
the run.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from sqlalchemy.engine import make_url

from service.app.config import Settings
from service.app.server import Application
from tests.harness import OPERATOR_TOKEN, Harness, Org

POSTGRES_URL_VARIABLE = "AGENTPOST_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgres"]


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


def _postgres_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_schema() -> Iterator[tuple[str, str] | None]:
    """A schema of its own for this run on the test PostgreSQL server, dropped at the end."""
    url = os.environ.get(POSTGRES_URL_VARIABLE)
    if not url:
        yield None
        return
    schema = f"agentpost_test_{uuid.uuid4().hex[:12]}"

    async def run(statement: str) -> None:
        connection = await asyncpg.connect(_postgres_dsn(url))
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run(f'CREATE SCHEMA "{schema}"'))
    try:
        yield url, schema
    finally:
        asyncio.run(run(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(scope="session", params=BACKENDS)
def backend(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    postgres_schema: tuple[str, str] | None,
) -> Backend:
    """Each backend in turn: an SQLite file, or this run's PostgreSQL schema."""
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("sqlite") / "agentpost.db"
        return Backend("sqlite", f"sqlite+aiosqlite:///{path}", None)
    if postgres_schema is None:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_URL_VARIABLE} (e.g. postgresql+asyncpg://USER@HOST/DB)")
    url, schema = postgres_schema
    return Backend("postgres", url, schema)


async def start_server(backend: Backend, **overrides: object) -> tuple[Application, grpc.aio.Channel]:
    """A migrated, started server on `backend` and a channel to it."""
    app = Application(backend.settings(**overrides))
    await app.migrate()
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return app, channel


@pytest.fixture(scope="session")
async def harness(backend: Backend) -> AsyncIterator[Harness]:
    """One server per backend for the session; tests isolate themselves by organization."""
    app, channel = await start_server(backend)
    try:
        yield Harness(app, channel, backend.name)
    finally:
        await channel.close()
        await app.stop(grace=0)


@pytest.fixture
async def org(harness: Harness) -> Org:
    """A fresh organization for one test."""
    return await harness.new_org()


_skipped_postgres: list[str] = []
# The line of the skip in `backend`, as pytest would name it.
_POSTGRES_SKIP_LINE = 1 + next(
    number for number, line in enumerate(Path(__file__).read_text().splitlines()) if "pytest.skip(" in line
)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "[postgres" in report.nodeid:
        _skipped_postgres.append(report.nodeid)
        # One place for every such skip, so the summary folds them into a single line.
        if isinstance(report.longrepr, tuple):
            report.longrepr = (__file__, _POSTGRES_SKIP_LINE, report.longrepr[2])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") == "true" and _skipped_postgres:
        print(f"\nCI=true: {len(_skipped_postgres)} PostgreSQL tests were skipped; failing the run")
        session.exitstatus = 1
