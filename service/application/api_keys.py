"""The API key use cases: create, read, list, update, revoke, roll, and verify for other services.

No escalation, the rules every mutation obeys:

- A key is *within reach* of an organization-level caller when it belongs to the caller's
  organization; of any other caller only when it lists at least one environment and every one of
  them is visible to the caller. Organization-wide keys are thus reached only at organization
  level. A key out of reach is NOT_FOUND `API_KEY_NOT_FOUND`, exactly like a random id.
- A caller grants only scopes it holds (`SCOPE_ESCALATION`) and environments visible to it
  (`ENVIRONMENT_NOT_FOUND`) and active (`ENVIRONMENT_DELETED`); an organization-wide key needs an
  organization-level caller (`ORGANIZATION_KEY_REQUIRED`).
- A member-owned caller changes a key only when its owner may administer every environment of
  the key (`ENVIRONMENT_ADMIN_REQUIRED`), checked after reach.
- A member-owned caller that is not organization-level creates and rolls only keys owned by its
  own member (`OWNER_ESCALATION`), so no key it makes outlives that member's access.
- A key never acts above its owner. A key acts with its owner member's organization role, and as
  OWNER when no member owns it. Creating, rolling or widening a key (adding scopes or
  environments, making it organization-wide, extending or clearing its expiry) needs the caller
  to act with at least the role the key acts with (`OWNER_ESCALATION`): a key owned by an ADMIN
  makes keys owned by itself or by ADMIN and MEMBER members, never keys no member owns (an empty
  `owner_member_id` then means its own member) nor keys of an OWNER, and cannot roll or widen
  either. The target key's owner role is read inside the write transaction.
- Extending or clearing a key's expiry (which can revive an expired key) hands back access like a
  roll does, so it needs every scope the key has once updated (`SCOPE_ESCALATION`); shortening it
  needs nothing more than any other narrowing.
- A key that expires never makes a key that outlives it: a key it creates, rolls (the successor's
  secret is handed to it), or whose expiry it extends or clears (its own included), must expire
  no later than it does (`EXPIRY_ESCALATION`).
  A key handed out for an hour cannot leave a lasting one behind.
- Request ids of CreateApiKey are scoped to the calling key: the same id sent by another key is
  an independent request, and a replay never names a key created by someone else.
- A VerifyApiKey denial names the key and its organization, for the caller's logs, but nothing the
  key may do: no scopes, owner, environments or resolved environment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from service.application.dependencies import Dependencies
from service.application.environments import recheck_active
from service.application.idempotency import create_once, find_earlier
from service.domain import keys, scopes, validation
from service.domain.clock import utcnow
from service.domain.errors import (
    AlreadyExists,
    Denied,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    api_key_not_found,
    member_not_found,
)
from service.domain.events import Action, changed_fields
from service.domain.models import ApiKey, Environment, KeyMode, KeyState, OrgRole, check_etag
from service.domain.pagination import Page
from service.domain.principal import Denial, Principal, acting_role
from service.storage.api_keys import ApiKeyRepository
from service.storage.unit_of_work import UnitOfWork

MUTABLE_FIELDS: Final = ("name", "scopes", "environment_ids", "expire_time")
MAX_PREVIOUS_KEY_TTL: Final = timedelta(days=7)
CREATE: Final = "CreateApiKey"


@dataclass(frozen=True)
class NewKey:
    """A key just made, with its secret (shown once)."""

    key: ApiKey
    secret: str


@dataclass(frozen=True)
class RolledKey:
    """The outcome of a roll: the new key with its secret, and the previous key now expiring."""

    key: ApiKey
    secret: str
    previous: ApiKey


@dataclass(frozen=True)
class KeyChanges:
    """The values an UpdateApiKey request carries; only the fields in the mask are applied."""

    name: str
    scopes: Sequence[str]
    environment_ids: Sequence[str]
    expire_time: datetime | None


@dataclass(frozen=True)
class Verification:
    """VerifyApiKey's answer. A denial names at most the key and its organization (when the
    secret named a key), never what the key may do; `principal` and the resolved `environment`
    are set only on a valid answer. Build one with `denied` or `granted`."""

    denial: Denial | None
    key_id: str = ""
    organization_id: str = ""
    principal: Principal | None = None
    environment: Environment | None = None

    @classmethod
    def denied(cls, denial: Denial, key: ApiKey | None = None) -> Verification:
        """A refusal; `key` (when the secret named one) contributes only its id and organization,
        so a denial cannot tell a probing caller which scopes or environments would work."""
        if key is None:
            return cls(denial)
        return cls(denial, key_id=key.id, organization_id=key.organization_id)

    @classmethod
    def granted(cls, principal: Principal, environment: Environment) -> Verification:
        """The key may act in `environment` with every required scope."""
        return cls(
            None,
            key_id=principal.key.id,
            organization_id=principal.organization_id,
            principal=principal,
            environment=environment,
        )

    @property
    def valid(self) -> bool:
        """True when nothing was refused."""
        return self.denial is None


def within_reach(principal: Principal, key: ApiKey) -> bool:
    """Whether the caller reaches the key (see the module docstring); both of one organization."""
    return principal.reaches_key(key)


class ApiKeys:
    """The ApiKeyService use cases."""

    def __init__(self, dependencies: Dependencies) -> None:
        self._deps = dependencies

    # -- create -------------------------------------------------------------------------------

    async def create(
        self,
        principal: Principal,
        *,
        name: str,
        scope_names: Sequence[str],
        environment_ids: Sequence[str],
        owner_member_id: str,
        mode: KeyMode | None,
        expire_time: datetime | None,
        request_id: str,
    ) -> NewKey:
        """A new key and its secret. Mode unset means LIVE; `expire_time` must lie in the future.
        The new key must not act above the caller (see `_owner_of_new_key`). A `request_id`
        repeated by the same calling key is ALREADY_EXISTS `DUPLICATE_REQUEST` with the first
        key's id in the `keyId` metadata, because the secret cannot be shown twice; another key's
        request with the same id is independent of it."""
        now = utcnow()
        name = validation.name("name", name)
        granted = scopes.validate("scopes", scope_names, required=True)
        idempotency_key = validation.request_id(request_id)
        env_ids = _environment_ids("environment_ids", environment_ids)
        try:
            _check_expiry("expire_time", expire_time, now)
            _require_held(principal, granted)
            _require_outlived_by_caller(principal, expire_time)
            if not env_ids:
                principal.require_organization_level()
            for env_id in env_ids:
                principal.usable_environment(env_id)
            for env_id in env_ids:
                principal.require_administer(env_id)
            owner = _owner_of_new_key(principal, owner_member_id)
        except DomainError:
            # What made the first request pass may have changed since (its environment deleted,
            # its expiry passed): a retry still learns which key it made.
            if idempotency_key is not None:
                earlier = await find_earlier(self._deps.database, principal.key.id, CREATE, idempotency_key)
                if earlier is not None:
                    raise _duplicate_key(earlier.result_id) from None
            raise
        secret = keys.generate(mode or KeyMode.LIVE)
        key = ApiKey.new(
            principal.organization_id,
            name,
            granted,
            env_ids,
            owner,
            secret.mode,
            secret.prefix,
            now,
            expire_time,
        )

        async def insert(uow: UnitOfWork) -> str:
            if owner is not None:
                member = await uow.members.get(key.organization_id, owner)
                if member is None:
                    raise member_not_found(owner)
                principal.require_act_as(acting_role(member.role))
            for env_id in env_ids:
                await recheck_active(uow, principal.organization_id, env_id)
            await uow.api_keys.insert(key, self._deps.hasher.digest(secret.secret))
            uow.record(Action.CREATED, key)
            self._deps.access.remember(self._deps.hasher.digest(secret.secret))
            return key.id

        outcome = await create_once(
            self._deps.database,
            actor=principal.actor,
            organization_id=principal.organization_id,
            operation=CREATE,
            request_id=idempotency_key,
            create=insert,
            scope=principal.key.id,
            refuse=_duplicate_key,
        )
        assert outcome.created  # a retry is refused
        return NewKey(key, secret.secret)

    # -- read ---------------------------------------------------------------------------------

    async def get(self, principal: Principal, key_id: str) -> ApiKey:
        """One key within reach."""
        key_id = validation.required_id("id", key_id)
        async with self._deps.database.read() as uow:
            key = await uow.api_keys.get(principal.organization_id, key_id)
        if key is None or not within_reach(principal, key):
            raise api_key_not_found(key_id)
        return key

    async def list(
        self, principal: Principal, page_size: int, page_token: str, environment_id: str, show_revoked: bool
    ) -> Page[ApiKey]:
        """The keys within reach, ordered by id. `environment_id` (visible to the caller) keeps
        the keys that may act there: those listing it and organization-wide ones. Revoked keys
        are hidden unless `show_revoked`; expired ones are listed, with state EXPIRED."""
        request = self._deps.pager.request(
            page_size,
            page_token,
            ("ListApiKeys", principal.key.id, environment_id, show_revoked),
        )
        if environment_id:
            principal.visible_environment(environment_id)
        async with self._deps.database.read() as uow:
            fetched = await uow.api_keys.list_page(
                principal.organization_id,
                after=request.after[0] if request.after else "",
                limit=request.size + 1,
                reach=None if principal.organization_level else frozenset(principal.visible_environment_ids),
                environment_id=environment_id or None,
                show_revoked=show_revoked,
            )
        return self._deps.pager.page(request, fetched, lambda key: (key.id,))

    # -- change -------------------------------------------------------------------------------

    async def update(
        self, principal: Principal, key_id: str, changes: KeyChanges, mask: validation.UpdateMask, etag: str
    ) -> ApiKey:
        """Changes `name`, `scopes`, `environment_ids` and `expire_time` by the update-mask rule of
        every Update (`validation.update_fields`). `expire_time` in the mask while unset clears it.
        New values obey Create's no-escalation rules; scopes and environments the key already
        has may stay. Extending or clearing the expiry needs every scope the key has once
        updated, as a roll does. Any widening (scopes or environments added, organization-wide,
        expiry extended or cleared) needs the caller to act with at least the key's role
        (OWNER_ESCALATION). A revoked key cannot change; an expired one may be given a new
        expiry under those rules."""
        fields = validation.update_fields(mask, MUTABLE_FIELDS)
        now = utcnow()
        name = validation.name("api_key.name", changes.name) if "name" in fields else None
        new_scopes = (
            scopes.validate("api_key.scopes", changes.scopes, required=True) if "scopes" in fields else None
        )
        new_env_ids = (
            _environment_ids("api_key.environment_ids", changes.environment_ids)
            if "environment_ids" in fields
            else None
        )
        if "expire_time" in fields:
            _check_expiry("api_key.expire_time", changes.expire_time, now)
        key_id = validation.required_id("api_key.id", key_id)
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            repository = uow.api_keys
            current = await self._changeable(repository, principal, key_id)
            # Whether the caller may change the key at all comes before the etag: a stale etag
            # does not answer a caller that may not touch the key.
            role = await _require_outranks_or_equals(uow, principal, current)
            check_etag(etag, current.etag)
            if current.state(now) is KeyState.REVOKED:
                raise FailedPrecondition("a revoked key cannot be changed", reason="API_KEY_REVOKED")
            if new_scopes is not None:
                _require_held(principal, set(new_scopes) - set(current.scopes))
            if new_env_ids is not None:
                if not new_env_ids:
                    principal.require_organization_level()
                added = [env_id for env_id in new_env_ids if env_id not in current.environment_ids]
                for env_id in added:
                    principal.usable_environment(env_id)
                for env_id in added:
                    principal.require_administer(env_id)
                for env_id in added:
                    await recheck_active(uow, principal.organization_id, env_id)
            updated = current.revised(
                now,
                name=name if name is not None else current.name,
                scopes=new_scopes if new_scopes is not None else current.scopes,
                environment_ids=new_env_ids if new_env_ids is not None else current.environment_ids,
                expire_time=changes.expire_time if "expire_time" in fields else current.expire_time,
            )
            if not changed_fields(current, updated):
                # Nothing changes, so neither do the etag and update_time (as for environments).
                return current
            lives_longer = _lives_longer(current.expire_time, updated.expire_time)
            if lives_longer:
                _require_held(principal, updated.scopes)
                _require_outlived_by_caller(principal, updated.expire_time)
            if (lives_longer or _reaches_further(current, updated)) and role is None:
                raise _owner_removed()  # a key that acts as no one is not handed more
            await repository.save(updated)
            uow.record_update(current, updated)
        return updated

    async def revoke(self, principal: Principal, key_id: str, etag: str) -> ApiKey:
        """Revokes at once: this server refuses the key from the next call, other replicas
        within their cache refresh interval. Revoking a revoked key returns it unchanged."""
        key_id = validation.required_id("id", key_id)
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            repository = uow.api_keys
            current = await self._changeable(repository, principal, key_id)
            await _require_outranks_or_equals(uow, principal, current)
            check_etag(etag, current.etag)
            if current.revoke_time is not None:
                return current
            now = utcnow()
            revoked = current.revised(now, revoke_time=now)
            await repository.save(revoked)
            uow.record_update(current, revoked, Action.REVOKED)
        return revoked

    async def roll(
        self, principal: Principal, key_id: str, previous_key_ttl: timedelta | None, etag: str
    ) -> RolledKey:
        """A new key with the same name, scopes, environments, owner, mode and original
        `expire_time`; the previous key then expires at min(its expire_time, now + ttl) (unset or
        0: now), at most 7 days on. Rolling hands out a secret with the key's access, so the
        caller must hold all the key's scopes, act with at least the key's role (a key no member
        owns acts as OWNER) and, if member-owned below organization level, own it through the
        same member. A stale etag is ABORTED ETAG_MISMATCH. Both writes happen in one
        transaction."""
        ttl = previous_key_ttl or timedelta(0)
        if ttl < timedelta(0) or ttl > MAX_PREVIOUS_KEY_TTL:
            raise InvalidArgument.field("previous_key_ttl", "must be between 0 and 7 days")
        key_id = validation.required_id("id", key_id)
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            repository = uow.api_keys
            current = await self._changeable(repository, principal, key_id)
            now = utcnow()
            _require_held(principal, current.scopes)
            # The successor's secret goes to the caller: a key that expires gets no lasting one.
            _require_outlived_by_caller(principal, current.expire_time)
            caller_owner = principal.key.owner_member_id
            if (
                caller_owner is not None
                and not principal.organization_level
                and current.owner_member_id != caller_owner
            ):
                raise Denied("this key may only roll keys owned by its own member", reason="OWNER_ESCALATION")
            principal.require_act_as(await _acting_role_of_key(uow, current))
            # Whether the caller may roll the key at all, then the etag, then the key's state.
            check_etag(etag, current.etag)
            state = current.state(now)
            if state is KeyState.REVOKED:
                raise FailedPrecondition("a revoked key cannot be rolled", reason="API_KEY_REVOKED")
            if state is KeyState.EXPIRED:
                raise FailedPrecondition("an expired key cannot be rolled", reason="API_KEY_EXPIRED")
            secret = keys.generate(current.mode)
            successor = ApiKey.new(
                current.organization_id,
                current.name,
                current.scopes,
                current.environment_ids,
                current.owner_member_id,
                current.mode,
                secret.prefix,
                now,
                current.expire_time,
            )
            overlap_end = now + ttl
            previous = current.revised(
                now,
                expire_time=overlap_end
                if current.expire_time is None
                else min(current.expire_time, overlap_end),
            )
            await repository.save(previous)
            await repository.insert(successor, self._deps.hasher.digest(secret.secret))
            uow.record_update(current, previous, Action.ROLLED)
            uow.record(Action.CREATED, successor)
            self._deps.access.remember(self._deps.hasher.digest(secret.secret))
        return RolledKey(successor, secret.secret, previous)

    @staticmethod
    async def _changeable(repository: ApiKeyRepository, principal: Principal, key_id: str) -> ApiKey:
        """The key, if within reach and the caller may administer all its environments."""
        key = await repository.get(principal.organization_id, key_id)
        if key is None or not within_reach(principal, key):
            raise api_key_not_found(key_id)
        for env_id in key.environment_ids:
            principal.require_administer(env_id)
        return key

    # -- verify -------------------------------------------------------------------------------

    async def verify(
        self,
        secret: str,
        environment: str,
        required_scopes: Sequence[str],
        min_revision: int = 0,
        *,
        header_min_revision: int = 0,
    ) -> Verification:
        """Who the secret is and whether it may act in `environment` (id or slug; empty: the key's
        only environment, else the default one if usable) with every required scope. Checks run
        in that order: the key, the environment, the scopes. A malformed secret is refused from
        its checksum alone, a warm key without a database round trip. An unknown key and a key of
        another organization look the same; an environment of another organization is
        ENVIRONMENT_NOT_FOUND. Unknown required scopes are INVALID_ARGUMENT (never holdable).
        `min_revision` asks for an answer reflecting at least that revision of the organization;
        with a (validated) `x-agentpost-min-revision` header too, the higher counts."""
        required = scopes.validate("required_scopes", required_scopes, required=False)
        if min_revision < 0:
            raise InvalidArgument.field("min_revision", "must not be negative", reason="INVALID_MIN_REVISION")
        min_revision = max(min_revision, header_min_revision)
        if not secret:
            return Verification.denied(Denial.MALFORMED)
        outcome = await self._deps.access.authenticate(secret, min_revision=min_revision)
        if outcome.principal is None:
            assert outcome.denial is not None
            return Verification.denied(outcome.denial, outcome.key)
        principal = outcome.principal
        resolved = principal.resolve(environment or None)
        if not isinstance(resolved, Environment):
            return Verification.denied(resolved, principal.key)
        if any(not principal.has_scope(scope) for scope in required):
            return Verification.denied(Denial.SCOPE_MISSING, principal.key)
        return Verification.granted(principal, resolved)

    def last_used(self, key: ApiKey) -> datetime | None:
        """The key's last use to within a minute, including uses not yet written."""
        return self._deps.access.last_used(key)


