"""SQLAlchemy models: the database is the source of truth for everything the service knows."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    bindparam,
    insert,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import FromClause

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with deterministic constraint names, so errors can be told apart."""

    metadata = MetaData(naming_convention=NAMING)


class OrganizationRow(Base):
    """An organization. `revision` rises with every write to anything of the organization."""

    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    revision: Mapped[int] = mapped_column(BigInteger, default=0)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())


class EnvironmentRow(Base):
    """An environment; `delete_time` set means soft-deleted. Slugs stay unique after deletion."""

    __tablename__ = "environments"
    __table_args__ = (UniqueConstraint("organization_id", "slug"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    slug: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())
    update_time: Mapped[datetime] = mapped_column(UtcDateTime())
    delete_time: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)


class MemberRow(Base):
    """A member; `email_key` is the caseless form of the email that uniqueness is decided on
    (`validation.email_key`; case folding can lengthen an address, hence its longer column)."""

    __tablename__ = "members"
    __table_args__ = (UniqueConstraint("organization_id", "email_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    email: Mapped[str] = mapped_column(String(254))
    email_key: Mapped[str] = mapped_column(String(1024))
    display_name: Mapped[str] = mapped_column(String(100), default="")
    role: Mapped[str] = mapped_column(String(10))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())
    update_time: Mapped[datetime] = mapped_column(UtcDateTime())
    version: Mapped[int] = mapped_column(Integer, default=1)


class EnvironmentMemberRow(Base):
    """A member's role in one environment; goes away with the member."""

    __tablename__ = "environment_members"
    __table_args__ = (PrimaryKeyConstraint("environment_id", "member_id"),)

    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id"))
    member_id: Mapped[str] = mapped_column(ForeignKey("members.id", ondelete="CASCADE"), index=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    role: Mapped[str] = mapped_column(String(10))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())
    update_time: Mapped[datetime] = mapped_column(UtcDateTime())
    version: Mapped[int] = mapped_column(Integer, default=1)


class ApiKeyRow(Base):
    """An API key. Only the digest of its secret is kept. `owner_member_id` has no foreign key on
    purpose: a key whose owner is deleted must stay tied to that owner and refuse (OWNER_REMOVED),
    never become an unowned key with more reach."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    owner_member_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    mode: Mapped[str] = mapped_column(String(4))
    prefix: Mapped[str] = mapped_column(String(12))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())
    update_time: Mapped[datetime] = mapped_column(UtcDateTime())
    expire_time: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    last_used_time: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revoke_time: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)


class ApiKeyEnvironmentRow(Base):
    """One environment a key may act in. A key with none is organization-wide."""

    __tablename__ = "api_key_environments"
    __table_args__ = (PrimaryKeyConstraint("api_key_id", "environment_id"),)

    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id"), index=True)


class ResourceRow(Base):
    """A registered resource of another service and its environment."""

    __tablename__ = "resources"
    __table_args__ = (
        PrimaryKeyConstraint("organization_id", "kind", "resource_id"),
        Index("ix_resources_environment", "environment_id", "kind", "resource_id"),
    )

    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    kind: Mapped[str] = mapped_column(String(20))
    # Ordered bytewise on every database, as SQLite orders text: ListResources pages in the same
    # order whatever collation a PostgreSQL database was created with (en-US would interleave
    # `A` and `a` and weigh `-` and `_` last).
    resource_id: Mapped[str] = mapped_column(
        String(128).with_variant(String(128, collation="C"), "postgresql")
    )
    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id"))
    display_name: Mapped[str] = mapped_column(String(200), default="")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())
    update_time: Mapped[datetime] = mapped_column(UtcDateTime())


class RequestIdRow(Base):
    """A create request's idempotency key and what it created (AIP-155)."""

    __tablename__ = "request_ids"
    __table_args__ = (PrimaryKeyConstraint("scope", "operation", "request_id"),)

    scope: Mapped[str] = mapped_column(String(40))
    operation: Mapped[str] = mapped_column(String(40))
    request_id: Mapped[str] = mapped_column(String(36))
    result_id: Mapped[str] = mapped_column(String(200))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())
    # A digest of what the request asked for (None: recorded before it was kept, or not compared).
    fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ServerSecretRow(Base):
    """A secret the servers of one database share, made once by whichever starts first."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())


class EventRow(Base):
    """One committed change of an organization: the log that caches, replicas and the audit log
    follow. (organization, revision, sequence) orders it; a revision holds one event per resource
    its write changed."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("organization_id", "revision", "sequence"),
        Index("ix_events_create_time", "create_time"),
        # The audit log's filters, each in the log's order.
        Index("ix_events_environment", "organization_id", "environment_id", "revision"),
        Index("ix_events_resource", "organization_id", "resource_id", "revision"),
        Index("ix_events_actor", "organization_id", "actor_api_key_id", "revision"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    revision: Mapped[int] = mapped_column(BigInteger)
    sequence: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())
    actor_api_key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    actor_member_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    actor_operator: Mapped[bool] = mapped_column(Boolean, default=False)
    request_id: Mapped[str] = mapped_column(String(128), default="")
    action: Mapped[str] = mapped_column(String(20))
    resource_type: Mapped[str] = mapped_column(String(30))
    resource_id: Mapped[str] = mapped_column(String(300))
    environment_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    changed_fields: Mapped[str] = mapped_column(Text, default="[]")
    resource: Mapped[str] = mapped_column(Text)
    # REASSIGNED: the environment the resource left (who may see the event depends on it).
    previous_environment_id: Mapped[str | None] = mapped_column(String(40), nullable=True)


def table_of(row_class: type[Base]) -> Table:
    """A mapped class's table, for Core statements: the write path uses them because the ORM's
    unit of work and identity map cost more than the statements themselves there."""
    table = row_class.__table__
    assert isinstance(table, Table)
    return table


ORGANIZATIONS = table_of(OrganizationRow)
ENVIRONMENTS = table_of(EnvironmentRow)
RESOURCES = table_of(ResourceRow)
REQUEST_IDS = table_of(RequestIdRow)
EVENTS = table_of(EventRow)
API_KEYS = table_of(ApiKeyRow)
API_KEY_ENVIRONMENTS = table_of(ApiKeyEnvironmentRow)
MEMBERS = table_of(MemberRow)
ENVIRONMENT_MEMBERS = table_of(EnvironmentMemberRow)


def insert_selecting(
    table: Table,
    taken: Mapping[str, ColumnElement[Any]] | None = None,
    prefix: str = "",
    source: FromClause | None = None,
    where: ColumnElement[bool] | None = None,
) -> Insert:
    """INSERT INTO `table` ... SELECT: the values of the columns named in `taken` are those
    expressions (read from `source`, or from what they name), the others bound parameters named
    `<prefix><column>`; a row is inserted only where `where` holds."""
    taken = taken or {}
    values = select(
        *(
            taken.get(column.name, bindparam(f"{prefix}{column.name}", type_=column.type))
            for column in table.c
        )
    )
    if source is not None:
        values = values.select_from(source)
    if where is not None:
        values = values.where(where)
    return insert(table).from_select([column.name for column in table.c], values)
