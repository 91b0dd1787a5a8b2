"""Idempotency keys of create requests (AIP-155): what a request id created, per scope.

A scope is an id of at most 40 characters: an organization's, a calling key's (CreateApiKey) or
`operator`; their prefixes keep them apart.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.storage.tables import RequestIdRow


class RequestIdRepository:
    """Remembers which result each request id produced."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def find(self, scope: str, operation: str, request_id: str) -> str | None:
        """The id created by an earlier request with this id, if any."""
        return await self._session.scalar(
            select(RequestIdRow.result_id).where(
                RequestIdRow.scope == scope,
                RequestIdRow.operation == operation,
                RequestIdRow.request_id == request_id,
            )
        )

    async def record(
        self, scope: str, operation: str, request_id: str, result_id: str, now: datetime
    ) -> None:
        """Remembers the result; a concurrent duplicate fails the transaction (DUPLICATE_REQUEST)."""
        self._session.add(
            RequestIdRow(
                scope=scope, operation=operation, request_id=request_id, result_id=result_id, create_time=now
            )
        )
        await self._session.flush()
