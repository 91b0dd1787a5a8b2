"""The fixed scope vocabulary: `<area>:read` or `<area>:write` for the areas one can both read and
change (write does not imply read), and `<area>:read` alone for the areas one can only read."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from service.domain.errors import FieldViolation, InvalidArgument

AREAS: Final = (
    "environments",
    "members",
    "api_keys",
    "inboxes",
    "messages",
    "threads",
    "drafts",
    "domains",
    "webhooks",
    "labels",
)
# Read-only areas: the event log is written by every write of the other areas, never directly.
READ_ONLY_AREAS: Final = ("events",)
ALL_SCOPES: Final = (
    *(f"{area}:{access}" for area in AREAS for access in ("read", "write")),
    *(f"{area}:read" for area in READ_ONLY_AREAS),
)
_KNOWN: Final = frozenset(ALL_SCOPES)


def validate(field: str, scopes: Iterable[str], *, required: bool) -> tuple[str, ...]:
    """Known scopes, de-duplicated and sorted. Unknown ones are INVALID_ARGUMENT, each named."""
    given = list(scopes)
    if not given and not required:
        return ()
    unknown = [scope for scope in given if scope not in _KNOWN]
    if unknown:
        raise InvalidArgument(
            f"unknown scopes: {', '.join(repr(scope[:100]) for scope in sorted(set(unknown))[:20])}",
            reason="UNKNOWN_SCOPE",
            violations=[FieldViolation(field, f"unknown scope {scope[:100]!r}") for scope in unknown[:20]],
        )
    if required and not given:
        raise InvalidArgument.field(field, "needs at least one scope")
    return tuple(sorted(set(given)))
