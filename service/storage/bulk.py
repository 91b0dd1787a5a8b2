"""Bulk loading of environments and keys, for seeding a database at scale (`seed`).

Rows go in with Core executemany, many thousands per statement batch and per transaction; the
event log is not written (a seeded database is measured, not audited). Use it on a database no
server is serving yet: running servers would not hear of the rows until they reload.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.models import ApiKey, Environment
from service.storage.api_keys import api_key_row, key_environment_rows
from service.storage.database import translated_errors
from service.storage.environments import environment_row
from service.storage.tables import API_KEY_ENVIRONMENTS, API_KEYS, ENVIRONMENTS


async def insert_environments(engine: AsyncEngine, environments: Sequence[Environment]) -> None:
    """Stores new environments in one transaction."""
    async with translated_errors(), engine.begin() as connection:
        await connection.execute(insert(ENVIRONMENTS), [environment_row(env) for env in environments])


async def insert_api_keys(engine: AsyncEngine, keys: Sequence[tuple[ApiKey, str]]) -> None:
    """Stores new keys, each with the digest of its secret, in one transaction."""
    environment_rows = [row for key, _ in keys for row in key_environment_rows(key)]
    async with translated_errors(), engine.begin() as connection:
        await connection.execute(insert(API_KEYS), [api_key_row(key, digest) for key, digest in keys])
        if environment_rows:
            await connection.execute(insert(API_KEY_ENVIRONMENTS), environment_rows)
