"""The scoped-resource use cases: the registry of which environment each resource belongs to.

Register, Get, List and Deregister act only in the caller's environment context (resolved by the
interceptor); a resource of any other environment or organization is NOT_FOUND with reason
RESOURCE_NOT_FOUND, exactly like an id that was never registered. Orphan listing and reassignment
are organization-level and name their environments explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.application.dependencies import Dependencies
from service.application.environments import recheck_active
from service.application.idempotency import create_once
from service.domain import validation
from service.domain.clock import utcnow
from service.domain.errors import Denied, FailedPrecondition, InvalidArgument, resource_not_found
from service.domain.events import Action, Change
from service.domain.models import ResourceKind, ScopedResource
from service.domain.pagination import Page, PageRequest
from service.domain.principal import Principal
from service.storage.resources import ResourceKey
from service.storage.unit_of_work import UnitOfWork

MAX_REASSIGN_LISTED = 1000


@dataclass(frozen=True)
class ResourceRef:
    """A resource named in a ReassignResources request, as received (not yet validated)."""

    kind: ResourceKind | None
    resource_id: str


def _result_id(kind: ResourceKind, resource_id: str) -> str:
    """How a registration is remembered under its request id (kinds hold no `:`)."""
    return f"{kind.value}:{resource_id}"


class Resources:
    """Register, read, list, deregister and reassign scoped resources."""

    def __init__(self, dependencies: Dependencies) -> None:
        self._deps = dependencies

    async def register(
        self,
        principal: Principal,
        kind: ResourceKind | None,
        resource_id: str,
        display_name: str,
        request_id: str,
    ) -> ScopedResource:
        """Registers a resource in the environment context.

        `(kind, resource_id)` is unique in the organization across all environments: a clash is
        ALREADY_EXISTS RESOURCE_EXISTS, whose message does not say which environment holds it.
        A retry with the same `request_id` returns the first registration while it is still
        registered in this environment (else RESOURCE_NOT_FOUND); reusing a request id for
        another resource is INVALID_ARGUMENT REQUEST_ID_REUSED.
        """
        kind = _required_kind("kind", kind)
        resource_id = validation.resource_id("resource_id", resource_id)
        display_name = validation.text("display_name", display_name, max_length=200, required=False)
        idempotency_key = validation.request_id(request_id)
        environment = principal.context_environment
        now = utcnow()
        resource = ScopedResource(
            kind=kind,
            resource_id=resource_id,
            organization_id=principal.organization_id,
            environment_id=environment.id,
            display_name=display_name,
            create_time=now,
            update_time=now,
        )

        async def insert(uow: UnitOfWork) -> str:
            # The insert re-reads the environment itself: a delete committed since the caller's
            # view was read wins. Only then is it read again, to say how.
            if resource in uow.stored_with_revision:
                return _result_id(kind, resource_id)
            if not await uow.resources.insert_if_active(resource):
                await recheck_active(uow, principal.organization_id, environment.id)
                raise FailedPrecondition(  # pragma: no cover - the write's lock keeps it as read
                    f"environment {environment.id} is not active", reason="ENVIRONMENT_DELETED"
                )
            return _result_id(kind, resource_id)

        outcome = await create_once(
            self._deps.database,
            actor=principal.actor,
            organization_id=principal.organization_id,
            operation="RegisterResource",
            request_id=idempotency_key,
            create=insert,
            created=[Change(Action.REGISTERED, resource)],
            asked=(kind.value, resource_id),
        )
        if outcome.created:
            return resource
        if outcome.result_id != _result_id(kind, resource_id):
            raise InvalidArgument.field(
                "request_id", "was already used to register another resource", reason="REQUEST_ID_REUSED"
            )
        return await self.get(principal, kind, resource_id)

    async def get(self, principal: Principal, kind: ResourceKind | None, resource_id: str) -> ScopedResource:
        """One resource of the environment context."""
        kind = _required_kind("kind", kind)
        resource_id = validation.resource_id("resource_id", resource_id)
        async with self._deps.database.read() as uow:
            found = await uow.resources.get(principal.organization_id, kind, resource_id)
        if found is None or found.environment_id != principal.context_environment.id:
            raise resource_not_found(kind, resource_id)
        return found

    async def list(
        self, principal: Principal, kind: ResourceKind | None, page_size: int, page_token: str
    ) -> Page[ScopedResource]:
        """The resources of the environment context, ordered by (kind name, resource_id).

        KIND_UNSPECIFIED lists every kind whose `:read` scope the key holds; holding none is
        PERMISSION_DENIED SCOPE_MISSING. (A named kind's scope was checked by the policy.)
        """
        environment = principal.context_environment
        if kind is not None:
            kinds = [kind]
        else:
            kinds = [k for k in ResourceKind if principal.has_scope(f"{k.scope_area}:read")]
            if not kinds:
                raise Denied("the API key holds no resource `:read` scope", reason="SCOPE_MISSING")
        request = self._deps.pager.request(
            page_size,
            page_token,
            ("ListResources", principal.key.id, environment.id, kind.value if kind else ""),
        )
        return await self._page(principal, environment.id, kinds, request)

    async def deregister(self, principal: Principal, kind: ResourceKind | None, resource_id: str) -> None:
        """Removes a resource of the environment context from the registry."""
        kind = _required_kind("kind", kind)
        resource_id = validation.resource_id("resource_id", resource_id)
        environment = principal.context_environment
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            # Read again under the write's lock: a delete committed since the caller's view was
            # read wins, and the resources of a deleted environment stay until reassigned.
            await recheck_active(uow, principal.organization_id, environment.id)
            removed = await uow.resources.delete(principal.organization_id, environment.id, kind, resource_id)
            if removed is None:
                raise resource_not_found(kind, resource_id)
            uow.record(Action.DEREGISTERED, removed)

    async def list_orphaned(
        self, principal: Principal, environment_id: str, page_size: int, page_token: str
    ) -> Page[ScopedResource]:
        """The resources (every kind) of a deleted environment within reach; an active one is
        FAILED_PRECONDITION ENVIRONMENT_NOT_DELETED."""
        environment = principal.visible_environment(validation.required_id("environment_id", environment_id))
        request = self._deps.pager.request(
            page_size,
            page_token,
            ("ListOrphanedResources", principal.key.id, environment.id),
        )
        if not environment.deleted:
            raise FailedPrecondition(
                f"environment {environment.id} is not deleted; list its resources in its context",
                reason="ENVIRONMENT_NOT_DELETED",
            )
        return await self._page(principal, environment.id, list(ResourceKind), request)

    async def reassign(
        self,
        principal: Principal,
        from_environment_id: str,
        to_environment_id: str,
        listed: Sequence[ResourceRef],
    ) -> int:
        """Moves resources from one environment (deleted or active) to an active one, in one
        transaction, and returns how many moved.

        No resources listed moves all of them. Listed ones (at most 1000, duplicates counted
        once) must all be in the source, else NOT_FOUND RESOURCE_NOT_FOUND and nothing moves.
        """
        from_id = validation.required_id("from_environment_id", from_environment_id)
        to_id = validation.required_id("to_environment_id", to_environment_id)
        if from_id == to_id:
            raise InvalidArgument.field("to_environment_id", "must differ from from_environment_id")
        keys = _listed_keys(listed)
        source = principal.visible_environment(from_id)
        target = principal.usable_environment(to_id)
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            await recheck_active(uow, principal.organization_id, target.id)
            repository = uow.resources
            if keys is not None:
                present = await repository.present_in(principal.organization_id, source.id, keys)
                missing = [key for key in keys if key not in present]
                if missing:
                    raise resource_not_found(*missing[0])
            moved = await repository.move(principal.organization_id, source.id, target.id, keys, utcnow())
            for resource in moved:
                uow.record(
                    Action.REASSIGNED, resource, ("environment_id",), previous_environment_id=source.id
                )
            return len(moved)

    async def _page(
        self, principal: Principal, environment_id: str, kinds: Sequence[ResourceKind], request: PageRequest
    ) -> Page[ScopedResource]:
        after = _cursor(request.after)
        async with self._deps.database.read() as uow:
            fetched = await uow.resources.page_of(
                principal.organization_id, environment_id, kinds, after, request.size + 1
            )
        return self._deps.pager.page(request, fetched, lambda item: (item.kind.value, item.resource_id))


def _cursor(after: tuple[str, ...] | None) -> tuple[str, str] | None:
    """The (kind, resource_id) a signed page token continues after."""
    if after is None:
        return None
    if len(after) != 2:  # pragma: no cover - tokens are signed and bound to their query
        raise InvalidArgument.field("page_token", "is invalid", reason="INVALID_PAGE_TOKEN")
    return after[0], after[1]


def _required_kind(field: str, kind: ResourceKind | None) -> ResourceKind:
    """The kind, which this call cannot do without."""
    if kind is None:
        raise InvalidArgument.field(field, "must be a resource kind (INBOX, MESSAGE, ...)")
    return kind


def _listed_keys(listed: Sequence[ResourceRef]) -> list[ResourceKey] | None:
    """The validated, de-duplicated resources a reassignment names; None means all."""
    if not listed:
        return None
    if len(listed) > MAX_REASSIGN_LISTED:
        raise InvalidArgument.field("resources", f"must list at most {MAX_REASSIGN_LISTED} resources")
    keys: dict[ResourceKey, None] = {}
    for index, ref in enumerate(listed):
        kind = _required_kind(f"resources[{index}].kind", ref.kind)
        resource_id = validation.resource_id(f"resources[{index}].resource_id", ref.resource_id)
        keys[(kind, resource_id)] = None
    return list(keys)
