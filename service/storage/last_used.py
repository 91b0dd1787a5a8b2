"""Batched last-used times of API keys."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import or_, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.storage.tables import ApiKeyRow


class LastUsedRepository:
    """Moves keys' last-used times forward, never back."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def record(self, times: Mapping[str, datetime]) -> None:
        """Sets each key's last-used time unless a later one is stored already."""
        for key_id, when in times.items():
            await self._session.execute(
                update(ApiKeyRow)
                .where(
                    ApiKeyRow.id == key_id,
                    or_(ApiKeyRow.last_used_time.is_(None), ApiKeyRow.last_used_time < when),
                )
                .values(last_used_time=when)
            )
