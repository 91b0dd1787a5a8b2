"""Batched last-used times of API keys."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import bindparam, or_, update

from service.storage.prepared import prepared
from service.storage.statements import Statements
from service.storage.tables import API_KEYS

# One statement, run for many keys at once (executemany).
_TOUCH = prepared(
    update(API_KEYS)
    .where(
        API_KEYS.c.id == bindparam("key_id"),
        or_(API_KEYS.c.last_used_time.is_(None), API_KEYS.c.last_used_time < bindparam("when")),
    )
    .values(last_used_time=bindparam("when"))
)


class LastUsedRepository:
    """Moves keys' last-used times forward, never back."""

    def __init__(self, connection: Statements) -> None:
        self._connection = connection

    async def record(self, times: Mapping[str, datetime]) -> None:
        """Sets each key's last-used time unless a later one is stored already."""
        if times:
            await self._connection.execute(
                _TOUCH, [{"key_id": key_id, "when": when} for key_id, when in times.items()]
            )
