"""Secrets made once per database and shared by every server on it."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from service.storage.statements import Statements
from service.storage.tables import ServerSecretRow

PAGE_TOKEN_KEY = "page-token-key"


class ServerSecretRepository:
    """Named secrets: the first writer's value wins and every later reader gets it."""

    def __init__(self, connection: Statements) -> None:
        self._connection = connection

    async def get_or_create(self, name: str, candidate: str) -> str:
        """The stored value of `name`, storing `candidate` first if there is none. Servers that
        start together all insert-if-absent and read back, so they agree on one value."""
        insert = postgresql.insert if self._connection.dialect.name == "postgresql" else sqlite.insert
        await self._connection.execute(
            insert(ServerSecretRow)
            .values(name=name, value=candidate, create_time=datetime.now(UTC))
            .on_conflict_do_nothing(index_elements=[ServerSecretRow.name])
        )
        stored = await self._connection.scalar(
            select(ServerSecretRow.value).where(ServerSecretRow.name == name)
        )
        assert stored is not None  # inserted above, or by the writer that won
        return stored
