"""The event log's records: one event per resource a write changed, with the resource as it
stands after the change, numbered by the organization's revision.

The log is the one source that caches, other replicas and worker processes follow; its JSON form
of each resource can be read back into the domain record, so a follower applies an event without
another query. An API key's event carries its record, never a secret or a digest (the domain
record has neither).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from service.domain.models import (
    ApiKey,
    Environment,
    EnvironmentMembership,
    EnvRole,
    KeyMode,
    Member,
    Organization,
    OrgRole,
    ResourceKind,
    ScopedResource,
)


class Action(enum.StrEnum):
    """What happened to the resource."""

    CREATED = "CREATED"
    UPDATED = "UPDATED"
    DELETED = "DELETED"
    UNDELETED = "UNDELETED"
    REVOKED = "REVOKED"
    ROLLED = "ROLLED"
    ADDED = "ADDED"
    REMOVED = "REMOVED"
    REGISTERED = "REGISTERED"
    DEREGISTERED = "DEREGISTERED"
    REASSIGNED = "REASSIGNED"


class ResourceType(enum.StrEnum):
    """Which kind of record an event describes."""

    ORGANIZATION = "ORGANIZATION"
    ENVIRONMENT = "ENVIRONMENT"
    MEMBER = "MEMBER"
    ENVIRONMENT_MEMBER = "ENVIRONMENT_MEMBER"
    API_KEY = "API_KEY"
    SCOPED_RESOURCE = "SCOPED_RESOURCE"


Resource = Organization | Environment | Member | EnvironmentMembership | ApiKey | ScopedResource

_TYPES: dict[type[Any], ResourceType] = {
    Organization: ResourceType.ORGANIZATION,
    Environment: ResourceType.ENVIRONMENT,
    Member: ResourceType.MEMBER,
    EnvironmentMembership: ResourceType.ENVIRONMENT_MEMBER,
    ApiKey: ResourceType.API_KEY,
    ScopedResource: ResourceType.SCOPED_RESOURCE,
}
_CLASSES: dict[ResourceType, type[Any]] = {resource_type: cls for cls, resource_type in _TYPES.items()}

# Fields whose JSON form is an enum's value, by record type.
_ENUM_FIELDS: dict[type[Any], dict[str, type[enum.Enum]]] = {
    Member: {"role": OrgRole},
    EnvironmentMembership: {"role": EnvRole},
    ApiKey: {"mode": KeyMode},
    ScopedResource: {"kind": ResourceKind},
}
_TUPLE_FIELDS = frozenset({"scopes", "environment_ids"})
# Fields added after events were recorded, by record type, with the value such an event is read
# with. A member's access kept no version before migration 0008: its old events read as version
# 0, which no stored access has (they start at 1), so an etag taken from one never matches.
_LEGACY_VALUES: dict[type[Any], dict[str, Any]] = {EnvironmentMembership: {"version": 0}}
# Fields every change touches; they are never reported as changed.
_BOOKKEEPING = frozenset({"update_time", "version"})


@dataclass(frozen=True)
class Actor:
    """Who made a change: an API key (and the member owning it), or the operator token."""

    api_key_id: str | None = None
    member_id: str | None = None
    operator: bool = False


OPERATOR = Actor(operator=True)


@dataclass(frozen=True)
class Change:
    """One resource a write changed, as recorded in its unit of work before commit."""

    action: Action
    resource: Resource
    changed_fields: tuple[str, ...] = ()
    # A reassigned resource's environment before the move (the resource holds the new one).
    previous_environment_id: str | None = None


@dataclass(frozen=True)
class Event:
    """One committed change, as the log keeps it."""

    id: str
    organization_id: str
    revision: int
    create_time: datetime
    actor: Actor
    request_id: str
    action: Action
    resource_type: ResourceType
    resource_id: str
    environment_id: str | None
    changed_fields: tuple[str, ...]
    resource: Resource
    # REASSIGNED only: the environment the resource left. Kept for deciding who may see the
    # event (see `service.domain.visibility`); never shown as such on the wire.
    previous_environment_id: str | None = None


def resource_type_of(resource: Resource) -> ResourceType:
    """The resource type of a record."""
    return _TYPES[type(resource)]


def resource_id_of(resource: Resource) -> str:
    """The id an event names: the record's id; `environment_id/member_id` for an environment
    membership; `KIND:resource_id` for a registered resource."""
    if isinstance(resource, EnvironmentMembership):
        return f"{resource.environment_id}/{resource.member_id}"
    if isinstance(resource, ScopedResource):
        return f"{resource.kind.value}:{resource.resource_id}"
    return resource.id


def environment_of(resource: Resource) -> str | None:
    """The environment an event belongs to: the environment itself, a membership's or a
    registered resource's, a key's only environment; None for organization-level records."""
    if isinstance(resource, Environment):
        return resource.id
    if isinstance(resource, EnvironmentMembership | ScopedResource):
        return resource.environment_id
    if isinstance(resource, ApiKey) and len(resource.environment_ids) == 1:
        return resource.environment_ids[0]
    return None


def changed_fields(before: Resource, after: Resource) -> tuple[str, ...]:
    """The fields whose values differ between two versions of one record, in declaration order."""
    return tuple(
        field.name
        for field in fields(after)
        if field.name not in _BOOKKEEPING and getattr(before, field.name) != getattr(after, field.name)
    )


def encode(resource: Resource) -> dict[str, Any]:
    """The JSON form of a record: times as ISO 8601, enums as their values, tuples as lists."""
    encoded: dict[str, Any] = {}
    for field in fields(resource):
        value = getattr(resource, field.name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        encoded[field.name] = value
    return encoded


def decode(resource_type: ResourceType, data: Mapping[str, Any]) -> Resource:
    """The record a JSON form describes (see `encode`)."""
    cls = _CLASSES[resource_type]
    enums = _ENUM_FIELDS.get(cls, {})
    values: dict[str, Any] = {}
    legacy = _LEGACY_VALUES.get(cls, {})
    for field in fields(cls):
        if field.name not in data and field.name in legacy:
            values[field.name] = legacy[field.name]
            continue
        value = data[field.name]
        if value is not None and field.name.endswith("_time"):
            value = datetime.fromisoformat(value)
        elif field.name in enums:
            value = enums[field.name](value)
        elif field.name in _TUPLE_FIELDS:
            value = tuple(value)
        values[field.name] = value
    resource: Resource = cls(**values)
    return resource