def _require_held(principal: Principal, wanted: Iterable[str]) -> None:
    missing = sorted(scope for scope in wanted if not principal.has_scope(scope))
    if missing:
        raise Denied(
            f"a key can only grant scopes it holds; the caller lacks {', '.join(missing)}",
            reason="SCOPE_ESCALATION",
        )


def _require_outlived_by_caller(principal: Principal, expire_time: datetime | None) -> None:
    """A key that expires hands out no key life past its own (None: never expires)."""
    limit = principal.key.expire_time
    if limit is not None and (expire_time is None or expire_time > limit):
        raise Denied(
            f"a key that expires at {limit.isoformat()} cannot give a key a longer life",
            reason="EXPIRY_ESCALATION",
        )


def _owner_of_new_key(principal: Principal, requested: str) -> str | None:
    """The owner a key made by this caller gets. Below organization level a member-owned caller
    only makes keys of its own member (empty means that member). Otherwise empty means no owner
    when the caller acts as OWNER, else the caller's own member: a key no member owns acts as
    OWNER, which only an OWNER may hand out. A named owner's role is checked in the transaction."""
    caller_owner = principal.key.owner_member_id
    if caller_owner is not None and not principal.organization_level:
        if requested and requested != caller_owner:
            raise Denied("this key may only create keys owned by its own member", reason="OWNER_ESCALATION")
        return caller_owner
    if requested:
        return validation.required_id("owner_member_id", requested)
    if principal.may_act_as(acting_role(None)):
        return None
    return caller_owner


