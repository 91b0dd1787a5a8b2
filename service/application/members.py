"""The membership use cases: an organization's members, and their access to environments.

Rules the contract leaves open, decided here:

- Only an owner-level caller (an organization-level key that no member owns, or one owned by an
  OWNER) may create an OWNER, promote to OWNER, or change or delete an OWNER member; anyone else
  gets PERMISSION_DENIED reason OWNER_REQUIRED, so an ADMIN cannot make itself or others OWNER.
- Email is immutable; UpdateMember changes `display_name` and/or `role` by the update-mask rule
  of every Update (`validation.update_fields`).
- The last OWNER can be neither demoted nor deleted (FAILED_PRECONDITION LAST_OWNER). Owners are
  counted inside the write transaction, which the organization's revision lock serializes, so two
  concurrent demotions of the last two owners cannot both succeed.
- DeleteMember is a hard delete; the member's environment memberships go with it, and keys it
  owns stay stored but refuse with OWNER_REMOVED.
- A member is visible to an organization-level caller always; to any other caller when the
  member reaches an environment the caller reaches (OWNER/ADMIN members reach all), or when it is
  the caller's own owner. Anything else is NOT_FOUND MEMBER_NOT_FOUND, as for a random id.
- Environment membership writes need the environment within reach (NOT_FOUND), then the right to
  administer it (PERMISSION_DENIED ENVIRONMENT_ADMIN_REQUIRED), then an active environment
  (FAILED_PRECONDITION ENVIRONMENT_DELETED), then the member in the organization (NOT_FOUND
  MEMBER_NOT_FOUND). Whoever administers the environment may add any member of the
  organization by id (ids are unguessable; an unknown id and another organization's are the
  same NOT_FOUND); listing the organization's members stays organization-level.
- ListMemberEnvironments lists the active environments the member reaches that the caller also
  reaches.
"""

from __future__ import annotations

from service.application.dependencies import Dependencies
from service.application.environments import recheck_active
from service.application.idempotency import create_or_replay
from service.domain import validation
from service.domain.clock import utcnow
from service.domain.errors import (
    Denied,
    FailedPrecondition,
    InvalidArgument,
    environment_member_not_found,
    member_not_found,
)
from service.domain.events import Action, changed_fields
from service.domain.models import Environment, EnvironmentMembership, EnvRole, Member, OrgRole, check_etag
from service.domain.pagination import Page
from service.domain.principal import Principal
from service.storage.members import MemberRepository
from service.storage.unit_of_work import UnitOfWork

MUTABLE_FIELDS = frozenset({"display_name", "role"})
DISPLAY_NAME_MAX = 100


def is_owner_level(principal: Principal) -> bool:
    """An organization-level key that no member owns, or one owned by an OWNER: one that acts as
    OWNER (the same rank rule that governs keys)."""
    return principal.organization_level and principal.may_act_as(OrgRole.OWNER)


def require_owner_level(principal: Principal) -> None:
    """PERMISSION_DENIED OWNER_REQUIRED unless `is_owner_level`."""
    if not is_owner_level(principal):
        raise Denied(
            "only an OWNER (or an organization key no member owns) may create, change or remove OWNERs",
            reason="OWNER_REQUIRED",
        )


def member_visible(principal: Principal, member_id: str) -> bool:
    """Whether the caller may see the member (see the module docstring), from its snapshot."""
    if principal.organization_level:
        return True
    if member_id not in principal.snapshot.member_roles:
        return False
    if member_id == principal.key.owner_member_id:
        return True
    return bool(principal.snapshot.member_environment_ids(member_id) & principal.visible_environment_ids)


