"""Write calls as the write tests make them, and what a write left in the database: the
revision it answered, the organization's stored revision, environments and resources, and the
event log's gaplessness."""

from __future__ import annotations

from typing import Any

import grpc
from agentpost.environments.v1 import environment_pb2, resource_pb2
from sqlalchemy import select

from service.storage.tables import EnvironmentRow, OrganizationRow, ResourceRow
from tests.harness import Harness, auth, failure_of

INBOX = resource_pb2.ScopedResource.INBOX
REVISION = "x-agentpost-revision"


async def revision_of(call: Any) -> int:
    """The revision a finished write answered in its trailing metadata."""
    trailers = dict(await call.trailing_metadata() or ())
    return int(trailers[REVISION])


async def outcome(call: Any) -> tuple[str, int | None]:
    """`("OK", revision)` for a call that succeeded, else `("CODE REASON", None)`."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        return f"{failure.code.name} {failure.reason}".strip(), None
    return "OK", await revision_of(call)


def register_call(
    harness: Harness,
    secret: str,
    resource_id: str,
    environment: str | None = None,
    request_id: str = "",
    kind: resource_pb2.ScopedResource.Kind = INBOX,
    timeout: float | None = None,
    display_name: str = "",
) -> Any:
    """A RegisterResource call (not yet awaited) as `secret` in `environment`."""
    return harness.resources.RegisterResource(
        resource_pb2.RegisterResourceRequest(
            kind=kind, resource_id=resource_id, request_id=request_id, display_name=display_name
        ),
        metadata=auth(secret, environment),
        timeout=timeout,
    )


def create_call(
    harness: Harness,
    secret: str,
    name: str,
    slug: str = "",
    request_id: str = "",
    timeout: float | None = None,
    description: str = "",
) -> Any:
    """A CreateEnvironment call (not yet awaited) as `secret`."""
    return harness.environments.CreateEnvironment(
        environment_pb2.CreateEnvironmentRequest(
            name=name, slug=slug, request_id=request_id, description=description
        ),
        metadata=auth(secret),
        timeout=timeout,
    )


async def stored_revision(harness: Harness, organization_id: str) -> int:
    """The organization's revision as stored."""
    async with harness.app.engine.connect() as connection:
        found = await connection.scalar(
            select(OrganizationRow.revision).where(OrganizationRow.id == organization_id)
        )
    return int(found or 0)


async def stored_environments(harness: Harness, organization_id: str) -> dict[str, tuple[str, bool]]:
    """Each environment of the organization as stored: id -> (name, deleted)."""
    async with harness.app.engine.connect() as connection:
        rows = await connection.execute(
            select(EnvironmentRow.id, EnvironmentRow.name, EnvironmentRow.delete_time).where(
                EnvironmentRow.organization_id == organization_id
            )
        )
        return {row.id: (row.name, row.delete_time is not None) for row in rows}


async def stored_resources(harness: Harness, organization_id: str) -> dict[str, str]:
    """Each registered resource of the organization: `KIND:resource_id` -> environment id."""
    async with harness.app.engine.connect() as connection:
        rows = await connection.execute(
            select(ResourceRow.kind, ResourceRow.resource_id, ResourceRow.environment_id).where(
                ResourceRow.organization_id == organization_id
            )
        )
        return {f"{row.kind}:{row.resource_id}": row.environment_id for row in rows}


def assert_gapless(events: list[Any]) -> None:
    """Every revision from 1 to the last one has its events (no write left a revision behind)."""
    revisions = sorted({event.revision for event in events})
    assert revisions == list(range(1, revisions[-1] + 1)), revisions