def _owner_removed() -> FailedPrecondition:
    return FailedPrecondition(
        "the member that owned the key left the organization", reason="API_KEY_OWNER_REMOVED"
    )


async def _acting_role_or_none(uow: UnitOfWork, key: ApiKey) -> OrgRole | None:
    """The role `key` acts with, its owner read in the current transaction so a concurrent
    promotion cannot slip past; None when its owner left (it acts as no one)."""
    if key.owner_member_id is None:
        return acting_role(None)
    owner = await uow.members.get(key.organization_id, key.owner_member_id)
    return None if owner is None else acting_role(owner.role)


async def _acting_role_of_key(uow: UnitOfWork, key: ApiKey) -> OrgRole:
    """The role `key` acts with; FAILED_PRECONDITION API_KEY_OWNER_REMOVED when its owner left."""
    role = await _acting_role_or_none(uow, key)
    if role is None:
        raise _owner_removed()
    return role


async def _require_outranks_or_equals(uow: UnitOfWork, principal: Principal, key: ApiKey) -> OrgRole | None:
    """A key changes or revokes only keys acting at most with its own role: an ADMIN's key
    cannot rename, narrow or revoke an OWNER's key, nor a key no member owns (which acts as
    OWNER); OWNER_ESCALATION. Returns that role; None for a key whose owner left, which acts
    as no one and stays revocable."""
    role = await _acting_role_or_none(uow, key)
    if role is not None:
        principal.require_act_as(role)
    return role


