"""Opaque page tokens for keyset pagination, bound to the query and the caller that made them.

A token carries the last id of its page and a fingerprint of (method, caller, filters), signed
with a server key; one presented with another query or by another caller is INVALID_ARGUMENT.
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


class PageTokens:
    """Signs and checks page tokens with a key derived from the server's secret."""

    def __init__(self, secret: str | None) -> None:
        self._key = hashlib.sha256(b"agentpost-page-token:" + (secret or "").encode()).digest()

    def _fingerprint(self, query: Sequence[object]) -> str:
        return hashlib.sha256(json.dumps([str(part) for part in query]).encode()).hexdigest()[:24]

    def _sign(self, body: bytes) -> str:
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
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            outer = json.loads(raw)
            body = str(outer["b"]).encode()
            if not hmac.compare_digest(self._sign(body), str(outer["s"])):
                raise ValueError("signature")
            inner = json.loads(body)
            if inner["q"] != self._fingerprint(query):
                raise ValueError("query")
            after = inner["a"]
            if not isinstance(after, list) or not all(isinstance(part, str) for part in after):
                raise ValueError("shape")
            return tuple(after)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise InvalidArgument.field("page_token", _INVALID, reason="INVALID_PAGE_TOKEN") from None


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

    @classmethod
    def of(cls, tokens: PageTokens, page_size: int, page_token: str, query: Sequence[object]) -> PageRequest:
        """Validates size and token; `query` names the method, the caller and every filter."""
        return cls(validation.page_size(page_size), tokens.decode(page_token, query), tuple(query))

    def page(self, tokens: PageTokens, fetched: list[T], sort_key: Callable[[T], tuple[str, ...]]) -> Page[T]:
        """Builds the page from up to size+1 fetched items (the extra one means there is more)."""
        items = fetched[: self.size]
        if len(fetched) <= self.size or not items:
            return Page(items, "")
        return Page(items, tokens.encode(sort_key(items[-1]), self.query))
