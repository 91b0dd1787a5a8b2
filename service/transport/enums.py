"""Wire enums to domain enums, decoded by name in one place.

The use cases take `OrgRole`, `EnvRole`, `KeyMode` and `ResourceKind`, never protobuf numbers, so
nothing depends on the order in which a .proto declares its values. `*_UNSPECIFIED` (0) decodes to
None; a number the contract does not define is INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from agentpost.environments.v1 import api_key_pb2, event_pb2, member_pb2, resource_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from service.domain.errors import InvalidArgument
from service.domain.events import ResourceType
from service.domain.models import EnvRole, KeyMode, OrgRole, ResourceKind

E = TypeVar("E", bound=enum.Enum)


def _decode(wire: EnumTypeWrapper, domain: type[E], field: str, number: int) -> E | None:
    if number == 0:
        return None
    try:
        return domain[wire.Name(number)]
    except (ValueError, KeyError):
        names = ", ".join(member.name for member in domain)
        raise InvalidArgument.field(field, f"must be one of {names}") from None


def org_role(field: str, number: int) -> OrgRole | None:
    """A member's organization role."""
    return _decode(member_pb2.Member.Role, OrgRole, field, number)


def env_role(field: str, number: int) -> EnvRole | None:
    """A member's role in one environment."""
    return _decode(member_pb2.EnvironmentMember.Role, EnvRole, field, number)


def key_mode(field: str, number: int) -> KeyMode | None:
    """An API key's mode."""
    return _decode(api_key_pb2.ApiKey.Mode, KeyMode, field, number)


def resource_kind(field: str, number: int) -> ResourceKind | None:
    """A registered resource's kind."""
    return _decode(resource_pb2.ScopedResource.Kind, ResourceKind, field, number)


def resource_type(field: str, number: int) -> ResourceType | None:
    """The type of resource an event describes."""
    return _decode(event_pb2.Event.ResourceType, ResourceType, field, number)


def requested_kind(request: object) -> ResourceKind | None:
    """The resource kind a ResourceService request names, for the policy; None when it names
    none or an undefined one (the use case then refuses it with the field named)."""
    try:
        return resource_kind("kind", int(getattr(request, "kind", 0)))
    except InvalidArgument:
        return None
