"""The Alembic migrations build exactly the schema the code declares (service/storage/tables.py),
on SQLite and on PostgreSQL: a column, index or constraint added to one and not the other fails
here, not in production on the first write that needs it."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from agentpost.environments.v1 import event_pb2, event_pb2_grpc
from agentpost.environments.v1 import member_pb2 as mem_pb
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from service.app.server import Application
from service.domain import validation
from service.storage import migrate
from service.storage.tables import EVENTS, MEMBERS, ORGANIZATIONS, REQUEST_IDS, Base
from tests.empty_database import empty_database
from tests.harness import Harness, Org, auth, every_event, fails
from tests.servers import Backend
from tests.writes import create_call


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    differences: list[Any] = compare_metadata(context, Base.metadata)
    return differences


async def test_the_migrations_build_the_schema_the_code_declares(backend: Backend, tmp_path: Path) -> None:
    """From an empty database, `migrate` to the newest revision, then compare the database with
    the declared tables: no table, column, type, index or constraint differs."""
    async with empty_database(backend, tmp_path) as database:
        app = Application(database.settings())
        try:
            await app.migrate()
            assert await migrate.pending(app.engine) is None
            async with app.engine.connect() as connection:
                differences = await connection.run_sync(_differences)
        finally:
            await app.engine.dispose()
    assert differences == []


async def test_request_ids_recorded_before_fingerprints_are_replayed_as_the_same(
    harness: Harness, org: Org
) -> None:
    """A request id recorded before migration 0005 has no fingerprint: its retry is answered the
    first result whatever it asks (nothing to compare with), while a recorded one refuses a retry
    that asks for something else."""
    request_id = str(uuid.uuid4())
    first = await create_call(harness, org.owner_secret, "Before", "before-0005", request_id)
    async with harness.app.engine.begin() as connection:
        cleared = await connection.execute(
            update(REQUEST_IDS).where(REQUEST_IDS.c.request_id == request_id).values(fingerprint=None)
        )
    assert cleared.rowcount == 1
    again = await create_call(harness, org.owner_secret, "Other", "other-slug", request_id)
    assert (again.id, again.slug) == (first.id, "before-0005")
    recorded = str(uuid.uuid4())
    await create_call(harness, org.owner_secret, "After", "after-0005", recorded)
    await fails(
        create_call(harness, org.owner_secret, "After", "after-0005-other", recorded),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )


async def test_upgrading_rekeys_stored_emails_caselessly(backend: Backend, tmp_path: Path) -> None:
    """Members stored while email keys were lower-cased get their caseless key from migration
    0006 (`Straße` lower-cased is `straße`, caselessly `strasse`), so an address stored before the
    upgrade and its upper-case spelling after it are one email; an ASCII key stays as it was.
    Downgrading puts the lower-cased keys back."""
    async with empty_database(backend, tmp_path) as database:
        app = Application(database.settings())
        try:
            await migrate.upgrade(app.engine, "0005")
            now = datetime.now(UTC)
            async with app.engine.begin() as connection:
                await connection.execute(insert(ORGANIZATIONS).values(id="org_m", name="M", create_time=now))
                for member_id, email in (("mem_1", "Straße@example.com"), ("mem_2", "Ada@example.com")):
                    await connection.execute(
                        insert(MEMBERS).values(
                            id=member_id,
                            organization_id="org_m",
                            email=email,
                            email_key=email.lower(),
                            role="MEMBER",
                            create_time=now,
                            update_time=now,
                        )
                    )
            await migrate.upgrade(app.engine)
            assert await _email_keys(app) == {"mem_1": "strasse@example.com", "mem_2": "ada@example.com"}
            assert validation.email_key("STRASSE@EXAMPLE.COM") == "strasse@example.com"
            await migrate.downgrade(app.engine, "0005")
            assert await _email_keys(app) == {"mem_1": "straße@example.com", "mem_2": "ada@example.com"}
        finally:
            await app.engine.dispose()


async def _email_keys(app: Application) -> dict[str, str]:
    async with app.engine.connect() as connection:
        rows = await connection.execute(select(MEMBERS.c.id, MEMBERS.c.email_key))
        return {member_id: key for member_id, key in rows}


async def test_access_events_recorded_before_versions_are_listed_and_their_etag_matches_no_grant(
    harness: Harness, org: Org
) -> None:
    """Events recorded before migration 0008 hold a member's access without a version. They are
    still listed, never refused as malformed, with an etag of their own (version 0) that no
    stored grant has: sent back, it is ABORTED ETAG_MISMATCH, while the stored grant's etag
    (version 1, where the migration starts existing grants) works."""
    env = await harness.new_environment(org, "Versions")
    member = await harness.new_member(org, "MEMBER")
    added = await harness.members.AddEnvironmentMember(
        mem_pb.AddEnvironmentMemberRequest(
            environment_id=env.id, member_id=member.id, role=mem_pb.EnvironmentMember.MEMBER
        ),
        metadata=auth(org.owner_secret),
    )
    pair = f"{env.id}/{member.id}"
    async with harness.app.engine.begin() as connection:
        rows = (
            await connection.execute(
                select(EVENTS.c.id, EVENTS.c.resource).where(
                    EVENTS.c.organization_id == org.id, EVENTS.c.resource_id == pair
                )
            )
        ).all()
        assert len(rows) == 1
        for event_id, resource in rows:
            recorded = json.loads(resource)
            assert recorded.pop("version") == 1
            await connection.execute(
                update(EVENTS).where(EVENTS.c.id == event_id).values(resource=json.dumps(recorded))
            )
    events = await every_event(
        event_pb2_grpc.EventServiceStub(harness.channel),
        auth(org.owner_secret),
        filters={"resource_type": event_pb2.Event.ENVIRONMENT_MEMBER},
    )
    (listed,) = [event for event in events if event.resource_id == pair]
    assert listed.action == event_pb2.Event.ADDED
    legacy = mem_pb.EnvironmentMember()
    legacy.CopyFrom(listed.environment_member)
    legacy_etag = legacy.etag
    assert legacy_etag and legacy_etag != added.etag
    legacy.ClearField("etag")
    expected = mem_pb.EnvironmentMember()
    expected.CopyFrom(added)
    expected.ClearField("etag")
    assert legacy == expected

    def promote(etag: str) -> Any:
        return harness.members.UpdateEnvironmentMember(
            mem_pb.UpdateEnvironmentMemberRequest(
                environment_member=mem_pb.EnvironmentMember(
                    environment_id=env.id, member_id=member.id, role=mem_pb.EnvironmentMember.ADMIN, etag=etag
                )
            ),
            metadata=auth(org.owner_secret),
        )

    await fails(promote(legacy_etag), grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    promoted = await promote(added.etag)
    assert promoted.role == mem_pb.EnvironmentMember.ADMIN and promoted.etag != added.etag
