"""Create requests that are safe to retry (AIP-155): a request id maps to what it created."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from service.domain.errors import AlreadyExists
from service.domain.runtime import utcnow
from service.storage.database import Database
from service.storage.request_ids import RequestIdRepository


@dataclass(frozen=True)
class Outcome:
    """The id of what a create request made, and whether this call made it (False: a retry)."""

    result_id: str
    created: bool


async def create_once(
    database: Database,
    *,
    organization_id: str | None,
    operation: str,
    request_id: str | None,
    create: Callable[[AsyncSession], Awaitable[str]],
) -> Outcome:
    """Runs `create` in one write transaction of the organization and remembers its result under
    the request id; a retry (even a concurrent one) gets the first result's id instead."""
    scope = organization_id or "operator"
    try:
        async with database.write(organization_id) as session:
            if request_id is not None:
                earlier = await RequestIdRepository(session).find(scope, operation, request_id)
                if earlier is not None:
                    return Outcome(earlier, created=False)
            result_id = await create(session)
            if request_id is not None:
                await RequestIdRepository(session).record(scope, operation, request_id, result_id, utcnow())
            return Outcome(result_id, created=True)
    except AlreadyExists as error:
        if request_id is None or error.reason != "DUPLICATE_REQUEST":
            raise
        async with database.read() as session:
            earlier = await RequestIdRepository(session).find(scope, operation, request_id)
        if earlier is None:  # pragma: no cover - the winner committed before we failed
            raise
        return Outcome(earlier, created=False)
