"""The Alembic migrations build exactly the schema the code declares (service/storage/tables.py),
on SQLite and on PostgreSQL: a column, index or constraint added to one and not the other fails
here, not in production on the first write that needs it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import update
from sqlalchemy.engine import Connection

from service.app.server import Application
from service.storage import migrate
from service.storage.tables import REQUEST_IDS, Base
from tests.empty_database import empty_database
from tests.harness import Harness, Org, fails
from tests.servers import Backend
from tests.writes import create_call


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    differences: list[Any] = compare_metadata(context, Base.metadata)
    return differences


async def test_the_migrations_build_the_schema_the_code_declares(backend: Backend, tmp_path: Path) -> None:
    """From an empty database, `migrate` to the newest revision, then compare the database with
    the declared tables: no table, column, type, index or constraint differs."""
    async with empty_database(backend, tmp_path) as database:
        app = Application(database.settings())
        try:
            await app.migrate()
            assert await migrate.pending(app.engine) is None
            async with app.engine.connect() as connection:
                differences = await connection.run_sync(_differences)
        finally:
            await app.engine.dispose()
    assert differences == []


async def test_request_ids_recorded_before_fingerprints_are_replayed_as_the_same(
    harness: Harness, org: Org
) -> None:
    """A request id recorded before migration 0005 has no fingerprint: its retry is answered the
    first result whatever it asks (nothing to compare with), while a recorded one refuses a retry
    that asks for something else."""
    request_id = str(uuid.uuid4())
    first = await create_call(harness, org.owner_secret, "Before", "before-0005", request_id)
    async with harness.app.engine.begin() as connection:
        cleared = await connection.execute(
            update(REQUEST_IDS).where(REQUEST_IDS.c.request_id == request_id).values(fingerprint=None)
        )
    assert cleared.rowcount == 1
    again = await create_call(harness, org.owner_secret, "Other", "other-slug", request_id)
    assert (again.id, again.slug) == (first.id, "before-0005")
    recorded = str(uuid.uuid4())
    await create_call(harness, org.owner_secret, "After", "after-0005", recorded)
    await fails(
        create_call(harness, org.owner_secret, "After", "after-0005-other", recorded),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
