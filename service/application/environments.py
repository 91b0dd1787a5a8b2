"""The environment use cases. Reads are served from the organization's access snapshot."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping

from service.application.dependencies import Dependencies
from service.application.idempotency import create_or_replay
from service.domain import validation
from service.domain.clock import utcnow
from service.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, environment_not_found
from service.domain.events import Action, Change
from service.domain.models import Environment, check_etag
from service.domain.pagination import Page
from service.domain.principal import Principal
from service.storage.environments import EnvironmentRepository
from service.storage.unit_of_work import UnitOfWork

MUTABLE_FIELDS = frozenset({"name", "description"})


class Environments:
    """Create, read, update, delete and undelete environments."""

    def __init__(self, dependencies: Dependencies) -> None:
        self._deps = dependencies

    async def create(
        self, principal: Principal, name: str, slug: str, description: str, request_id: str
    ) -> Environment:
        """A new active environment; `slug` derived from `name` when empty."""
        name = validation.name("name", name)
        slug = validation.slug("slug", slug) if slug else validation.derive_slug(name)
        description = validation.text("description", description, max_length=1000, required=False)
        idempotency_key = validation.request_id(request_id)
        now = utcnow()
        env = Environment.new(principal.organization_id, name, slug, description, now)

        async def insert(uow: UnitOfWork) -> str:
            if env not in uow.stored_with_revision:
                await uow.environments.insert(env)
            return env.id

        async def load(uow: UnitOfWork, environment_id: str) -> Environment | None:
            return await uow.environments.get(principal.organization_id, environment_id)

        return await create_or_replay(
            self._deps.database,
            actor=principal.actor,
            organization_id=principal.organization_id,
            operation="CreateEnvironment",
            request_id=idempotency_key,
            created=env,
            insert=insert,
            load=load,
            gone=environment_not_found,
            changes=[Change(Action.CREATED, env)],
            asked=(name, slug, description),
        )

    @staticmethod
    def get(principal: Principal, *, environment_id: str = "", slug: str = "") -> Environment:
        """One environment within reach, by id or slug."""
        if not environment_id and not slug:
            raise InvalidArgument.field("id", "give the environment's id or slug")
        env = principal.snapshot.find_environment(environment_id or slug)
        if (
            env is None
            or (slug and env.slug != slug)
            or (environment_id and env.id != environment_id)
            or env.id not in principal.visible_environment_ids
        ):
            raise environment_not_found(environment_id or slug)
        return env

    def list(
        self, principal: Principal, page_size: int, page_token: str, show_deleted: bool
    ) -> Page[Environment]:
        """The environments within reach, ordered by id."""
        request = self._deps.pager.request(
            page_size,
            page_token,
            ("ListEnvironments", principal.key.id, show_deleted),
        )
        after = request.after[0] if request.after else ""
        snapshot = principal.snapshot
        reach = principal.visible_environment_ids
        if reach is snapshot.environment_ids:
            # Every environment: continue in the snapshot's order, from the cursor on.
            ordered = snapshot.ordered_environment_ids
            # Indexed from the cursor on (islice would step through every id before it).
            candidates: Iterable[str] = (
                ordered[index] for index in range(bisect.bisect_right(ordered, after), len(ordered))
            )
        else:
            candidates = sorted(env_id for env_id in reach if env_id > after)
        wanted = (
            snapshot.environments[env_id]
            for env_id in candidates
            if show_deleted or not snapshot.environments[env_id].deleted
        )
        fetched = list(itertools.islice(wanted, request.size + 1))
        return self._deps.pager.page(request, fetched, lambda env: (env.id,))

    async def update(
        self,
        principal: Principal,
        environment_id: str,
        values: Mapping[str, str],
        mask: validation.UpdateMask,
        etag: str,
    ) -> Environment:
        """Changes `name` and/or `description` as the update mask says; `values` holds the
        request's fields by name."""
        fields = validation.update_fields(mask, MUTABLE_FIELDS, immutable={"slug": "SLUG_IMMUTABLE"})
        new_name = validation.name("environment.name", values["name"]) if "name" in fields else None
        new_description = (
            validation.text("environment.description", values["description"], max_length=1000, required=False)
            if "description" in fields
            else None
        )
        principal.visible_environment(validation.required_id("environment.id", environment_id))
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            repository = uow.environments
            current = await _current(repository, principal, environment_id)
            check_etag(etag, current.etag)
            if current.deleted:
                raise FailedPrecondition(
                    "a deleted environment cannot be changed", reason="ENVIRONMENT_DELETED"
                )
            name = new_name if new_name is not None else current.name
            description = new_description if new_description is not None else current.description
            if (name, description) == (current.name, current.description):
                # Nothing changes, so neither do the etag and update_time: a client retrying an
                # update, or re-applying its configuration, must not invalidate others' etags.
                return current
            updated = current.revised(utcnow(), name=name, description=description)
            await repository.save(updated)
            uow.record_update(current, updated)
        return updated

    async def delete(self, principal: Principal, environment_id: str, etag: str) -> Environment:
        """Soft-deletes; the default environment is protected. Deleting a deleted one is a no-op."""
        principal.visible_environment(validation.required_id("id", environment_id))
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            repository = uow.environments
            current = await _current(repository, principal, environment_id)
            check_etag(etag, current.etag)
            if current.is_default:
                raise FailedPrecondition(
                    "the default environment cannot be deleted", reason="DEFAULT_ENVIRONMENT_PROTECTED"
                )
            if current.deleted:
                return current
            now = utcnow()
            updated = current.revised(now, delete_time=now)
            await repository.save(updated)
            uow.record_update(current, updated, Action.DELETED)
        return updated

    async def undelete(self, principal: Principal, environment_id: str, etag: str) -> Environment:
        """Restores a deleted environment; one that is not deleted is ALREADY_EXISTS (AIP-164)."""
        principal.visible_environment(validation.required_id("id", environment_id))
        async with self._deps.database.write(principal.organization_id, principal.actor) as uow:
            repository = uow.environments
            current = await _current(repository, principal, environment_id)
            check_etag(etag, current.etag)
            if not current.deleted:
                raise AlreadyExists("the environment is not deleted", reason="ENVIRONMENT_NOT_DELETED")
            updated = current.revised(utcnow(), delete_time=None)
            await repository.save(updated)
            uow.record_update(current, updated, Action.UNDELETED)
        return updated


async def _current(
    repository: EnvironmentRepository, principal: Principal, environment_id: str
) -> Environment:
    env = await repository.get(principal.organization_id, environment_id)
    if env is None:
        raise environment_not_found(environment_id)
    return env


async def recheck_active(uow: UnitOfWork, organization_id: str, environment_id: str) -> None:
    """Re-reads the environment inside a write transaction: a delete committed since the caller's
    snapshot was read must win, so nothing is granted in, added to, moved into or removed from a
    deleted environment (FAILED_PRECONDITION ENVIRONMENT_DELETED)."""
    deleted = await uow.environments.is_deleted(organization_id, environment_id)
    if deleted is None:  # pragma: no cover - environments are never removed
        raise environment_not_found(environment_id)
    if deleted:
        raise FailedPrecondition(f"environment {environment_id} is deleted", reason="ENVIRONMENT_DELETED")
