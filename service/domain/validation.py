"""Checks on client-supplied values. Each raises `InvalidArgument` naming the offending field."""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from service.domain.errors import InvalidArgument

# Matched with `fullmatch` only: with `match`, `$` also matches before a final newline, so
# "staging\n" would pass as a slug and live beside "staging".
SLUG_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
RESOURCE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
UUID_PATTERN = re.compile(
    r"[0-9a-fA-F]{8}(-?)[0-9a-fA-F]{4}\1[0-9a-fA-F]{4}\1[0-9a-fA-F]{4}\1[0-9a-fA-F]{12}"
)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

# Control, surrogate, unassigned and private-use code points, and line/paragraph separators.
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cs", "Cn", "Co", "Zl", "Zp"})


# Embeddings, overrides and isolates reorder how the rest of a line is shown: a name holding one
# can display as something else (U+202E turns "gnp.exe" into "exe.png").
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

# Separators, format characters (U+200B, U+FEFF, ...), other control-like categories and lone
# combining marks draw nothing; neither do these letters and symbols that render as blank space.
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Cn", "Co", "Mn", "Me"})
_BLANK_GLYPHS = frozenset("\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")


def _unprintable(value: str) -> bool:
    return any(unicodedata.category(char) in _UNPRINTABLE_CATEGORIES for char in value)


def _visible(char: str) -> bool:
    return char not in _BLANK_GLYPHS and unicodedata.category(char) not in _INVISIBLE_CATEGORIES


def printable(value: str) -> bool:
    """True when `value` holds no control, surrogate, unassigned or private-use code point and
    no line or paragraph separator: what any stored or echoed string must satisfy."""
    return not _unprintable(value)


def text(field: str, value: str, *, max_length: int, required: bool) -> str:
    """A printable string of at most `max_length` characters with at least one visible one;
    surrounding blanks and bidirectional overrides are refused."""
    if not value:
        if required:
            raise InvalidArgument.field(field, "is required")
        return value
    if len(value) > max_length:
        raise InvalidArgument.field(field, f"must be at most {max_length} characters")
    if _unprintable(value):
        raise InvalidArgument.field(field, "must contain only printable characters")
    if not _BIDI_CONTROLS.isdisjoint(value):
        raise InvalidArgument.field(field, "must not contain bidirectional override or isolate characters")
    if value != value.strip():
        raise InvalidArgument.field(field, "must not start or end with white space")
    if not any(_visible(char) for char in value):
        raise InvalidArgument.field(field, "must contain a visible character")
    return value


def name(field: str, value: str) -> str:
    """A resource's name: 1 to 100 printable characters, at least one of them visible."""
    return text(field, value, max_length=100, required=True)


def slug(field: str, value: str) -> str:
    """A DNS label: lowercase letters, digits and inner hyphens, at most 63 characters."""
    if not SLUG_PATTERN.fullmatch(value):
        raise InvalidArgument.field(
            field, "must be a DNS label: 1-63 of [a-z0-9-], starting and ending with a letter or digit"
        )
    return value


def derive_slug(from_name: str) -> str:
    """The slug a name implies: ASCII-folded, lowercased, runs of other characters become `-`."""
    folded = unicodedata.normalize("NFKD", from_name).encode("ascii", "ignore").decode("ascii")
    candidate = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")[:63].rstrip("-")
    if not candidate:
        raise InvalidArgument.field("slug", "cannot be derived from the name; give one explicitly")
    return candidate


def email(field: str, value: str) -> str:
    """An email address of at most 254 characters."""
    if not value:
        raise InvalidArgument.field(field, "is required")
    if len(value) > 254 or _unprintable(value) or not EMAIL_PATTERN.fullmatch(value):
        raise InvalidArgument.field(field, "must be an email address")
    return value


def email_key(address: str) -> str:
    """What two addresses are compared on, case-insensitively: Unicode's compatibility caseless
    form, so that an address and its own upper case (`straße` and `STRASSE`, `οδος` and `ΟΔΟΣ`,
    the `ﬁ` ligature and `FI`) and its look-alike spellings (full-width letters, a decomposed
    accent) are one address. Lower-casing alone is only right for ASCII."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", address).casefold())


def resource_id(field: str, value: str) -> str:
    """A registered resource's id: 1 to 128 of `[A-Za-z0-9_.:-]`."""
    if not RESOURCE_ID_PATTERN.fullmatch(value):
        raise InvalidArgument.field(field, "must be 1-128 of [A-Za-z0-9_.:-]")
    return value


def request_id(value: str) -> str | None:
    """An optional idempotency key; when given it must be a UUID (32 hex digits, hyphenated or
    not). Returned in canonical form."""
    if not value:
        return None
    # `uuid.UUID` alone also takes braces, a `urn:uuid:` prefix and surrounding white space.
    if not UUID_PATTERN.fullmatch(value):
        raise InvalidArgument.field("request_id", "must be a UUID")
    return str(uuid.UUID(value))


def page_size(value: int) -> int:
    """0 means the default; larger than the maximum is clamped; negative is refused."""
    if value < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def required_id(field: str, value: str) -> str:
    """A non-empty id field. Its shape is not checked: a malformed id is simply not found."""
    if not value:
        raise InvalidArgument.field(field, "is required")
    if len(value) > 200 or _unprintable(value):
        raise InvalidArgument.field(field, "is not a valid id")
    return value


@dataclass(frozen=True)
class UpdateMask:
    """An Update request's field mask, with the mutable-or-not fields the request sets."""

    paths: tuple[str, ...]
    populated: frozenset[str]


def update_fields(
    mask: UpdateMask, mutable: Collection[str], *, immutable: Mapping[str, str] | None = None
) -> frozenset[str]:
    """The fields an Update changes, by the one rule of every Update RPC (AIP-134): no mask means
    every mutable field the request sets; `*` (alone) means every mutable field, so unset ones are
    cleared or refused as their validation says; otherwise each path must name a mutable field
    (a known immutable one is refused with its own reason, any other with FIELD_NOT_MUTABLE). An
    update that would change no field is INVALID_ARGUMENT NOTHING_TO_UPDATE."""
    if not mask.paths:
        fields = frozenset(field for field in mutable if field in mask.populated)
    elif "*" in mask.paths:
        if len(mask.paths) > 1:
            raise InvalidArgument.field(
                "update_mask", "`*` must be the only path", reason="FIELD_NOT_MUTABLE"
            )
        fields = frozenset(mutable)
    else:
        for path in mask.paths:
            if immutable and path in immutable:
                raise InvalidArgument.field(
                    "update_mask", f"{path} cannot be changed", reason=immutable[path]
                )
            if path not in mutable:
                raise InvalidArgument.field(
                    "update_mask",
                    f"{path[:100]!r} cannot be updated; only {', '.join(sorted(mutable))} can",
                    reason="FIELD_NOT_MUTABLE",
                )
        fields = frozenset(mask.paths)
    if not fields:
        raise InvalidArgument.field(
            "update_mask",
            f"names no field and the request sets none of {', '.join(sorted(mutable))}",
            reason="NOTHING_TO_UPDATE",
        )
    return fields
