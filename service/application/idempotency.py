"""Create requests that are safe to retry (AIP-155): a request id maps to what it created.

A request id is remembered per *scope*: by default the organization (or the operator, for
CreateOrganization). A use case that callers of different reach share passes a narrower scope,
so one caller's request id never answers for, or reveals, another's: CreateApiKey scopes its
request ids to the calling key, since a replay names the first key's id, which may lie outside
another caller's reach. The other creates keep the organization scope: only organization-level
callers, who see every environment and member, create those, and RegisterResource replays only
the same resource, read back through the caller's own environment context.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from service.domain.clock import utcnow
from service.domain.errors import AlreadyExists, DomainError, InvalidArgument
from service.domain.events import Actor, Change
from service.storage.database import Database
from service.storage.request_ids import Earlier
from service.storage.unit_of_work import UnitOfWork

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """The id of what a create request made, and whether this call made it (False: a retry)."""

    result_id: str
    created: bool


def fingerprint(asked: Sequence[str]) -> str:
    """A digest of what a create request asked for (its validated, normalized fields)."""
    return hashlib.sha256(json.dumps(list(asked)).encode()).hexdigest()


def _replay(earlier: Earlier, asked: str | None, refuse: Callable[[str], DomainError] | None) -> Outcome:
    """A retry's outcome, or the refusal of a request id used for another request (a retry asks
    for what the first request asked; one recorded without a fingerprint is taken as the same)."""
    if asked is not None and earlier.fingerprint is not None and earlier.fingerprint != asked:
        raise InvalidArgument.field(
            "request_id", "was already used for another request", reason="REQUEST_ID_REUSED"
        )
    if refuse is not None:
        raise refuse(earlier.result_id)
    return Outcome(earlier.result_id, created=False)


async def find_earlier(database: Database, scope: str, operation: str, request_id: str) -> Earlier | None:
    """What an earlier request with this id made within `scope`, read outside any write."""
    async with database.read() as uow:
        return await uow.request_ids.find(scope, operation, request_id)


async def create_once(
    database: Database,
    *,
    organization_id: str | None,
    operation: str,
    request_id: str | None,
    create: Callable[[UnitOfWork], Awaitable[str]],
    actor: Actor,
    scope: str | None = None,
    created: Sequence[Change] = (),
    asked: Sequence[str] | None = None,
    refuse: Callable[[str], DomainError] | None = None,
) -> Outcome:
    """Runs `create` in one write transaction of the organization and remembers its result under
    the request id within `scope` (default: the organization); a retry in the same scope (even a
    concurrent one) gets the first result's id instead. Scopes are ids, so those of different
    kinds (`org_...`, `key_...`, `operator`) never collide.

    `asked` are the request's fields that a retry must repeat: the same request id with others
    is INVALID_ARGUMENT REQUEST_ID_REUSED. `refuse` makes the error a retry gets instead of the
    first result (a create whose secret cannot be shown twice). Either way the retry's write is
    rolled back: a refused retry changes nothing, the organization's revision included.

    `created` are the changes `create` makes, known beforehand, recorded here (`create` records
    any others). Without a request id, nothing can turn the write into a replay, so they are
    announced to the write and their events go with its revision (see `Database.write`)."""
    scope = scope or organization_id or "operator"
    digest = None if asked is None or request_id is None else fingerprint(asked)
    replayed = False  # a refusal `_replay` raised goes to the caller as is
    try:
        async with database.write(
            organization_id, actor, announced=created if request_id is None else ()
        ) as uow:
            if request_id is not None:
                earlier = await uow.request_ids.find(scope, operation, request_id)
                if earlier is not None:
                    replayed = True
                    return _replay(earlier, digest, refuse)
                uow.changes.extend(created)
            result_id = await create(uow)
            if request_id is not None:
                await uow.request_ids.record(scope, operation, request_id, result_id, utcnow(), digest)
            return Outcome(result_id, created=True)
    except AlreadyExists as error:
        # Storage's refusal of a second record of the id: a concurrent retry committed first.
        if replayed or request_id is None or error.reason != "DUPLICATE_REQUEST":
            raise
        earlier = await find_earlier(database, scope, operation, request_id)
        if earlier is None:  # pragma: no cover - the winner committed before we failed
            raise
        return _replay(earlier, digest, refuse)


async def create_or_replay(
    database: Database,
    *,
    organization_id: str,
    operation: str,
    request_id: str | None,
    created: T,
    insert: Callable[[UnitOfWork], Awaitable[str]],
    load: Callable[[UnitOfWork, str], Awaitable[T | None]],
    gone: Callable[[str], DomainError],
    actor: Actor,
    asked: Sequence[str],
    changes: Sequence[Change] = (),
) -> T:
    """`create_once` for resources that can be read back: `created` when this call made it, else
    what the first call made as it stands now (`gone` when it has since been removed)."""
    outcome = await create_once(
        database,
        organization_id=organization_id,
        operation=operation,
        request_id=request_id,
        create=insert,
        actor=actor,
        created=changes,
        asked=asked,
    )
    if outcome.created:
        return created
    async with database.read() as uow:
        earlier = await load(uow, outcome.result_id)
    if earlier is None:
        raise gone(outcome.result_id)
    return earlier