def _lives_longer(current: datetime | None, updated: datetime | None) -> bool:
    """Whether the new expiry extends the key's life (None: never expires); an expired key given
    any future expiry lives longer, so this also covers reviving one."""
    if current is None:
        return False
    return updated is None or updated > current


def _reaches_further(current: ApiKey, updated: ApiKey) -> bool:
    """Whether the update adds scopes or environments, or makes the key organization-wide."""
    if not set(updated.scopes) <= set(current.scopes):
        return True
    if updated.organization_wide:
        return not current.organization_wide
    return not current.organization_wide and not set(updated.environment_ids) <= set(current.environment_ids)


def _environment_ids(field: str, given: Sequence[str]) -> tuple[str, ...]:
    for env_id in given:
        validation.required_id(field, env_id)
    if len(given) > 1000:
        raise InvalidArgument.field(field, "must list at most 1000 environments")
    return tuple(sorted(set(given)))


def _check_expiry(field: str, expire_time: datetime | None, now: datetime) -> None:
    if expire_time is not None and expire_time <= now:
        raise InvalidArgument.field(field, "must lie in the future")


def _duplicate_key(key_id: str) -> AlreadyExists:
    """A CreateApiKey retry: it names the first key, whose secret cannot be shown again."""
    return AlreadyExists(
        "a key was already created with this request_id; its secret cannot be shown again",
        reason="DUPLICATE_REQUEST",
        metadata={"keyId": key_id},
    )
