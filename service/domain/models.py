"""The domain's records: plain frozen dataclasses, free of storage and transport."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Self

from service.domain import ids
from service.domain.errors import Conflict


def etag_of(resource_id: str, version: int) -> str:
    """An opaque tag that changes whenever the resource changes (AIP-154)."""
    return hashlib.sha256(f"{resource_id}:{version}".encode()).hexdigest()[:16]


class Versioned:
    """A resource whose every change bumps its version (and so its etag) and its update time."""

    __slots__ = ()  # a subclass declared with slots (ApiKey) then has no instance dict at all

    id: str
    version: int

    @property
    def etag(self) -> str:
        """The current etag (AIP-154): it changes with every version."""
        return etag_of(self._etag_basis(), self.version)

    def _etag_basis(self) -> str:
        """What the etag names besides the version: the resource's id."""
        return self.id

    def revised(self, now: datetime, **changes: Any) -> Self:
        """The next version of this resource: `changes` applied at `now`."""
        return replace(self, update_time=now, version=self.version + 1, **changes)  # type: ignore[type-var]


def check_etag(given: str, current: str) -> None:
    """ABORTED when the client's etag is stale (AIP-154); an empty etag skips the check."""
    if given and given != current:
        raise Conflict("the resource changed since it was read; read it again", reason="ETAG_MISMATCH")


class OrgRole(enum.StrEnum):
    """A member's role in the organization."""

    OWNER = "OWNER"
    ADMIN = "ADMIN"
    MEMBER = "MEMBER"

    @property
    def reaches_every_environment(self) -> bool:
        """OWNER and ADMIN reach every environment; MEMBER only those it was added to."""
        return self is not OrgRole.MEMBER


class EnvRole(enum.StrEnum):
    """A member's role in one environment."""

    ADMIN = "ADMIN"
    MEMBER = "MEMBER"


class KeyMode(enum.StrEnum):
    """Whether a key is for live traffic or development."""

    LIVE = "LIVE"
    DEV = "DEV"


class KeyState(enum.StrEnum):
    """A key's state, derived from its times when read."""

    ACTIVE = "ACTIVE"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"


class ResourceKind(enum.StrEnum):
    """The kinds of resources other services register; each maps to one scope area."""

    INBOX = "INBOX"
    MESSAGE = "MESSAGE"
    THREAD = "THREAD"
    DRAFT = "DRAFT"
    DOMAIN = "DOMAIN"
    WEBHOOK_ENDPOINT = "WEBHOOK_ENDPOINT"
    LABEL = "LABEL"

    @property
    def scope_area(self) -> str:
        """The scope area that governs this kind (`inboxes`, `webhooks`, ...)."""
        return _KIND_AREAS[self]


_KIND_AREAS = {
    ResourceKind.INBOX: "inboxes",
    ResourceKind.MESSAGE: "messages",
    ResourceKind.THREAD: "threads",
    ResourceKind.DRAFT: "drafts",
    ResourceKind.DOMAIN: "domains",
    ResourceKind.WEBHOOK_ENDPOINT: "webhooks",
    ResourceKind.LABEL: "labels",
}


@dataclass(frozen=True)
class Organization:
    """A tenant."""

    id: str
    name: str
    create_time: datetime

    @classmethod
    def new(cls, name: str, now: datetime) -> Organization:
        """A new organization with a fresh id."""
        return cls(id=ids.new_id(ids.ORGANIZATION), name=name, create_time=now)


@dataclass(frozen=True)
class Environment(Versioned):
    """An environment of an organization; `delete_time` set means soft-deleted."""

    id: str
    organization_id: str
    name: str
    slug: str
    description: str
    is_default: bool
    create_time: datetime
    update_time: datetime
    delete_time: datetime | None
    version: int

    @classmethod
    def new(
        cls,
        organization_id: str,
        name: str,
        slug: str,
        description: str,
        now: datetime,
        *,
        is_default: bool = False,
    ) -> Environment:
        """A new active environment with a fresh id, at version 1."""
        return cls(
            id=ids.new_id(ids.ENVIRONMENT),
            organization_id=organization_id,
            name=name,
            slug=slug,
            description=description,
            is_default=is_default,
            create_time=now,
            update_time=now,
            delete_time=None,
            version=1,
        )

    @property
    def deleted(self) -> bool:
        """True once soft-deleted."""
        return self.delete_time is not None


@dataclass(frozen=True)
class Member(Versioned):
    """A person in an organization."""

    id: str
    organization_id: str
    email: str
    display_name: str
    role: OrgRole
    create_time: datetime
    update_time: datetime
    version: int

    @classmethod
    def new(cls, organization_id: str, email: str, display_name: str, role: OrgRole, now: datetime) -> Member:
        """A new member with a fresh id, at version 1."""
        return cls(
            id=ids.new_id(ids.MEMBER),
            organization_id=organization_id,
            email=email,
            display_name=display_name,
            role=role,
            create_time=now,
            update_time=now,
            version=1,
        )


@dataclass(frozen=True)
class EnvironmentMembership(Versioned):
    """A member's access to one environment. Its etag names the grant, not only the pair: access
    removed and granted again starts at version 1 with a new create_time, and an etag read
    before the removal does not match the new grant."""

    environment_id: str
    member_id: str
    role: EnvRole
    create_time: datetime
    update_time: datetime
    version: int = 1

    def _etag_basis(self) -> str:
        """The grant: the pair and when it was made."""
        return f"{self.environment_id}/{self.member_id}@{self.create_time.isoformat()}"


@dataclass(frozen=True, slots=True)  # slots: the key cache holds up to a million of these
class ApiKey(Versioned):
    """An API key's record; the secret's digest lives only in storage."""

    id: str
    organization_id: str
    name: str
    scopes: tuple[str, ...]
    environment_ids: tuple[str, ...]
    owner_member_id: str | None
    mode: KeyMode
    prefix: str
    create_time: datetime
    update_time: datetime
    expire_time: datetime | None
    last_used_time: datetime | None
    revoke_time: datetime | None
    version: int

    @classmethod
    def new(
        cls,
        organization_id: str,
        name: str,
        scopes: tuple[str, ...],
        environment_ids: tuple[str, ...],
        owner_member_id: str | None,
        mode: KeyMode,
        prefix: str,
        now: datetime,
        expire_time: datetime | None = None,
    ) -> ApiKey:
        """A new, never used key with a fresh id, at version 1."""
        return cls(
            id=ids.new_id(ids.API_KEY),
            organization_id=organization_id,
            name=name,
            scopes=scopes,
            environment_ids=environment_ids,
            owner_member_id=owner_member_id,
            mode=mode,
            prefix=prefix,
            create_time=now,
            update_time=now,
            expire_time=expire_time,
            last_used_time=None,
            revoke_time=None,
            version=1,
        )

    @property
    def organization_wide(self) -> bool:
        """True when the key lists no environments."""
        return not self.environment_ids

    def state(self, now: datetime) -> KeyState:
        """REVOKED, EXPIRED (at or past expire_time) or ACTIVE."""
        if self.revoke_time is not None:
            return KeyState.REVOKED
        if self.expire_time is not None and now >= self.expire_time:
            return KeyState.EXPIRED
        return KeyState.ACTIVE


@dataclass(frozen=True)
class ScopedResource:
    """A resource of another service and the environment it belongs to."""

    kind: ResourceKind
    resource_id: str
    organization_id: str
    environment_id: str
    display_name: str
    create_time: datetime
    update_time: datetime
