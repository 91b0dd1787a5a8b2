"""API key secrets: their format, checksum and hashing.

`ap_sk_<live|dev>_<32 base62 chars><6 base62 chars>`: the last six characters are the CRC32 of
everything before them, so a mistyped or truncated secret is refused before any lookup.
Only a digest is ever stored: SHA-256, or HMAC-SHA-256 when a pepper is configured.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass
from typing import Final

import base62

from service.domain.models import KeyMode

PREFIX_LENGTH: Final = 12
_BODY_LENGTH: Final = 32
_CHECKSUM_LENGTH: Final = 6
# Longer than any secret (`ap_sk_live_` and 38 characters): a longer string is refused unhashed.
MAX_SECRET_LENGTH: Final = 64
_SHAPE: Final = re.compile(r"ap_sk_(live|dev)_([0-9A-Za-z]{32})([0-9A-Za-z]{6})")


def _checksum(text: str) -> str:
    return str(base62.encode(zlib.crc32(text.encode("ascii")))).rjust(_CHECKSUM_LENGTH, "0")


@dataclass(frozen=True)
class ParsedSecret:
    """A secret whose shape and checksum are right. It may still name no key."""

    secret: str
    mode: KeyMode

    @property
    def prefix(self) -> str:
        """The part shown to users to tell keys apart."""
        return self.secret[:PREFIX_LENGTH]


_BODIES = 62**_BODY_LENGTH


def generate(mode: KeyMode) -> ParsedSecret:
    """A new random secret of a key of `mode`."""
    # One uniform draw over every body, written in base62 at full width (32 draws of a
    # character cost 30 times as much, which seeding a million keys feels).
    body = base62.encode(secrets.randbelow(_BODIES)).rjust(_BODY_LENGTH, base62.CHARSET_DEFAULT[0])
    head = f"ap_sk_{mode.value.lower()}_{body}"
    return ParsedSecret(secret=head + _checksum(head), mode=mode)


def parse(secret: str) -> ParsedSecret | None:
    """The parsed secret, or None when its shape or checksum is wrong. Touches no storage."""
    match = _SHAPE.fullmatch(secret)
    if match is None:
        return None
    head = secret[:-_CHECKSUM_LENGTH]
    if not hmac.compare_digest(_checksum(head), match.group(3)):
        return None
    return ParsedSecret(secret=secret, mode=KeyMode(match.group(1).upper()))


class SecretHasher:
    """Turns a secret into the digest stored and looked up; keyed by the pepper when there is one."""

    def __init__(self, pepper: str | None) -> None:
        self._pepper = pepper.encode() if pepper else None

    def digest(self, secret: str) -> str:
        """The hex digest of `secret`."""
        if self._pepper is None:
            return hashlib.sha256(secret.encode()).hexdigest()
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def same(left: str, right: str) -> bool:
        """Constant-time comparison of two digests."""
        return hmac.compare_digest(left, right)
