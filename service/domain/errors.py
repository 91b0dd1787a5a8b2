"""The domain's error vocabulary. Transport maps each class to one gRPC status code, in one place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from service.domain.redaction import redacted


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its path (e.g. `environment.name`) and what is wrong with it."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error a client can cause. `reason` is UPPER_SNAKE and stable on the wire."""

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        # A caller's value quoted in a message is answered and logged: never a secret.
        message = redacted(message)
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.violations = tuple(FieldViolation(v.field, redacted(v.description)) for v in violations)


class InvalidArgument(DomainError):
    """The request itself is wrong, whatever the state of the system."""

    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        """One bad field, with the field violation filled in."""
        return cls(f"{field}: {description}", reason=reason, violations=[FieldViolation(field, description)])


class NotFound(DomainError):
    """The thing does not exist, or is outside the caller's reach: the two look the same."""

    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    """Creating the thing would duplicate one that exists."""

    default_reason = "ALREADY_EXISTS"


class Conflict(DomainError):
    """The stored row changed since it was read (a stale etag)."""

    default_reason = "ETAG_MISMATCH"


class FailedPrecondition(DomainError):
    """The system is not in a state that allows the request."""

    default_reason = "FAILED_PRECONDITION"


class Denied(DomainError):
    """The caller is known but may not do this."""

    default_reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    """The caller could not be identified."""

    default_reason = "UNAUTHENTICATED"


class Unavailable(DomainError):
    """A dependency (the database) is unreachable or busy; the request may be retried."""

    default_reason = "DATABASE_UNAVAILABLE"


class ResourceExhausted(DomainError):
    """The caller used up an allowance (failed authentications, a watch stream's buffer); it may
    retry, after `retry_after` seconds when that is known."""

    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after


# The one NOT_FOUND of each resource type: an id that does not exist and an id outside the
# caller's reach must be indistinguishable.


def environment_not_found(reference: str) -> NotFound:
    """The one NOT_FOUND for environments, whether absent or out of reach."""
    return NotFound(f"environment {reference[:100]!r} not found", reason="ENVIRONMENT_NOT_FOUND")


def member_not_found(member_id: str) -> NotFound:
    """The one NOT_FOUND for members, whether absent or out of reach."""
    return NotFound(f"member {member_id[:100]!r} not found", reason="MEMBER_NOT_FOUND")


def environment_member_not_found(environment_id: str, member_id: str) -> NotFound:
    """The member has no access of its own to the environment."""
    return NotFound(
        f"member {member_id[:100]!r} has no access to environment {environment_id[:100]!r}",
        reason="ENVIRONMENT_MEMBER_NOT_FOUND",
    )


def api_key_not_found(key_id: str) -> NotFound:
    """The one NOT_FOUND for keys, whether absent, of another organization or out of reach."""
    return NotFound(f"API key {key_id[:100]!r} not found", reason="API_KEY_NOT_FOUND")


def resource_not_found(kind: str, resource_id: str) -> NotFound:
    """The one NOT_FOUND for resources, whether never registered or outside the context."""
    return NotFound(f"resource {kind} {resource_id[:128]!r} not found", reason="RESOURCE_NOT_FOUND")
