"""API keys in storage: the record, its environments, and the digest of its secret."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.domain.models import ApiKey, KeyMode
from service.storage.tables import ApiKeyEnvironmentRow, ApiKeyRow


def to_api_key(row: ApiKeyRow, environment_ids: list[str]) -> ApiKey:
    """The domain record of a row and its environments."""
    return ApiKey(
        id=row.id,
        organization_id=row.organization_id,
        name=row.name,
        scopes=tuple(row.scopes),
        environment_ids=tuple(sorted(environment_ids)),
        owner_member_id=row.owner_member_id,
        mode=KeyMode(row.mode),
        prefix=row.prefix,
        create_time=row.create_time,
        update_time=row.update_time,
        expire_time=row.expire_time,
        last_used_time=row.last_used_time,
        revoke_time=row.revoke_time,
        version=row.version,
    )


class ApiKeyRepository:
    """Reads and writes API keys."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def insert(self, key: ApiKey, secret_hash: str) -> None:
        """Stores a new key with the digest of its secret."""
        self._session.add(
            ApiKeyRow(
                id=key.id,
                organization_id=key.organization_id,
                name=key.name,
                scopes=list(key.scopes),
                owner_member_id=key.owner_member_id,
                mode=key.mode.value,
                prefix=key.prefix,
                secret_hash=secret_hash,
                create_time=key.create_time,
                update_time=key.update_time,
                expire_time=key.expire_time,
                last_used_time=key.last_used_time,
                revoke_time=key.revoke_time,
                version=key.version,
            )
        )
        await self._session.flush()
        self._session.add_all(
            ApiKeyEnvironmentRow(api_key_id=key.id, environment_id=env_id) for env_id in key.environment_ids
        )
        await self._session.flush()

    async def _environment_ids(self, key_id: str) -> list[str]:
        rows = await self._session.scalars(
            select(ApiKeyEnvironmentRow.environment_id).where(ApiKeyEnvironmentRow.api_key_id == key_id)
        )
        return list(rows)

    async def find_by_hash(self, secret_hash: str) -> tuple[ApiKey, str] | None:
        """The key whose secret has this digest, and the stored digest (to compare in constant time)."""
        row = await self._session.scalar(select(ApiKeyRow).where(ApiKeyRow.secret_hash == secret_hash))
        if row is None:
            return None
        return to_api_key(row, await self._environment_ids(row.id)), row.secret_hash

    async def get(self, organization_id: str, key_id: str) -> ApiKey | None:
        """One key of the organization, or None."""
        row = await self._session.get(ApiKeyRow, key_id)
        if row is None or row.organization_id != organization_id:
            return None
        return to_api_key(row, await self._environment_ids(row.id))
