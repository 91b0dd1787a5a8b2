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


def test_each_snapshot_keeps_its_own_order_when_later_ones_add_environments() -> None:
    first = replace(Environment.new(ORG.id, "First", "first", "", NOW), id="env_1")
    snapshot = OrgSnapshot(ORG, 1, {first.id: first}, {}, {})
    before = list(snapshot.ordered_environment_ids)
    later = replace(Environment.new(ORG.id, "Later", "later", "", NOW), id="env_2")  # appended
    grown = snapshot.applying([event(2, Action.CREATED, later)], 2)
    assert list(grown.ordered_environment_ids) == [first.id, later.id]
    assert list(snapshot.ordered_environment_ids) == before, "the older view must not grow"
    # The older snapshot taking another path gets a copy, not the newer one's list.
    other = replace(Environment.new(ORG.id, "Other", "other", "", NOW), id="env_3")
    branch = snapshot.applying([event(2, Action.CREATED, other)], 2)
    assert list(branch.ordered_environment_ids) == [first.id, other.id]
    assert list(grown.ordered_environment_ids) == [first.id, later.id]
    # An id that sorts before the others goes in its place.
    early = replace(Environment.new(ORG.id, "Early", "early", "", NOW), id="env_0")
    placed = grown.applying([event(3, Action.CREATED, early)], 3)
    assert list(placed.ordered_environment_ids) == ["env_0", first.id, later.id]
    assert placed.ordered_environment_ids[-1] == later.id and len(placed.ordered_environment_ids) == 3
