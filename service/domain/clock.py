"""The one clock of the service: timezone-aware UTC, so comparisons never mix naive times."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)
