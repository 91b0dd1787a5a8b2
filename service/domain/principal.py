"""Who a caller is and where it may act: one code path for the interceptor, VerifyApiKey and
every handler.

A key's reach is its environments (all of the organization's when it lists none), narrowed to
its owner's environments when a member owns it. Deleted environments stay *visible* to those
who reach them (to be listed with show_deleted and undeleted) but are never *usable*.

A key never acts above its owner: it acts with its owner member's organization role, and a key
no member owns acts as an OWNER. Whatever a caller makes or strengthens (a key it creates, rolls
or widens) must not act with a higher role than the caller's own (`Principal.may_act_as`).
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property
from typing import Final, overload

import immutables

from service.domain.errors import Denied, FailedPrecondition, Unauthenticated, environment_not_found
from service.domain.events import Action, Actor, Event, ResourceType
from service.domain.models import (
    ApiKey,
    Environment,
    EnvironmentMembership,
    EnvRole,
    KeyState,
    Member,
    Organization,
    OrgRole,
)


class Denial(enum.StrEnum):
    """Why a key may not act; the names are VerifyApiKeyResponse.DenialReason's."""

    MALFORMED = "MALFORMED"
    NOT_FOUND = "NOT_FOUND"
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"
    OWNER_REMOVED = "OWNER_REMOVED"
    ENVIRONMENT_NOT_FOUND = "ENVIRONMENT_NOT_FOUND"
    ENVIRONMENT_DELETED = "ENVIRONMENT_DELETED"
    ENVIRONMENT_NOT_ALLOWED = "ENVIRONMENT_NOT_ALLOWED"
    ENVIRONMENT_REQUIRED = "ENVIRONMENT_REQUIRED"
    SCOPE_MISSING = "SCOPE_MISSING"


_KEY_DENIAL_MESSAGES = {
    Denial.MALFORMED: "the API key is malformed",
    Denial.NOT_FOUND: "the API key is not known",
    Denial.REVOKED: "the API key was revoked",
    Denial.EXPIRED: "the API key has expired",
    Denial.OWNER_REMOVED: "the member that owned the API key left the organization",
}


def unauthenticated(denial: Denial) -> Unauthenticated:
    """The UNAUTHENTICATED error for a key that is not usable at all."""
    return Unauthenticated(_KEY_DENIAL_MESSAGES[denial], reason=f"API_KEY_{denial.value}")


# The records whose changes change who may do what; the others (keys are cached one by one,
# registered resources not at all) leave a snapshot as it is.
_ACCESS_TYPES = frozenset(
    {
        ResourceType.ORGANIZATION,
        ResourceType.ENVIRONMENT,
        ResourceType.MEMBER,
        ResourceType.ENVIRONMENT_MEMBER,
    }
)


class KeySet(AbstractSet[str]):
    """The keys of an immutable map as a set: membership and size without a copy."""

    __slots__ = ("_map",)

    def __init__(self, keys: Mapping[str, object]) -> None:
        self._map = keys

    def __contains__(self, item: object) -> bool:
        return item in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    @classmethod
    def _from_iterable(cls, items: Iterable[str]) -> frozenset[str]:  # type: ignore[override]
        return frozenset(items)


class OrderedIds(Sequence[str]):
    """The first `length` ids of a sorted list that only grows at its end, shared by successive
    snapshots: a snapshot that adds ids later than all it has appends them and takes a longer
    view, while the snapshots before it keep their shorter ones. Anything else (an id that sorts
    earlier, or a list already extended by another snapshot) gets a copy."""

    __slots__ = ("_ids", "_length")

    def __init__(self, ids: list[str], length: int) -> None:
        self._ids = ids
        self._length = length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return self._ids[: self._length][index]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("environment index out of range")
        return self._ids[index]

    def __iter__(self) -> Iterator[str]:
        return itertools.islice(self._ids, self._length)

    def with_ids(self, added: Iterable[str]) -> OrderedIds:
        """This order with `added` (ids not in it yet) in their places."""
        new = sorted(added)
        if not new:
            return self
        shared = len(self._ids) == self._length
        if shared and (not self._length or new[0] > self._ids[self._length - 1]):
            self._ids.extend(new)
            return OrderedIds(self._ids, self._length + len(new))
        ids = list(self)
        for env_id in new:
            bisect.insort(ids, env_id)
        return OrderedIds(ids, len(ids))


