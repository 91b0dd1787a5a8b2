"""Who may see an event: the one rule ListEvents and WatchEvents both apply (SPEC §6).

An event is shown only to a caller that could read the resource it describes, judged with the
caller's access at the moment it is shown (a key whose reach shrank stops seeing what left it):

- the organization and its members: an organization-level caller (members also need
  `members:read`);
- an environment: `environments:read` and the environment within reach (deleted or not);
- a member's access to an environment: `members:read` and that environment within reach;
- an API key: `api_keys:read` and the key within reach (an organization-level caller reaches
  every key; any other caller only keys limited to environments all within its reach);
- a registered resource: its kind's `:read` scope and its environment active and within reach;
  one of a deleted environment only to an organization-level caller with `environments:read`,
  the only caller that can read it now (as an orphan) until it is reassigned.

A reassignment never reveals its other side. A caller reaching the resource's new environment
sees the event as recorded (it names only the new environment). A caller reaching only the
environment the resource left sees it leave: the event names the environment it left and the
resource's own environment is blank. A caller reaching neither sees nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from service.domain.events import Action, Event, ResourceType
from service.domain.models import ApiKey, ResourceKind, ScopedResource
from service.domain.principal import Principal

_AREAS = {
    ResourceType.ENVIRONMENT: "environments",
    ResourceType.MEMBER: "members",
    ResourceType.ENVIRONMENT_MEMBER: "members",
    ResourceType.API_KEY: "api_keys",
}
# Events of these types describe the organization itself: only organization-level callers see them.
_ORGANIZATION_LEVEL = frozenset({ResourceType.ORGANIZATION, ResourceType.MEMBER})


def read_scope(event: Event) -> str | None:
    """The scope that reading the event's resource needs; None for the organization itself."""
    if isinstance(event.resource, ScopedResource):
        return f"{event.resource.kind.scope_area}:read"
    area = _AREAS.get(event.resource_type)
    return None if area is None else f"{area}:read"


def visible(principal: Principal, event: Event) -> Event | None:
    """The event as the caller may see it, or None when it may not see it at all."""
    if event.organization_id != principal.organization_id:
        return None
    scope = read_scope(event)
    if scope is not None and not principal.has_scope(scope):
        return None
    if event.resource_type in _ORGANIZATION_LEVEL:
        return event if principal.organization_level else None
    if isinstance(event.resource, ApiKey):
        return event if principal.reaches_key(event.resource) else None
    if not isinstance(event.resource, ScopedResource):
        return event if event.environment_id in principal.visible_environment_ids else None
    if _reads_resources_of(principal, event.environment_id):
        return event
    if event.action is Action.REASSIGNED and _reads_resources_of(principal, event.previous_environment_id):
        return _leaving(event)
    return None


def _reads_resources_of(principal: Principal, environment_id: str | None) -> bool:
    """Whether the caller could read the registered resources of the environment now: an active
    one within reach (in its context), or a deleted one as an organization-level caller with
    `environments:read` (ListOrphanedResources). Deleting an environment hides its resources."""
    if environment_id is None:
        return False
    if environment_id in principal.allowed_environment_ids:
        return True
    return (
        principal.organization_level
        and principal.has_scope("environments:read")
        and environment_id in principal.visible_environment_ids
    )


def _leaving(event: Event) -> Event:
    """A reassignment as seen from the environment the resource left: where it went is blank."""
    assert isinstance(event.resource, ScopedResource)
    return replace(
        event,
        environment_id=event.previous_environment_id,
        resource=replace(event.resource, environment_id=""),
        previous_environment_id=None,
    )


@dataclass(frozen=True)
class Audience:
    """The events a caller may possibly see, coarsely, so storage can skip the rest: the
    resource types and kinds whose scope it holds, and its environments (None: every event of
    the organization may be visible). `visible` still decides each event."""

    resource_types: frozenset[ResourceType]
    kinds: frozenset[ResourceKind]
    environment_ids: frozenset[str] | None


def audience(principal: Principal) -> Audience:
    """What `visible` could let through for this caller."""
    kinds = frozenset(kind for kind in ResourceKind if principal.has_scope(f"{kind.scope_area}:read"))
    types = {
        resource_type
        for resource_type, area in _AREAS.items()
        if principal.has_scope(f"{area}:read")
        and (resource_type not in _ORGANIZATION_LEVEL or principal.organization_level)
    }
    if principal.organization_level:
        types.add(ResourceType.ORGANIZATION)
    if kinds:
        types.add(ResourceType.SCOPED_RESOURCE)
    reach = None if principal.organization_level else frozenset(principal.visible_environment_ids)
    return Audience(frozenset(types), kinds, reach)
