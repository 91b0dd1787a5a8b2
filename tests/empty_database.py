"""A database of a test's own with no schema yet, on the backend under test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from tests.servers import Backend


@asynccontextmanager
async def empty_database(backend: Backend, folder: Path) -> AsyncIterator[Backend]:
    """A new SQLite file in `folder`, or a new PostgreSQL schema dropped at the end."""
    if backend.schema is None:
        yield Backend(backend.name, f"sqlite+aiosqlite:///{folder / 'empty.db'}", None)
        return
    schema = f"agentpost_empty_{uuid.uuid4().hex[:12]}"
    dsn = make_url(backend.url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'CREATE SCHEMA "{schema}"')
        yield Backend(backend.name, backend.url, schema)
    finally:
        await connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await connection.close()
