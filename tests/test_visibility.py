"""The one rule of who may see an event (service.domain.visibility), without a server."""

from __future__ import annotations

from datetime import UTC, datetime

from service.domain.events import Action, Actor, Event, environment_of, resource_id_of, resource_type_of
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
from service.domain.principal import OrgSnapshot, Principal
from service.domain.visibility import audience, visible

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ORG = Organization("org_1", "Acme", NOW)
ENV_A = Environment.new("org_1", "A", "a", "", NOW)
ENV_B = Environment.new("org_1", "B", "b", "", NOW)
MEMBER = Member.new("org_1", "m@example.com", "M", OrgRole.MEMBER, NOW)
SNAPSHOT = OrgSnapshot(ORG, 1, {ENV_A.id: ENV_A, ENV_B.id: ENV_B}, {MEMBER.id: MEMBER.role}, {})
EVERY_READ = (
    "environments:read",
    "members:read",
    "api_keys:read",
    "inboxes:read",
    "labels:read",
    "events:read",
)


def principal(scopes: tuple[str, ...] = EVERY_READ, environment_ids: tuple[str, ...] = ()) -> Principal:
    key = ApiKey.new("org_1", "k", scopes, environment_ids, None, KeyMode.LIVE, "ap_sk_live_x", NOW)
    return Principal.of(key, SNAPSHOT)


def event(resource: object, action: Action = Action.CREATED, previous: str | None = None) -> Event:
    return Event(
        id="evt_1",
        organization_id="org_1",
        revision=2,
        create_time=NOW,
        actor=Actor(),
        request_id="r",
        action=action,
        resource_type=resource_type_of(resource),  # type: ignore[arg-type]
        resource_id=resource_id_of(resource),  # type: ignore[arg-type]
        environment_id=environment_of(resource),  # type: ignore[arg-type]
        changed_fields=(),
        resource=resource,  # type: ignore[arg-type]
        previous_environment_id=previous,
    )


def inbox(environment_id: str, kind: ResourceKind = ResourceKind.INBOX) -> ScopedResource:
    return ScopedResource(kind, "i1", "org_1", environment_id, "", NOW, NOW)


def test_organization_level_events_need_an_organization_level_caller() -> None:
    everyone, limited = principal(), principal(environment_ids=(ENV_A.id,))
    for record in (ORG, MEMBER):
        assert visible(everyone, event(record)) is not None
        assert visible(limited, event(record)) is None
    assert visible(principal(scopes=("events:read",)), event(MEMBER)) is None  # members:read too


def test_environment_scoped_events_need_reach_and_the_read_scope() -> None:
    limited = principal(environment_ids=(ENV_A.id,))
    membership = EnvironmentMembership(ENV_A.id, MEMBER.id, EnvRole.MEMBER, NOW, NOW)
    for record in (ENV_A, membership, inbox(ENV_A.id)):
        assert visible(limited, event(record)) is not None
    for record in (
        ENV_B,
        EnvironmentMembership(ENV_B.id, MEMBER.id, EnvRole.MEMBER, NOW, NOW),
        inbox(ENV_B.id),
    ):
        assert visible(limited, event(record)) is None
    assert visible(limited, event(inbox(ENV_A.id, ResourceKind.MESSAGE))) is None  # no messages:read
    assert visible(principal(("events:read", "inboxes:read")), event(ENV_A)) is None


def test_keys_are_seen_only_when_all_their_environments_are_within_reach() -> None:
    limited = principal(environment_ids=(ENV_A.id,))

    def key(*environment_ids: str) -> ApiKey:
        return ApiKey.new("org_1", "x", ("inboxes:read",), environment_ids, None, KeyMode.LIVE, "p", NOW)

    assert visible(limited, event(key(ENV_A.id))) is not None
    assert visible(limited, event(key(ENV_A.id, ENV_B.id))) is None
    assert visible(limited, event(key())) is None  # organization-wide
    assert visible(principal(), event(key(ENV_A.id, ENV_B.id))) is not None


def test_a_reassignment_shows_each_side_only_its_own_environment() -> None:
    moved = event(inbox(ENV_B.id), Action.REASSIGNED, previous=ENV_A.id)
    source_only, target_only = principal(environment_ids=(ENV_A.id,)), principal(environment_ids=(ENV_B.id,))
    leaving = visible(source_only, moved)
    assert leaving is not None and leaving.environment_id == ENV_A.id
    assert isinstance(leaving.resource, ScopedResource) and leaving.resource.environment_id == ""
    assert leaving.previous_environment_id is None
    assert visible(target_only, moved) == moved
    other = principal(environment_ids=(Environment.new("org_1", "C", "c", "", NOW).id,))
    assert visible(other, moved) is None


def test_another_organizations_events_are_never_visible() -> None:
    foreign = Event(**{**event(ENV_A).__dict__, "organization_id": "org_2"})
    assert visible(principal(), foreign) is None


def test_the_audience_is_a_superset_of_what_is_visible() -> None:
    limited = principal(("events:read", "inboxes:read"), (ENV_A.id,))
    shown = audience(limited)
    assert shown.environment_ids == frozenset({ENV_A.id})
    assert {t.value for t in shown.resource_types} == {"SCOPED_RESOURCE"}
    assert audience(principal()).environment_ids is None
