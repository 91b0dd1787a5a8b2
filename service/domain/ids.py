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
