"""The organization snapshot's indexes, carried from one snapshot to the next by patching only
the changed environments, must equal what a snapshot built from scratch computes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from service.domain.events import Action, Actor, Event, environment_of, resource_id_of, resource_type_of
from service.domain.models import ApiKey, Environment, KeyMode, Organization, OrgRole
from service.domain.principal import OrgSnapshot, Principal

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ORG = Organization("org_1", "Acme", NOW)


def event(revision: int, action: Action, env: Environment) -> Event:
    return Event(
        id=f"evt_{revision}",
        organization_id=ORG.id,
        revision=revision,
        create_time=NOW,
        actor=Actor(),
        request_id="",
        action=action,
        resource_type=resource_type_of(env),
        resource_id=resource_id_of(env),
        environment_id=environment_of(env),
        changed_fields=(),
        resource=env,
    )


def indexes(snapshot: OrgSnapshot) -> tuple[object, ...]:
    return (
        dict(snapshot.slugs),
        set(snapshot.environment_ids),
        set(snapshot.active_environment_ids),
        list(snapshot.ordered_environment_ids),
        list(snapshot.ordered_active_environment_ids),
        snapshot.default_environment,
    )


def rebuilt(snapshot: OrgSnapshot) -> OrgSnapshot:
    return OrgSnapshot(
        snapshot.organization,
        snapshot.revision,
        dict(snapshot.environments),
        snapshot.member_roles,
        snapshot.environment_roles,
    )


def test_patched_indexes_equal_rebuilt_ones_through_create_delete_and_undelete() -> None:
    default = Environment.new(ORG.id, "Default", "default", "", NOW, is_default=True)
    others = [Environment.new(ORG.id, f"E{n}", f"e{n}", "", NOW) for n in range(5)]
    snapshot = OrgSnapshot(ORG, 1, {env.id: env for env in [default, *others[:3]]}, {}, {})
    indexes(snapshot)  # built, so the next snapshots carry them instead of building their own
    deleted = replace(others[1], delete_time=NOW + timedelta(seconds=1), version=2)
    steps = [
        [event(2, Action.CREATED, others[3])],
        [event(3, Action.DELETED, deleted)],
        [event(4, Action.CREATED, others[4]), event(4, Action.UPDATED, replace(others[0], name="Renamed"))],
        [event(5, Action.UNDELETED, replace(deleted, delete_time=None, version=3))],
    ]
    for revision, events in enumerate(steps, start=2):
        snapshot = snapshot.applying(events, revision)
        assert snapshot.revision == revision
        assert indexes(snapshot) == indexes(rebuilt(snapshot))
    assert others[1].id in snapshot.active_environment_ids
    assert snapshot.find_environment("e4") == others[4]
    assert snapshot.environments[others[0].id].name == "Renamed"


def test_a_deleted_environment_leaves_the_active_set_but_stays_visible() -> None:
    env = Environment.new(ORG.id, "Gone", "gone", "", NOW)
    snapshot = OrgSnapshot(ORG, 1, {env.id: env}, {}, {})
    indexes(snapshot)
    after = snapshot.applying([event(2, Action.DELETED, replace(env, delete_time=NOW, version=2))], 2)
    key = ApiKey.new(ORG.id, "k", ("environments:read",), (), None, KeyMode.LIVE, "ap_sk_live_x", NOW)
    who = Principal.of(key, after)
    assert env.id in who.visible_environment_ids and env.id not in who.allowed_environment_ids
    assert env.id in Principal.of(key, snapshot).allowed_environment_ids  # the old view is unchanged


def test_an_organization_wide_key_shares_the_snapshot_sets_and_a_scoped_one_gets_its_own() -> None:
    envs = [Environment.new(ORG.id, f"E{n}", f"e{n}", "", NOW) for n in range(3)]
    snapshot = OrgSnapshot(ORG, 1, {env.id: env for env in envs}, {"mem_1": OrgRole.MEMBER}, {})
    wide = ApiKey.new(ORG.id, "k", (), (), None, KeyMode.LIVE, "p", NOW)
    assert Principal.of(wide, snapshot).visible_environment_ids is snapshot.environment_ids
    scoped = replace(wide, environment_ids=(envs[1].id, "env_gone"))
    assert set(Principal.of(scoped, snapshot).visible_environment_ids) == {envs[1].id}
    # A MEMBER-owned organization-wide key reaches only what its owner was added to: nothing here.
    owned = replace(wide, owner_member_id="mem_1")
    assert not Principal.of(owned, snapshot).visible_environment_ids
