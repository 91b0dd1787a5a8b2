"""Idempotency keys of create requests (AIP-155): what a request id created, per scope.

A scope is an id of at most 40 characters: an organization's, a calling key's (CreateApiKey) or
`operator`; their prefixes keep them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, insert, select

from service.storage.prepared import prepared
from service.storage.statements import Statements
from service.storage.tables import REQUEST_IDS

# Built once, run on every create (see tables.table_of).
_FIND = prepared(
    select(REQUEST_IDS.c.result_id, REQUEST_IDS.c.fingerprint).where(
        REQUEST_IDS.c.scope == bindparam("scope"),
        REQUEST_IDS.c.operation == bindparam("operation"),
        REQUEST_IDS.c.request_id == bindparam("request_id"),
    )
)
_RECORD = prepared(insert(REQUEST_IDS))


@dataclass(frozen=True)
class Earlier:
    """What an earlier request with the same id created, and a digest of what it asked for."""

    result_id: str
    fingerprint: str | None


class RequestIdRepository:
    """Remembers which result each request id produced."""

    def __init__(self, connection: Statements) -> None:
        self._connection = connection

    async def find(self, scope: str, operation: str, request_id: str) -> Earlier | None:
        """What an earlier request with this id created, if any."""
        found = await self._connection.execute(
            _FIND, {"scope": scope, "operation": operation, "request_id": request_id}
        )
        row = found.first()
        return None if row is None else Earlier(row.result_id, row.fingerprint)

    async def record(
        self,
        scope: str,
        operation: str,
        request_id: str,
        result_id: str,
        now: datetime,
        fingerprint: str | None = None,
    ) -> None:
        """Remembers the result; a concurrent duplicate fails the transaction (DUPLICATE_REQUEST)."""
        await self._connection.execute(
            _RECORD,
            {
                "scope": scope,
                "operation": operation,
                "request_id": request_id,
                "result_id": result_id,
                "create_time": now,
                "fingerprint": fingerprint,
            },
        )