class Members:
    """Create, read, update and delete members; grant, change and take environment access."""

    def __init__(self, dependencies: Dependencies) -> None:
        self._deps = dependencies

    # -- organization members ------------------------------------------------------------------

    async def create(
        self,
        principal: Principal,
        email: str,
        display_name: str,
        role: OrgRole | None,
        request_id: str,
    ) -> Member:
        """A new member. Email unique case-insensitively (ALREADY_EXISTS EMAIL_TAKEN); creating an
        OWNER needs an owner-level caller; a retry with the same request_id returns the first."""
        email = validation.email("email", email)
        display_name = validation.text(
            "display_name", display_name, max_length=DISPLAY_NAME_MAX, required=False
        )
        if role is None:
            raise InvalidArgument.field("role", "must be OWNER, ADMIN or MEMBER")
        idempotency_key = validation.request_id(request_id)
        if role is OrgRole.OWNER:
            require_owner_level(principal)
        now = utcnow()
        member = Member.new(principal.organization_id, email, display_name, role, now)

        async def insert(uow: UnitOfWork) -> str:
            await uow.members.insert(member)
            uow.record(Action.CREATED, member)
            return member.id

        async def load(uow: UnitOfWork, member_id: str) -> Member | None:
            return await uow.members.get(principal.organization_id, member_id)

        # A retry after the first call's member was deleted finds nothing: MEMBER_NOT_FOUND.
        return await create_or_replay(
            self._deps.database,
            actor=principal.actor,
            organization_id=principal.organization_id,
            operation="CreateMember",
            request_id=idempotency_key,
            created=member,
            insert=insert,
            load=load,
            gone=member_not_found,
            asked=(email, display_name, role.value),
        )

    async def get(self, principal: Principal, member_id: str) -> Member:
        """One member the caller may see."""
        validation.required_id("id", member_id)
        if not member_visible(principal, member_id):
            raise member_not_found(member_id)
        async with self._deps.database.read() as uow:
            member = await uow.members.get(principal.organization_id, member_id)
        if member is None:
            raise member_not_found(member_id)
        return member

    async def list(self, principal: Principal, page_size: int, page_token: str) -> Page[Member]:
        """The organization's members, ordered by id (an organization-level call)."""
        request = self._deps.pager.request(page_size, page_token, ("ListMembers", principal.key.id))
        after = request.after[0] if request.after else ""
        async with self._deps.database.read() as uow:
            fetched = await uow.members.page(principal.organization_id, after, request.size + 1)
        return self._deps.pager.page(request, fetched, lambda member: (member.id,))

    async def update(
        self,
        principal: Principal,
        member_id: str,
        display_name: str,
        role: OrgRole | None,
        mask: validation.UpdateMask,
        etag: str,
    ) -> Member:
        """Changes `display_name` and/or `role` as the mask says; nothing else ever changes.
        Touching an OWNER or promoting to OWNER needs an owner-level caller; demoting the last
        OWNER is LAST_OWNER."""
        fields = validation.update_fields(mask, MUTABLE_FIELDS)
        new_display_name = (
            validation.text("member.display_name", display_name, max_length=DISPLAY_NAME_MAX, required=False)
            if "display_name" in fields
            else None
        )
        if "role" in fields and role is None:
            raise InvalidArgument.field("member.role", "must be OWNER, ADMIN or MEMBER")
        new_role = role if "role" in fields else None
        validation.required_id("member.id", member_id)
        if new_role is OrgRole.OWNER:
            require_owner_level(principal)
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            repository = uow.members
            current = await _changeable(repository, principal, member_id, etag)
            demoted = current.role is OrgRole.OWNER and new_role not in (None, OrgRole.OWNER)
            if demoted:
                await _require_another_owner(repository, principal.organization_id)
            updated = current.revised(
                utcnow(),
                display_name=new_display_name if new_display_name is not None else current.display_name,
                role=new_role or current.role,
            )
            if not changed_fields(current, updated):
                # Nothing changes, so neither do the etag and update_time (as for environments).
                return current
            await repository.save(updated)
            uow.record_update(current, updated)
        return updated

    async def delete(self, principal: Principal, member_id: str, etag: str) -> None:
        """Removes the member and its environment access; its keys then refuse (OWNER_REMOVED).
        Removing an OWNER needs an owner-level caller; the last OWNER cannot be removed."""
        validation.required_id("id", member_id)
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            repository = uow.members
            current = await _changeable(repository, principal, member_id, etag)
            if current.role is OrgRole.OWNER:
                await _require_another_owner(repository, principal.organization_id)
            for membership in await repository.delete(principal.organization_id, member_id):
                uow.record(Action.REMOVED, membership)
            uow.record(Action.DELETED, current)

    # -- environment access ------------------------------------------------------------------

    async def add_environment_member(
        self, principal: Principal, environment_id: str, member_id: str, role: EnvRole | None
    ) -> EnvironmentMembership:
        """Gives a member access to an environment; the same pair twice is ALREADY_EXISTS
        ENVIRONMENT_MEMBER_EXISTS (the primary key decides, so concurrent adds have one winner)."""
        validation.required_id("environment_id", environment_id)
        validation.required_id("member_id", member_id)
        if role is None:
            raise InvalidArgument.field("role", "must be ADMIN or MEMBER")
        self._administered_environment(principal, environment_id)
        now = utcnow()
        membership = EnvironmentMembership(
            environment_id=environment_id, member_id=member_id, role=role, create_time=now, update_time=now
        )
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            await recheck_active(uow, principal.organization_id, environment_id)
            repository = uow.members
            # Any member of the organization, by id: ids are unguessable, and an unknown id and
            # another organization's are the same NOT_FOUND.
            if await repository.get(principal.organization_id, member_id) is None:
                raise member_not_found(member_id)
            await repository.insert_membership(principal.organization_id, membership)
            uow.record(Action.ADDED, membership)
        return membership

    async def list_environment_members(
        self, principal: Principal, environment_id: str, page_size: int, page_token: str
    ) -> Page[EnvironmentMembership]:
        """The members given access to an environment within reach, ordered by member id."""
        validation.required_id("environment_id", environment_id)
        request = self._deps.pager.request(
            page_size,
            page_token,
            ("ListEnvironmentMembers", principal.key.id, environment_id),
        )
        principal.visible_environment(environment_id)
        after = request.after[0] if request.after else ""
        async with self._deps.database.read() as uow:
            fetched = await uow.members.memberships_page(
                principal.organization_id, environment_id, after, request.size + 1
            )
        return self._deps.pager.page(request, fetched, lambda membership: (membership.member_id,))

    async def update_environment_member(
        self,
        principal: Principal,
        environment_id: str,
        member_id: str,
        role: EnvRole | None,
        mask: validation.UpdateMask,
        etag: str,
    ) -> EnvironmentMembership:
        """Changes a member's role in an environment; the mask is `role` (or empty, meaning role).
        A stale etag is ABORTED ETAG_MISMATCH, checked before the role is compared."""
        validation.update_fields(mask, ("role",))
        validation.required_id("environment_member.environment_id", environment_id)
        validation.required_id("environment_member.member_id", member_id)
        if role is None:
            raise InvalidArgument.field("environment_member.role", "must be ADMIN or MEMBER")
        self._administered_environment(principal, environment_id)
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            await recheck_active(uow, principal.organization_id, environment_id)
            repository = uow.members
            current = await _changeable_access(repository, principal, environment_id, member_id, etag)
            if role is current.role:
                return current  # nothing changes, update_time included
            updated = current.revised(utcnow(), role=role)
            await repository.save_membership(principal.organization_id, updated)
            uow.record(Action.UPDATED, updated, ("role",))
        return updated

    async def remove_environment_member(
        self, principal: Principal, environment_id: str, member_id: str, etag: str
    ) -> None:
        """Takes an environment away from a member; keys it owns lose it on their next call. A
        stale etag is ABORTED ETAG_MISMATCH."""
        validation.required_id("environment_id", environment_id)
        validation.required_id("member_id", member_id)
        self._administered_environment(principal, environment_id)
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            await recheck_active(uow, principal.organization_id, environment_id)
            repository = uow.members
            removed = await _changeable_access(repository, principal, environment_id, member_id, etag)
            await repository.delete_membership(principal.organization_id, environment_id, member_id)
            uow.record(Action.REMOVED, removed)

    def list_member_environments(
        self, principal: Principal, member_id: str, page_size: int, page_token: str
    ) -> Page[Environment]:
        """The active environments a visible member reaches that the caller reaches too, by id."""
        validation.required_id("member_id", member_id)
        request = self._deps.pager.request(
            page_size,
            page_token,
            ("ListMemberEnvironments", principal.key.id, member_id),
        )
        snapshot = principal.snapshot
        if member_id not in snapshot.member_roles or not member_visible(principal, member_id):
            raise member_not_found(member_id)
        after = request.after[0] if request.after else ""
        candidates = sorted(
            env_id
            for env_id in snapshot.member_environment_ids(member_id) & principal.allowed_environment_ids
            if env_id > after
        )
        fetched = [snapshot.environments[env_id] for env_id in candidates[: request.size + 1]]
        return self._deps.pager.page(request, fetched, lambda env: (env.id,))

    @staticmethod
    def _administered_environment(principal: Principal, environment_id: str) -> Environment:
        """The environment, if within reach (else NOT_FOUND) and the caller may administer it
        (else PERMISSION_DENIED); whether it is deleted is checked in the transaction."""
        env = principal.visible_environment(environment_id)
        principal.require_administer(env.id)
        return env


