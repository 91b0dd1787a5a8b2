"""Fixtures: a real server per database backend, started in-process on an ephemeral port.

The same tests run on SQLite and on PostgreSQL. PostgreSQL needs AGENTPOST_TEST_POSTGRES_URL;
each run gets its own schema, dropped at the end. Under CI=true a skipped PostgreSQL test fails
the run.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Harness, Org
from tests.servers import Backend, scratch_schema, serving

# The private PostgreSQL cluster and server processes of the outage tests, as fixtures.
pytest_plugins = ("tests.outages",)
# The helpers the test modules share, moved out of them, keep pytest's detailed assertion messages.
pytest.register_assert_rewrite(
    "tests.observing", "tests.resource_calls", "tests.rotation", "tests.statements", "tests.workers"
)

POSTGRES_URL_VARIABLE = "AGENTPOST_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
async def postgres_schema() -> AsyncIterator[tuple[str, str] | None]:
    """A schema of its own for this run on the test PostgreSQL server, dropped at the end."""
    url = os.environ.get(POSTGRES_URL_VARIABLE)
    if not url:
        yield None
        return
    async with scratch_schema(url, "agentpost_test") as schema:
        yield url, schema


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


@pytest.fixture(scope="session")
async def harness(backend: Backend) -> AsyncIterator[Harness]:
    """One server per backend for the session; tests isolate themselves by organization."""
    async with serving(backend) as running:
        yield running


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