@dataclass(frozen=True)
class OrgSnapshot:
    """Everything about one organization that deciding access needs, read at one revision.

    Environments live in persistent maps (`immutables.Map`, a HAMT): the next snapshot shares
    all but the changed entries. Its indexes (slugs, id sets, the ordered ids, the default) are
    built on first use and, when built, carried into the next snapshot with only the changed
    environments patched in, so that neither a call nor a write costs in proportion to the
    organization's environments (only the ordered ids are copied, a memory copy).
    """

    organization: Organization
    revision: int
    environments: Mapping[str, Environment]
    member_roles: Mapping[str, OrgRole]
    environment_roles: Mapping[str, Mapping[str, EnvRole]]

    def __post_init__(self) -> None:
        if not isinstance(self.environments, immutables.Map):
            object.__setattr__(self, "environments", immutables.Map(self.environments))

    @property
    def _environment_map(self) -> immutables.Map[str, Environment]:
        environments = self.environments
        assert isinstance(environments, immutables.Map)
        return environments

    @cached_property
    def slugs(self) -> immutables.Map[str, str]:
        """Environment ids by slug (slugs never change and are never reused)."""
        return immutables.Map({env.slug: env.id for env in self.environments.values()})

    @cached_property
    def environment_ids(self) -> AbstractSet[str]:
        """Every environment, deleted ones included."""
        return KeySet(self.environments)

    @cached_property
    def _active(self) -> immutables.Map[str, None]:
        return immutables.Map({env.id: None for env in self.environments.values() if not env.deleted})

    @cached_property
    def active_environment_ids(self) -> AbstractSet[str]:
        """Every environment that is not deleted."""
        return KeySet(self._active)

    @cached_property
    def ordered_environment_ids(self) -> OrderedIds:
        """Every environment id in order (ids sort by creation), for pages."""
        ids = sorted(self.environments)
        return OrderedIds(ids, len(ids))

    @cached_property
    def ordered_active_environment_ids(self) -> Sequence[str]:
        """The active environment ids in order (VerifyApiKey lists them for wide keys)."""
        active = self._active
        return [env_id for env_id in self.ordered_environment_ids if env_id in active]

    @cached_property
    def default_environment(self) -> Environment | None:
        """The organization's default environment."""
        return next((env for env in self.environments.values() if env.is_default), None)

    @cached_property
    def _reaches(self) -> dict[frozenset[str], frozenset[str]]:
        return {}

    def shared(self, reach: frozenset[str]) -> frozenset[str]:
        """The one set of environment ids equal to `reach` that principals of this snapshot
        share: each key scoped to the same environments would otherwise hold a copy in the key
        cache (a set of one environment is 216 bytes)."""
        return self._reaches.setdefault(reach, reach)

    def find_environment(self, reference: str) -> Environment | None:
        """An environment by id or slug, deleted or not."""
        env = self.environments.get(reference)
        if env is None and reference in self.slugs:
            env = self.environments[self.slugs[reference]]
        return env

    def applying(self, events: Iterable[Event], revision: int) -> OrgSnapshot:
        """This snapshot with the changes of `events` (in commit order) applied, as of
        `revision`; itself when none of them touches access (a registered inbox, a key)."""
        relevant = [event for event in events if event.resource_type in _ACCESS_TYPES]
        if not relevant:
            return self
        organization = self.organization
        environments = self._environment_map
        roles = dict(self.member_roles)
        environment_roles = dict(self.environment_roles)
        changed: dict[str, Environment] = {}
        for event in relevant:
            resource = event.resource
            if isinstance(resource, Organization):
                organization = resource
            elif isinstance(resource, Environment):
                environments = environments.set(resource.id, resource)
                changed[resource.id] = resource
            elif isinstance(resource, Member):
                if event.action is Action.DELETED:
                    roles.pop(resource.id, None)
                    environment_roles.pop(resource.id, None)
                else:
                    roles[resource.id] = resource.role
            elif isinstance(resource, EnvironmentMembership):
                held = dict(environment_roles.get(resource.member_id, {}))
                if event.action is Action.REMOVED:
                    held.pop(resource.environment_id, None)
                else:
                    held[resource.environment_id] = resource.role
                environment_roles[resource.member_id] = held
        patched = OrgSnapshot(organization, revision, environments, roles, environment_roles)
        self._carry_indexes(patched, list(changed.values()))
        return patched

    def _carry_indexes(self, patched: OrgSnapshot, changed: Sequence[Environment]) -> None:
        """Gives `patched` the indexes this snapshot built, with the `changed` environments in."""
        built = self.__dict__
        into = patched.__dict__
        if not changed:
            into.update({name: value for name, value in built.items() if name in _INDEXES})
            return
        if "slugs" in built:
            slugs = self.slugs
            for env in changed:
                slugs = slugs.set(env.slug, env.id)
            into["slugs"] = slugs
        if "_active" in built:
            active = self._active
            for env in changed:
                if not env.deleted:
                    active = active.set(env.id, None)
                elif env.id in active:
                    active = active.delete(env.id)
            into["_active"] = active
        if "ordered_environment_ids" in built:
            into["ordered_environment_ids"] = self.ordered_environment_ids.with_ids(
                env.id for env in changed if env.id not in self.environments
            )
        if "default_environment" in built:
            into["default_environment"] = next(
                (env for env in changed if env.is_default), self.default_environment
            )

    def member_environment_ids(self, member_id: str) -> AbstractSet[str]:
        """The environments a member reaches: all for OWNER/ADMIN, else those it was added to."""
        role = self.member_roles.get(member_id)
        if role is None:
            return frozenset()
        if role.reaches_every_environment:
            return self.environment_ids
        return frozenset(self.environment_roles.get(member_id, {}))


