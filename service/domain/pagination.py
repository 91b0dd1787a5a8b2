"""Opaque page tokens for keyset pagination, bound to the query and the caller that made them.

A token carries the last id of its page and a fingerprint of (method, caller, filters), signed
with a server key; one presented with another query or by another caller is INVALID_ARGUMENT.
The key is derived from the pepper when one is configured, so replicas sharing it agree;
without one it is a random key stored once in the database (see `use_key`), never a fixed one
a client could sign with.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.domain import validation
from service.domain.errors import InvalidArgument

T = TypeVar("T")

_INVALID = "the page token is invalid, or belongs to another query or caller"

# A cursor is the sort key of a page's last item: at most a kind and an id, each a stored value.
_MAX_CURSOR_PARTS = 4
_MAX_CURSOR_PART_LENGTH = 200
# A token carries at most _MAX_CURSOR_PARTS parts of _MAX_CURSOR_PART_LENGTH characters, escaped
# twice over in JSON (up to 24 characters for one astral character) and then in base64: under
# this many characters.
_MAX_TOKEN_LENGTH = 65_536
MIN_KEY_BYTES = 32


def pepper_key(pepper: str) -> bytes:
    """The signing key every server configured with `pepper` derives alike."""
    return hashlib.sha256(b"agentpost-page-token:" + pepper.encode()).digest()


class PageTokens:
    """Signs and checks page tokens. With a pepper the key is derived from it at once; without
    one it stays unset until `use_key` hands over the database's stored key, and signing or
    checking before that is an error rather than a token anyone could forge."""

    def __init__(self, pepper: str | None) -> None:
        self._key: bytes | None = pepper_key(pepper) if pepper else None

    @property
    def has_key(self) -> bool:
        """Whether a signing key is set (always, when a pepper was given)."""
        return self._key is not None

    def use_key(self, key: bytes) -> None:
        """Signs with `key` from now on: the random key stored for a database without a pepper."""
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a page token key needs at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def _fingerprint(self, query: Sequence[object]) -> str:
        return hashlib.sha256(json.dumps([str(part) for part in query]).encode()).hexdigest()[:24]

    def _sign(self, body: bytes) -> str:
        if self._key is None:
            raise RuntimeError("page tokens have no signing key yet: load the stored one first")
        return hmac.new(self._key, body, hashlib.sha256).hexdigest()[:32]

    def encode(self, last: Sequence[str], query: Sequence[object]) -> str:
        """A token continuing after `last` (the sort key of the page's last item)."""
        body = json.dumps({"a": list(last), "q": self._fingerprint(query)}, separators=(",", ":")).encode()
        raw = json.dumps({"b": body.decode(), "s": self._sign(body)}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode(self, token: str, query: Sequence[object]) -> tuple[str, ...] | None:
        """The sort key to continue after, or None for the first page."""
        if not token:
            return None
        try:
            if len(token) > _MAX_TOKEN_LENGTH:  # longer than any token this service makes
                raise ValueError("length")
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
            outer = json.loads(raw)
            body = str(outer["b"]).encode()
            if not hmac.compare_digest(self._sign(body), str(outer["s"])):
                raise ValueError("signature")
            inner = json.loads(body)
            if inner["q"] != self._fingerprint(query):
                raise ValueError("query")
            return _cursor(inner["a"])
        # RecursionError: JSON nested deeper than the parser goes, read before the signature.
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            raise InvalidArgument.field("page_token", _INVALID, reason="INVALID_PAGE_TOKEN") from None


def _cursor(after: object) -> tuple[str, ...]:
    """The cursor, checked like any client input even though it was signed: it reaches queries,
    where a NUL or a lone surrogate would be a driver error rather than a refusal."""
    if not isinstance(after, list) or not 0 < len(after) <= _MAX_CURSOR_PARTS:
        raise ValueError("shape")
    for part in after:
        if not isinstance(part, str) or len(part) > _MAX_CURSOR_PART_LENGTH or not validation.printable(part):
            raise ValueError("cursor")
    return tuple(after)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of results and the token for the next (empty at the end)."""

    items: list[T]
    next_page_token: str


@dataclass(frozen=True)
class PageRequest:
    """A validated page request: its size and the sort key to continue after."""

    size: int
    after: tuple[str, ...] | None
    query: tuple[object, ...]


class Pager:
    """Keyset pagination for every list: validates a request's size and token, and cuts pages
    whose next token it signs with its `PageTokens`."""

    def __init__(self, tokens: PageTokens) -> None:
        self.tokens = tokens

    def request(self, page_size: int, page_token: str, query: Sequence[object]) -> PageRequest:
        """Validates size and token; `query` names the method, the caller and every filter."""
        return PageRequest(
            validation.page_size(page_size), self.tokens.decode(page_token, query), tuple(query)
        )

    def page(
        self, request: PageRequest, fetched: list[T], sort_key: Callable[[T], tuple[str, ...]]
    ) -> Page[T]:
        """The page of up to size+1 fetched items (the extra one means there is more)."""
        items = fetched[: request.size]
        if len(fetched) <= request.size or not items:
            return Page(items, "")
        return Page(items, self.tokens.encode(sort_key(items[-1]), request.query))

    def cut(self, request: PageRequest, items: list[T], resume_after: Sequence[str] | None) -> Page[T]:
        """A page of a list filtered after fetching, which may end before `request.size` items
        when the server stopped examining: the next token continues after `resume_after` (the
        sort key of the last item examined), or the list ends there when it is None."""
        if resume_after is None:
            return Page(items, "")
        return Page(items, self.tokens.encode(resume_after, request.query))
