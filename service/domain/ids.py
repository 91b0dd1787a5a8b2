"""Resource identifiers: a type prefix, `_`, and a ULID (unpredictable, sortable by creation)."""

from __future__ import annotations

import secrets
import time
from typing import Final

from ulid import ULID

ORGANIZATION: Final = "org"
ENVIRONMENT: Final = "env"
MEMBER: Final = "mem"
API_KEY: Final = "key"
EVENT: Final = "evt"


def new_id(prefix: str) -> str:
    """A fresh id of the given type: the current millisecond and 80 fresh random bits.

    The library's default generator is monotonic (the next id in the same millisecond is the
    previous one plus one), which would let a caller guess ids; every id here draws new bits.
    """
    millis = time.time_ns() // 1_000_000
    return f"{prefix}_{ULID.from_bytes(millis.to_bytes(6, 'big') + secrets.token_bytes(10))}"


def first_id_at(prefix: str, seconds: float) -> str:
    """The smallest id of the given type made at `seconds` since the epoch: every id made in
    that millisecond or later sorts after it, every one made before sorts before it."""
    millis = max(0, int(seconds * 1000))
    return f"{prefix}_{ULID.from_bytes(millis.to_bytes(6, 'big') + bytes(10))}"
