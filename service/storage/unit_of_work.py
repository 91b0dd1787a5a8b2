"""A unit of work: the repositories of one transaction, handed to a use case as one object.

Use cases never see a connection: `Database.read()` and `Database.write(organization_id)` yield a
`UnitOfWork`, and everything done through its repositories commits or rolls back together.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from service.domain.events import Action, Change, Resource, changed_fields
from service.storage.api_keys import ApiKeyRepository
from service.storage.environments import EnvironmentRepository
from service.storage.events import EventRepository
from service.storage.last_used import LastUsedRepository
from service.storage.members import MemberRepository
from service.storage.organizations import OrganizationRepository
from service.storage.request_ids import RequestIdRepository
from service.storage.resources import ResourceRepository
from service.storage.server_secrets import ServerSecretRepository
from service.storage.statements import Statements


class UnitOfWork:
    """The repositories of one transaction; each is built on first use.

    `organization_id` is the organization a write belongs to (None for reads and for creating an
    organization): the one place that knows what a transaction changes.
    """

    def __init__(self, connection: Statements, organization_id: str | None = None) -> None:
        self._connection = connection
        self.organization_id = organization_id
        self.changes: list[Change] = []
        # Records a create announced to its write, which stored them with the revision (see
        # `Database.write`): the use case does not insert these again.
        self.stored_with_revision: list[Resource] = []

    def record(
        self,
        action: Action,
        resource: Resource,
        changed_fields: Sequence[str] = (),
        *,
        previous_environment_id: str | None = None,
    ) -> None:
        """Notes one resource this write changed; its event is appended, numbered with the
        organization's new revision, in the same transaction when the write commits. A moved
        resource names the environment it left."""
        self.changes.append(Change(action, resource, tuple(changed_fields), previous_environment_id))

    def record_update(self, before: Resource, after: Resource, action: Action = Action.UPDATED) -> None:
        """Notes a changed record, naming the fields whose values differ."""
        self.record(action, after, changed_fields(before, after))

    @property
    def statements(self) -> Statements:
        """The connection every repository of this unit of work runs its statements on."""
        return self._connection

    @cached_property
    def organizations(self) -> OrganizationRepository:
        """Organizations and their revisions."""
        return OrganizationRepository(self._connection)

    @cached_property
    def environments(self) -> EnvironmentRepository:
        """Environments."""
        return EnvironmentRepository(self._connection)

    @cached_property
    def members(self) -> MemberRepository:
        """Members and their environment access."""
        return MemberRepository(self._connection)

    @cached_property
    def api_keys(self) -> ApiKeyRepository:
        """API keys and their digests."""
        return ApiKeyRepository(self._connection)

    @cached_property
    def resources(self) -> ResourceRepository:
        """The registry of scoped resources."""
        return ResourceRepository(self._connection)

    @cached_property
    def request_ids(self) -> RequestIdRepository:
        """Idempotency keys of create requests."""
        return RequestIdRepository(self._connection)

    @cached_property
    def last_used(self) -> LastUsedRepository:
        """Batched last-used times of keys."""
        return LastUsedRepository(self._connection)

    @cached_property
    def server_secrets(self) -> ServerSecretRepository:
        """Secrets made once per database (the page-token key)."""
        return ServerSecretRepository(self._connection)

    @cached_property
    def events(self) -> EventRepository:
        """The organization's event log."""
        return EventRepository(self._connection)
