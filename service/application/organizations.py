"""Creating organizations (with their default environment, OWNER and owner key) and reading them."""

from __future__ import annotations

from dataclasses import dataclass

from service.application.dependencies import Dependencies
from service.application.idempotency import create_once
from service.domain import keys, scopes, validation
from service.domain.clock import utcnow
from service.domain.errors import AlreadyExists
from service.domain.events import OPERATOR, Action
from service.domain.models import ApiKey, Environment, KeyMode, Member, Organization, OrgRole
from service.domain.principal import Principal
from service.storage.unit_of_work import UnitOfWork

CREATE = "CreateOrganization"


@dataclass(frozen=True)
class CreatedOrganization:
    """Everything CreateOrganization made, with the owner key's secret (shown once)."""

    organization: Organization
    default_environment: Environment
    owner: Member
    owner_api_key: ApiKey
    owner_api_key_secret: str


class Organizations:
    """The organization use cases."""

    def __init__(self, dependencies: Dependencies) -> None:
        self._deps = dependencies

    async def create(
        self, name: str, owner_email: str, owner_display_name: str, request_id: str
    ) -> CreatedOrganization:
        """Creates the organization, its default environment, an OWNER member and an
        organization-wide owner key with every scope, atomically."""
        name = validation.name("name", name)
        owner_email = validation.email("owner_email", owner_email)
        owner_display_name = validation.text(
            "owner_display_name", owner_display_name, max_length=100, required=False
        )
        idempotency_key = validation.request_id(request_id)
        now = utcnow()
        organization = Organization.new(name, now)
        environment = Environment.new(organization.id, "Default", "default", "", now, is_default=True)
        owner = Member.new(organization.id, owner_email, owner_display_name, OrgRole.OWNER, now)
        secret = keys.generate(KeyMode.LIVE)
        key = ApiKey.new(
            organization.id, "Owner key", scopes.ALL_SCOPES, (), owner.id, KeyMode.LIVE, secret.prefix, now
        )

        async def insert_all(uow: UnitOfWork) -> str:
            await uow.organizations.insert(organization)
            await uow.environments.insert(environment)
            await uow.members.insert(owner)
            await uow.api_keys.insert(key, self._deps.hasher.digest(secret.secret))
            for created in (organization, environment, owner, key):
                uow.record(Action.CREATED, created)
            self._deps.access.remember(self._deps.hasher.digest(secret.secret))
            return organization.id

        outcome = await create_once(
            self._deps.database,
            actor=OPERATOR,
            organization_id=None,
            operation=CREATE,
            request_id=idempotency_key,
            create=insert_all,
            refuse=_duplicate,
        )
        assert outcome.created  # a retry is refused
        return CreatedOrganization(organization, environment, owner, key, secret.secret)

    async def any_exists(self) -> bool:
        """True when at least one organization exists."""
        async with self._deps.database.read() as uow:
            return await uow.organizations.any_exists()

    @staticmethod
    def get(principal: Principal) -> Organization:
        """The caller's own organization."""
        return principal.snapshot.organization


def _duplicate(organization_id: str) -> AlreadyExists:
    return AlreadyExists(
        "an organization was already created with this request_id; its owner key's secret cannot be shown again",
        reason="DUPLICATE_REQUEST",
        metadata={"organizationId": organization_id},
    )
