"""Prepared statements (storage.prepared) run on the driver, not through SQLAlchemy's execution:
each must read back exactly what SQLAlchemy reads for the same statement (values and their
types: timezone-aware times, booleans, JSON), on both databases. A statement that cannot be run
that way is refused where it is declared, not run wrongly."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest
from agentpost.environments.v1 import api_key_pb2, resource_pb2
from sqlalchemy import Select, bindparam, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from service.domain import keys
from service.storage import api_keys, environments, events, request_ids, resources
from service.storage.prepared import Plan, is_prepared
from service.storage.tables import ORGANIZATIONS, RESOURCES
from tests.harness import Harness, Org, auth

INBOX = resource_pb2.ScopedResource.Kind.INBOX


async def _read_both_ways(harness: Harness, statement: Select[Any], parameters: dict[str, Any]) -> list[Any]:
    """The statement's rows as run prepared, checked against the same statement run through
    SQLAlchemy (a copy, which is not declared prepared)."""
    assert is_prepared(statement)
    copy = statement.params()
    assert not is_prepared(copy)
    async with harness.app.database.read() as uow:
        driven = list(await uow.statements.execute(statement, parameters))
        through = list(await uow.statements.execute(copy, parameters))
    assert driven, "the statement found nothing to compare"
    assert [tuple(row) for row in driven] == [tuple(row) for row in through]
    for ours, theirs in zip(driven, through, strict=True):
        assert [type(value) for value in ours] == [type(value) for value in theirs]
        assert ours._fields == tuple(theirs._fields)
        for name in ours._fields:
            assert getattr(ours, name) == getattr(theirs, name)
            value = getattr(ours, name)
            if isinstance(value, datetime):
                assert value.utcoffset() is not None, f"{name} came back without its zone"
    return driven


async def test_prepared_statements_read_what_sqlalchemy_reads(harness: Harness, org: Org) -> None:
    key = await harness.api_keys.CreateApiKey(
        api_key_pb2.CreateApiKeyRequest(
            name="scoped", scopes=["inboxes:read"], environment_ids=[org.default_environment.id]
        ),
        metadata=auth(org.owner_secret),
    )
    request_id = str(uuid.uuid4())
    await harness.resources.RegisterResource(
        resource_pb2.RegisterResourceRequest(kind=INBOX, resource_id="prepared-1", request_id=request_id),
        metadata=auth(org.owner_secret, org.default_environment.id),
    )

    resource = await _read_both_ways(
        harness, resources._GET, {"organization_id": org.id, "kind": "INBOX", "resource_id": "prepared-1"}
    )
    assert resource[0].environment_id == org.default_environment.id
    environment = await _read_both_ways(
        harness,
        environments._GET,
        {"environment_id": org.default_environment.id, "environment_organization_id": org.id},
    )
    assert environment[0].is_default is True
    await _read_both_ways(harness, api_keys._GET, {"key_id": key.api_key.id, "key_organization_id": org.id})
    digest = harness.app.hasher.digest(key.secret)
    assert keys.parse(key.secret) is not None
    by_hash = await _read_both_ways(harness, api_keys._BY_HASH, {"secret_hash": digest})
    assert by_hash[0].scopes == ["inboxes:read"]
    await _read_both_ways(harness, api_keys._ENVIRONMENTS_OF, {"api_key_id": key.api_key.id})
    logged = await _read_both_ways(
        harness, events._AFTER, {"organization_id": org.id, "revision": 0, "up_to": 1_000, "limit": 100}
    )
    assert any(row.actor_operator for row in logged)
    await _read_both_ways(
        harness,
        events._SINCE,
        {"organization_id": org.id, "revision": 1, "sequence": 0, "up_to": 1_000, "limit": 100},
    )
    await _read_both_ways(
        harness,
        request_ids._FIND,
        {"scope": org.id, "operation": "RegisterResource", "request_id": request_id},
    )


@pytest.mark.parametrize(
    "dialect", [sqlite.dialect(), postgresql.asyncpg.dialect()], ids=["sqlite", "postgres"]
)
def test_a_statement_that_cannot_be_prepared_is_refused(dialect: Any) -> None:
    expanding = select(ORGANIZATIONS.c.id).where(ORGANIZATIONS.c.id.in_(bindparam("ids", expanding=True)))
    with pytest.raises(ValueError, match="expand"):
        Plan(expanding, dialect, ["ids"])
    # display_name has a default SQLAlchemy fills in at execution; a prepared INSERT would skip it.
    partial = insert(RESOURCES)
    named = ["organization_id", "kind", "resource_id", "environment_id", "create_time", "update_time"]
    with pytest.raises(ValueError, match="display_name"):
        Plan(partial, dialect, named)
    assert Plan(partial, dialect, [*named, "display_name"]).returns_rows is False


async def test_an_empty_list_of_rows_runs_nothing(harness: Harness, org: Org) -> None:
    """executemany of no rows writes nothing and fails nothing, inside a write as outside one."""
    async with harness.app.database.write(org.id) as uow:
        result = await uow.statements.execute(api_keys._INSERT_ENVIRONMENTS, [])
        assert list(result) == []
        assert (
            await uow.statements.scalar(api_keys._ENVIRONMENTS_OF, {"api_key_id": org.owner_key_id}) is None
        )
