"""API keys in storage: the record, its environments, and the digest of its secret."""

from __future__ import annotations

import sys
from typing import Any

from sqlalchemy import Row, bindparam, delete, insert, or_, select, update

from service.domain.models import ApiKey, KeyMode
from service.storage.prepared import prepared
from service.storage.statements import Statements
from service.storage.tables import API_KEY_ENVIRONMENTS, API_KEYS, ApiKeyEnvironmentRow, ApiKeyRow

_BY_HASH = prepared(select(API_KEYS).where(API_KEYS.c.secret_hash == bindparam("secret_hash")))
_ENVIRONMENTS_OF = prepared(
    select(API_KEY_ENVIRONMENTS.c.environment_id).where(
        API_KEY_ENVIRONMENTS.c.api_key_id == bindparam("api_key_id")
    )
)
_INSERT = prepared(insert(API_KEYS))
_INSERT_ENVIRONMENTS = prepared(insert(API_KEY_ENVIRONMENTS))
# One key of one organization. The names differ from the columns': an UPDATE takes parameters
# named after its columns as the values to set.
_THE_KEY = (
    API_KEYS.c.id == bindparam("key_id"),
    API_KEYS.c.organization_id == bindparam("key_organization_id"),
)
_GET = prepared(select(API_KEYS).where(*_THE_KEY))
# The mutable fields are the parameters named after their columns (see `save`).
_UPDATE = prepared(update(API_KEYS).where(*_THE_KEY))


def api_key_row(key: ApiKey, secret_hash: str) -> dict[str, Any]:
    """The row of a new key, for Core inserts (one, or many at once in bulk loads)."""
    return {
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


def key_environment_rows(key: ApiKey) -> list[dict[str, Any]]:
    """The rows naming a new key's environments (none for an organization-wide key)."""
    return [{"api_key_id": key.id, "environment_id": env_id} for env_id in key.environment_ids]


def to_api_key(row: ApiKeyRow | Row[Any], environment_ids: list[str]) -> ApiKey:
    """The domain record of a row and its environments.

    The ids and scopes that many keys share (their organization, owner, environments, scope
    names) are interned: the key cache holds one copy of each, not one per key (about 300 bytes
    a cached key)."""
    owner = row.owner_member_id
    return ApiKey(
        id=row.id,
        organization_id=sys.intern(row.organization_id),
        name=row.name,
        scopes=tuple(sys.intern(scope) for scope in row.scopes),
        environment_ids=tuple(sorted(sys.intern(env_id) for env_id in environment_ids)),
        owner_member_id=None if owner is None else sys.intern(owner),
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

    def __init__(self, connection: Statements) -> None:
        self._connection = connection

    async def insert(self, key: ApiKey, secret_hash: str) -> None:
        """Stores a new key with the digest of its secret."""
        await self._connection.execute(_INSERT, api_key_row(key, secret_hash))
        environment_rows = key_environment_rows(key)
        if environment_rows:
            await self._connection.execute(_INSERT_ENVIRONMENTS, environment_rows)

    async def _environment_ids(self, key_id: str) -> list[str]:
        return list(await self._connection.scalars(_ENVIRONMENTS_OF, {"api_key_id": key_id}))

    async def digests_after(self, after_id: str, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` (id, secret digest) pairs of unrevoked keys whose id sorts after
        `after_id`, in id order (the primary key's)."""
        rows = await self._connection.execute(
            select(API_KEYS.c.id, API_KEYS.c.secret_hash)
            .where(API_KEYS.c.id > after_id, API_KEYS.c.revoke_time.is_(None))
            .order_by(API_KEYS.c.id)
            .limit(limit)
        )
        return [(row.id, row.secret_hash) for row in rows]

    async def find_by_hash(self, secret_hash: str) -> tuple[ApiKey, str] | None:
        """The key whose secret has this digest, and the stored digest (to compare in constant time).
        Core statements built once: this is every VerifyApiKey cache miss."""
        row = (await self._connection.execute(_BY_HASH, {"secret_hash": secret_hash})).first()
        if row is None:
            return None
        return to_api_key(row, await self._environment_ids(row.id)), row.secret_hash

    async def get(self, organization_id: str, key_id: str) -> ApiKey | None:
        """One key of the organization, or None."""
        found = await self._connection.execute(
            _GET, {"key_id": key_id, "key_organization_id": organization_id}
        )
        row = found.first()
        return None if row is None else to_api_key(row, await self._environment_ids(row.id))

    async def save(self, key: ApiKey) -> None:
        """Writes the mutable fields of an existing key and replaces its environments."""
        await self._connection.execute(
            _UPDATE,
            {
                "key_id": key.id,
                "key_organization_id": key.organization_id,
                "name": key.name,
                "scopes": list(key.scopes),
                "update_time": key.update_time,
                "expire_time": key.expire_time,
                "revoke_time": key.revoke_time,
                "version": key.version,
            },
        )
        current = set(await self._environment_ids(key.id))
        wanted = set(key.environment_ids)
        if current != wanted:
            await self._connection.execute(
                delete(ApiKeyEnvironmentRow).where(
                    ApiKeyEnvironmentRow.api_key_id == key.id,
                    ApiKeyEnvironmentRow.environment_id.in_(current - wanted),
                )
            )
            added = [{"api_key_id": key.id, "environment_id": env_id} for env_id in sorted(wanted - current)]
            if added:
                await self._connection.execute(_INSERT_ENVIRONMENTS, added)

    async def list_page(
        self,
        organization_id: str,
        *,
        after: str,
        limit: int,
        reach: frozenset[str] | None,
        environment_id: str | None,
        show_revoked: bool,
    ) -> list[ApiKey]:
        """Up to `limit` keys with ids after `after`, ordered by id.

        `reach` None means every key of the organization; otherwise only keys that list at least
        one environment and none outside `reach`. `environment_id` keeps the keys that may act
        there: those listing it, and organization-wide ones.
        """
        listed = select(ApiKeyEnvironmentRow.api_key_id).where(
            ApiKeyEnvironmentRow.api_key_id == ApiKeyRow.id
        )
        query = select(API_KEYS).where(ApiKeyRow.organization_id == organization_id, ApiKeyRow.id > after)
        if reach is not None:
            outside = listed.where(ApiKeyEnvironmentRow.environment_id.not_in(sorted(reach)))
            query = query.where(listed.exists(), ~outside.exists())
        if environment_id is not None:
            query = query.where(
                or_(
                    ~listed.exists(),
                    listed.where(ApiKeyEnvironmentRow.environment_id == environment_id).exists(),
                )
            )
        if not show_revoked:
            query = query.where(ApiKeyRow.revoke_time.is_(None))
        rows = list(await self._connection.execute(query.order_by(ApiKeyRow.id).limit(limit)))
        environments: dict[str, list[str]] = {row.id: [] for row in rows}
        if rows:
            pairs = await self._connection.execute(
                select(ApiKeyEnvironmentRow.api_key_id, ApiKeyEnvironmentRow.environment_id).where(
                    ApiKeyEnvironmentRow.api_key_id.in_(list(environments))
                )
            )
            for pair in pairs:
                environments[pair.api_key_id].append(pair.environment_id)
        return [to_api_key(row, environments[row.id]) for row in rows]