async def _changeable(
    repository: MemberRepository, principal: Principal, member_id: str, etag: str
) -> Member:
    """The member, read in the write transaction, that this caller may change: an OWNER only by
    an owner-level caller; a stale etag is ABORTED."""
    current = await repository.get(principal.organization_id, member_id)
    if current is None:
        raise member_not_found(member_id)
    if current.role is OrgRole.OWNER:
        require_owner_level(principal)
    check_etag(etag, current.etag)
    return current


async def _changeable_access(
    repository: MemberRepository, principal: Principal, environment_id: str, member_id: str, etag: str
) -> EnvironmentMembership:
    """A member's access to an environment the caller administers, read in the write
    transaction; NOT_FOUND when there is none, ABORTED when the etag is stale."""
    current = await repository.get_membership(principal.organization_id, environment_id, member_id)
    if current is None:
        raise environment_member_not_found(environment_id, member_id)
    check_etag(etag, current.etag)
    return current


async def _require_another_owner(repository: MemberRepository, organization_id: str) -> None:
    """FAILED_PRECONDITION LAST_OWNER unless the organization has more than one OWNER. Runs inside
    the write transaction, after the organization's revision lock was taken."""
    if await repository.count_owners(organization_id) <= 1:
        raise FailedPrecondition(
            "the organization's last OWNER cannot be removed or demoted", reason="LAST_OWNER"
        )