# The snapshot's lazily built indexes (see OrgSnapshot).
_INDEXES = frozenset({"slugs", "_active", "ordered_environment_ids", "default_environment"})

_ROLE_RANK: Final = {OrgRole.MEMBER: 0, OrgRole.ADMIN: 1, OrgRole.OWNER: 2}


def acting_role(owner_role: OrgRole | None) -> OrgRole:
    """The role a key acts with, given its owner member's role; None (no member owns the key)
    acts as OWNER, since such a key outlives every member and answers to none."""
    return OrgRole.OWNER if owner_role is None else owner_role


def key_denial(key: ApiKey, snapshot: OrgSnapshot, now: datetime) -> Denial | None:
    """Why the key cannot be used at all, or None when it can."""
    state = key.state(now)
    if state is KeyState.REVOKED:
        return Denial.REVOKED
    if state is KeyState.EXPIRED:
        return Denial.EXPIRED
    if key.owner_member_id is not None and key.owner_member_id not in snapshot.member_roles:
        return Denial.OWNER_REMOVED
    return None


@dataclass(frozen=True, slots=True)  # one per cached key
class Principal:
    """An authenticated key, its organization snapshot and its reach."""

    key: ApiKey
    snapshot: OrgSnapshot
    visible_environment_ids: AbstractSet[str]
    allowed_environment_ids: AbstractSet[str]
    environment: Environment | None = None

    @classmethod
    def of(cls, key: ApiKey, snapshot: OrgSnapshot) -> Principal:
        """The principal of a usable key (see `key_denial`)."""
        owner = key.owner_member_id
        owner_role = None if owner is None else snapshot.member_roles.get(owner)
        owner_reaches_all = owner is None or (owner_role is not None and owner_role.reaches_every_environment)
        if key.organization_wide and owner_reaches_all:
            # The common case shares the snapshot's sets: nothing in proportion to its size.
            return cls(key, snapshot, snapshot.environment_ids, snapshot.active_environment_ids)
        # Otherwise the reach is a short list: the key's environments and/or its owner's.
        owner_environments: Mapping[str, EnvRole] = (
            {} if owner is None or owner_role is None else snapshot.environment_roles.get(owner, {})
        )
        candidates = owner_environments if key.organization_wide else key.environment_ids
        reach = snapshot.shared(
            frozenset(
                env_id
                for env_id in candidates
                if env_id in snapshot.environments and (owner_reaches_all or env_id in owner_environments)
            )
        )
        allowed = frozenset(env_id for env_id in reach if not snapshot.environments[env_id].deleted)
        allowed = reach if len(allowed) == len(reach) else snapshot.shared(allowed)
        return cls(key=key, snapshot=snapshot, visible_environment_ids=reach, allowed_environment_ids=allowed)

    def allowed_in_order(self) -> Sequence[str]:
        """The allowed environment ids, sorted (built once per snapshot for wide keys)."""
        if self.allowed_environment_ids is self.snapshot.active_environment_ids:
            return self.snapshot.ordered_active_environment_ids
        return sorted(self.allowed_environment_ids)

    @property
    def organization_id(self) -> str:
        """The caller's organization."""
        return self.key.organization_id

    @property
    def actor(self) -> Actor:
        """Who the event log says made a change: this key and the member owning it."""
        return Actor(api_key_id=self.key.id, member_id=self.key.owner_member_id)

    @property
    def owner_role(self) -> OrgRole | None:
        """The owning member's organization role; None for a key no member owns."""
        if self.key.owner_member_id is None:
            return None
        return self.snapshot.member_roles.get(self.key.owner_member_id)

    @property
    def acting_role(self) -> OrgRole:
        """The role this key acts with: its owner's, OWNER when no member owns it. An owner
        missing from the snapshot (never so for a usable key) fails closed, as the least role."""
        if self.key.owner_member_id is not None and self.owner_role is None:
            return OrgRole.MEMBER
        return acting_role(self.owner_role)

    @property
    def organization_level(self) -> bool:
        """May make organization-level calls: an organization-wide key whose owner, if any, is
        an OWNER or ADMIN."""
        return self.key.organization_wide and self.acting_role.reaches_every_environment

    def may_act_as(self, role: OrgRole) -> bool:
        """Whether this key may create, change, roll or revoke a key that acts as `role` (see
        `acting_role`): only when its own acting role is at least as high."""
        return _ROLE_RANK[self.acting_role] >= _ROLE_RANK[role]

    def require_act_as(self, role: OrgRole) -> None:
        """PERMISSION_DENIED OWNER_ESCALATION unless `may_act_as(role)`."""
        if not self.may_act_as(role):
            raise Denied(
                f"a key acting as {self.acting_role} cannot create, change, roll or revoke a key acting as {role}"
                " (a key no member owns acts as OWNER)",
                reason="OWNER_ESCALATION",
            )

    def has_scope(self, scope: str) -> bool:
        """True when the key holds `scope`."""
        return scope in self.key.scopes

    def require_scope(self, scope: str) -> None:
        """PERMISSION_DENIED with reason SCOPE_MISSING unless the key holds `scope`."""
        if scope not in self.key.scopes:
            raise Denied(f"the API key lacks the scope {scope}", reason="SCOPE_MISSING")

    def require_organization_level(self) -> None:
        """PERMISSION_DENIED unless this principal may make organization-level calls."""
        if not self.organization_level:
            raise Denied(
                "this call needs an organization-wide key whose owner, if any, is an OWNER or ADMIN",
                reason="ORGANIZATION_KEY_REQUIRED",
            )

    def reaches_key(self, key: ApiKey) -> bool:
        """Whether the caller may see the key: every key of its organization at organization
        level, else only keys limited to environments all within its reach."""
        if key.organization_id != self.organization_id:
            return False
        if self.organization_level:
            return True
        return not key.organization_wide and set(key.environment_ids) <= self.visible_environment_ids

    def visible_environment(self, environment_id: str) -> Environment:
        """An environment within reach, deleted or not; NOT_FOUND otherwise, as for a random id."""
        env = self.snapshot.environments.get(environment_id)
        if env is None or env.id not in self.visible_environment_ids:
            raise environment_not_found(environment_id)
        return env

    def usable_environment(self, environment_id: str) -> Environment:
        """An active environment within reach. A deleted one within reach is FAILED_PRECONDITION
        ENVIRONMENT_DELETED; anything else NOT_FOUND."""
        env = self.visible_environment(environment_id)
        if env.deleted:
            raise FailedPrecondition(f"environment {env.id} is deleted", reason="ENVIRONMENT_DELETED")
        return env

    def may_administer(self, environment_id: str) -> bool:
        """Whether changes to the environment's members and keys are allowed: a key no member
        owns, or whose owner is an organization OWNER/ADMIN or the environment's ADMIN."""
        if environment_id not in self.visible_environment_ids:
            return False
        member_id = self.key.owner_member_id
        if member_id is None:
            return True
        role = self.snapshot.member_roles.get(member_id)
        if role is not None and role.reaches_every_environment:
            return True
        return self.snapshot.environment_roles.get(member_id, {}).get(environment_id) is EnvRole.ADMIN

    def require_administer(self, environment_id: str) -> None:
        """PERMISSION_DENIED unless `may_administer`; call after the environment was found."""
        if not self.may_administer(environment_id):
            raise Denied(
                "the key's owner must be an ADMIN of this environment or of the organization",
                reason="ENVIRONMENT_ADMIN_REQUIRED",
            )

    def resolve(self, reference: str | None) -> Environment | Denial:
        """The environment a call acts in: the named one (id or slug), else the key's only
        environment, else the organization's default if usable; or why none can be used."""
        if reference:
            env = self.snapshot.find_environment(reference)
            if env is None:
                return Denial.ENVIRONMENT_NOT_FOUND
        elif len(self.key.environment_ids) == 1:
            env = self.snapshot.environments.get(self.key.environment_ids[0])
            if env is None:
                return Denial.ENVIRONMENT_REQUIRED
        else:
            env = self.snapshot.default_environment
            if env is None or env.id not in self.allowed_environment_ids:
                return Denial.ENVIRONMENT_REQUIRED
        if env.id not in self.visible_environment_ids:
            return Denial.ENVIRONMENT_NOT_ALLOWED
        if env.deleted:
            return Denial.ENVIRONMENT_DELETED
        return env

    def in_context(self, reference: str | None) -> Principal:
        """This principal acting in the environment `reference` names (see `resolve`), or the
        error a call gets: NOT_FOUND for an environment out of reach, exactly as for one that
        does not exist."""
        outcome = self.resolve(reference)
        if isinstance(outcome, Environment):
            return replace(self, environment=outcome)
        if outcome is Denial.ENVIRONMENT_REQUIRED:
            raise FailedPrecondition(
                "name an environment in the x-agentpost-environment metadata", reason="ENVIRONMENT_REQUIRED"
            )
        if outcome is Denial.ENVIRONMENT_DELETED:
            raise FailedPrecondition("the environment is deleted", reason="ENVIRONMENT_DELETED")
        raise environment_not_found(reference or "")

    @property
    def context_environment(self) -> Environment:
        """The environment resolved for this call; only set for context-scoped methods."""
        if self.environment is None:  # pragma: no cover - guarded by the policy table
            raise FailedPrecondition("no environment context", reason="ENVIRONMENT_REQUIRED")
        return self.environment
