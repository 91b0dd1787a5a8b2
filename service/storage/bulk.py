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
from service.storage.database import translated_errors
from service.storage.tables import ENVIRONMENTS, ApiKeyEnvironmentRow, ApiKeyRow, table_of

API_KEYS = table_of(ApiKeyRow)
API_KEY_ENVIRONMENTS = table_of(ApiKeyEnvironmentRow)


async def insert_environments(engine: AsyncEngine, environments: Sequence[Environment]) -> None:
    """Stores new environments in one transaction."""
    rows = [
        {
            "id": env.id,
            "organization_id": env.organization_id,
            "name": env.name,
            "slug": env.slug,
            "description": env.description,
            "is_default": env.is_default,
            "create_time": env.create_time,
            "update_time": env.update_time,
            "delete_time": env.delete_time,
            "version": env.version,
        }
        for env in environments
    ]
    async with translated_errors(), engine.begin() as connection:
        await connection.execute(insert(ENVIRONMENTS), rows)


async def insert_api_keys(engine: AsyncEngine, keys: Sequence[tuple[ApiKey, str]]) -> None:
    """Stores new keys, each with the digest of its secret, in one transaction."""
    key_rows = [
        {
            "id": key.id,
            "organization_id": key.organization_id,
            "name": key.name,
            "scopes": list(key.scopes),
            "owner_member_id": key.owner_member_id,
            "mode": key.mode.value,
            "prefix": key.prefix,
            "secret_hash": secret_hash,
            "create_time": key.create_time,
            "update_time": key.update_time,
            "expire_time": key.expire_time,
            "last_used_time": key.last_used_time,
            "revoke_time": key.revoke_time,
            "version": key.version,
        }
        for key, secret_hash in keys
    ]
    environment_rows = [
        {"api_key_id": key.id, "environment_id": env_id} for key, _ in keys for env_id in key.environment_ids
    ]
    async with translated_errors(), engine.begin() as connection:
        await connection.execute(insert(API_KEYS), key_rows)
        if environment_rows:
            await connection.execute(insert(API_KEY_ENVIRONMENTS), environment_rows)
