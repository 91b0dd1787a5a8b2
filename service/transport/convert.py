"""Domain records to protobuf messages, and the few request fields that need decoding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agentpost.environments.v1 import (
    api_key_pb2,
    environment_pb2,
    event_pb2,
    member_pb2,
    organization_pb2,
    resource_pb2,
)
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message

from service.domain.errors import InvalidArgument
from service.domain.events import Event
from service.domain.models import (
    ApiKey,
    Environment,
    EnvironmentMembership,
    KeyState,
    Member,
    Organization,
    ScopedResource,
)
from service.domain.validation import UpdateMask
from service.transport.memo import IdentityMemo

# The ranges google/protobuf/duration.proto and timestamp.proto define: about ±10,000 years, and
# 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MAX_DURATION_SECONDS = 315_576_000_000
_MIN_TIMESTAMP_SECONDS = -62_135_596_800
_MAX_TIMESTAMP_SECONDS = 253_402_300_799
_NANOS_PER_SECOND = 1_000_000_000


def to_timedelta(field: str, value: duration_pb2.Duration) -> timedelta:
    """A request's Duration as a timedelta; INVALID_ARGUMENT outside the range Duration defines
    (seconds within ±315,576,000,000, |nanos| below a second, both of the same sign).

    A timedelta holds microseconds: nanoseconds round away from zero, so a value past a bound by
    a nanosecond (-1 ns, 7 days + 1 ns) is still past it when the use case checks its range."""
    seconds, nanos = value.seconds, value.nanos
    if (
        abs(seconds) > _MAX_DURATION_SECONDS
        or abs(nanos) >= _NANOS_PER_SECOND
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise InvalidArgument.field(field, "is not a valid duration")
    micros = -(-abs(nanos) // 1000)
    return timedelta(seconds=seconds, microseconds=micros if nanos >= 0 else -micros)


def to_datetime(field: str, value: timestamp_pb2.Timestamp) -> datetime:
    """A request's Timestamp as an aware UTC datetime; INVALID_ARGUMENT outside the range
    Timestamp defines (years 1 to 9999, nanos in [0, 1e9))."""
    if (
        not _MIN_TIMESTAMP_SECONDS <= value.seconds <= _MAX_TIMESTAMP_SECONDS
        or not 0 <= value.nanos < _NANOS_PER_SECOND
    ):
        raise InvalidArgument.field(field, "is not a valid timestamp")
    return value.ToDatetime(tzinfo=UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp, or None (field left unset) for a missing time; a naive time is UTC.

    Worked out from the difference to the epoch: `Timestamp.FromDatetime` goes through a time
    tuple in pure Python, and every answer converts two to five of these."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    since = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000
    )


def organization(org: Organization) -> organization_pb2.Organization:
    """The wire form of an organization."""
    return organization_pb2.Organization(id=org.id, name=org.name, create_time=timestamp(org.create_time))


_ENVIRONMENTS: IdentityMemo[environment_pb2.Environment] = IdentityMemo()


def environment(env: Environment) -> environment_pb2.Environment:
    """The wire form of an environment (built once per Environment object, see memo)."""
    return _ENVIRONMENTS.get(env, None, lambda: _environment(env))


def _environment(env: Environment) -> environment_pb2.Environment:
    return environment_pb2.Environment(
        id=env.id,
        organization_id=env.organization_id,
        name=env.name,
        slug=env.slug,
        description=env.description,
        is_default=env.is_default,
        state=environment_pb2.Environment.DELETED if env.deleted else environment_pb2.Environment.ACTIVE,
        create_time=timestamp(env.create_time),
        update_time=timestamp(env.update_time),
        delete_time=timestamp(env.delete_time),
        etag=env.etag,
    )


def member(record: Member) -> member_pb2.Member:
    """The wire form of a member."""
    return member_pb2.Member(
        id=record.id,
        organization_id=record.organization_id,
        email=record.email,
        display_name=record.display_name,
        role=record.role.value,
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
        etag=record.etag,
    )


def environment_member(record: EnvironmentMembership) -> member_pb2.EnvironmentMember:
    """The wire form of a member's access to an environment."""
    return member_pb2.EnvironmentMember(
        environment_id=record.environment_id,
        member_id=record.member_id,
        role=record.role.value,
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
        etag=record.etag,
    )


def api_key(key: ApiKey, *, now: datetime, last_used_time: datetime | None) -> api_key_pb2.ApiKey:
    """The wire form of a key; `state` derived at `now`. Never carries the secret or its digest."""
    state: KeyState = key.state(now)
    return api_key_pb2.ApiKey(
        id=key.id,
        organization_id=key.organization_id,
        name=key.name,
        scopes=list(key.scopes),
        environment_ids=list(key.environment_ids),
        owner_member_id=key.owner_member_id or "",
        mode=key.mode.value,
        prefix=key.prefix,
        state=state.value,
        create_time=timestamp(key.create_time),
        update_time=timestamp(key.update_time),
        expire_time=timestamp(key.expire_time),
        last_used_time=timestamp(last_used_time),
        revoke_time=timestamp(key.revoke_time),
        etag=key.etag,
    )


def scoped_resource(resource: ScopedResource) -> resource_pb2.ScopedResource:
    """The wire form of a registered resource."""
    return resource_pb2.ScopedResource(
        kind=resource.kind.value,
        resource_id=resource.resource_id,
        organization_id=resource.organization_id,
        environment_id=resource.environment_id,
        display_name=resource.display_name,
        create_time=timestamp(resource.create_time),
        update_time=timestamp(resource.update_time),
    )


def event(record: Event) -> event_pb2.Event:
    """The wire form of an event, with the resource as it stood after the change (an API key's
    state as of the change, never a secret or digest)."""
    message = event_pb2.Event(
        id=record.id,
        organization_id=record.organization_id,
        revision=record.revision,
        create_time=timestamp(record.create_time),
        actor=event_pb2.Event.Actor(
            api_key_id=record.actor.api_key_id or "",
            member_id=record.actor.member_id or "",
            operator=record.actor.operator,
        ),
        request_id=record.request_id,
        action=record.action.value,
        resource_type=record.resource_type.value,
        resource_id=record.resource_id,
        environment_id=record.environment_id or "",
        changed_fields=list(record.changed_fields),
    )
    resource = record.resource
    if isinstance(resource, Organization):
        message.organization.CopyFrom(organization(resource))
    elif isinstance(resource, Environment):
        message.environment.CopyFrom(environment(resource))
    elif isinstance(resource, Member):
        message.member.CopyFrom(member(resource))
    elif isinstance(resource, EnvironmentMembership):
        message.environment_member.CopyFrom(environment_member(resource))
    elif isinstance(resource, ApiKey):
        message.api_key.CopyFrom(
            api_key(resource, now=record.create_time, last_used_time=resource.last_used_time)
        )
    else:
        message.scoped_resource.CopyFrom(scoped_resource(resource))
    return message


def update_mask(mask: field_mask_pb2.FieldMask, resource: Message) -> UpdateMask:
    """An Update request's mask with the fields the request sets (non-default or present)."""
    populated = frozenset(field.name for field, _ in resource.ListFields())
    return UpdateMask(tuple(mask.paths), populated)
