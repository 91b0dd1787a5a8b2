"""Schema migrations with Alembic, run programmatically on the service's own engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from service.storage.database import translated_errors

_SCRIPTS = Path(__file__).parent / "migrations"
_VERSION_TABLE = "alembic_version"


class SchemaUnknown(Exception):
    """The database is at a schema revision this code has no migration of."""


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Brings the schema up to `revision` (the newest by default). A database at a revision this
    code does not know (a newer release migrated it) is `SchemaUnknown`, not touched."""

    def run(connection: Connection) -> None:
        current = MigrationContext.configure(connection).get_current_revision()
        if current is not None and not known(current):
            raise SchemaUnknown(unknown_revision(current))
        command.upgrade(_config(connection), revision)

    await _in_transaction(engine, run)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Takes the schema back to `revision` (an operator's way back from a failed upgrade)."""
    await _in_transaction(engine, lambda connection: command.downgrade(_config(connection), revision))


async def _in_transaction(engine: AsyncEngine, step: Callable[[Connection], None]) -> None:
    """Runs Alembic's `step` on one connection of `engine`, in one transaction."""
    async with translated_errors(), engine.begin() as connection:
        await connection.run_sync(step)


def head() -> str:
    """The newest schema revision this code knows."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


async def pending(engine: AsyncEngine) -> str | None:
    """None when the database is at the newest revision; otherwise what it is at, in words.
    A database that does not answer is `Unavailable`."""

    def current(connection: Connection) -> str | None:
        # Read directly rather than through Alembic's MigrationContext, which logs two INFO lines
        # per look: a server waiting for a migration looks every second.
        if not inspect(connection).has_table(_VERSION_TABLE):
            return None
        return connection.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalar()  # noqa: S608

    async with translated_errors(), engine.connect() as connection:
        revision = await connection.run_sync(current)
    newest = head()
    if revision == newest:
        return None
    if revision is not None and not known(revision):
        return unknown_revision(revision)
    found = "has no schema" if revision is None else f"is at schema revision {revision}"
    return f"the database {found}; this server needs revision {newest}: {_MIGRATE}"


_MIGRATE = "run `migrate` (or serve with `--migrate`)"


def known(revision: str) -> bool:
    """Whether this code has a migration of that revision."""
    try:
        return ScriptDirectory.from_config(_config()).get_revision(revision) is not None
    except CommandError:
        return False


def unknown_revision(revision: str) -> str:
    """What to tell an operator whose database a newer release migrated: `migrate` cannot help."""
    return (
        f"the database is at schema revision {revision}, which this server does not know (a newer "
        f"release migrated it; this one knows up to {head()}): run that release or a newer one"
    )
