"""Wire forms derived from immutable objects, kept while those objects live.

The domain never changes a record in place: a changed key, environment or snapshot is a new
object, and a principal is rebuilt whenever its key or its organization's snapshot changes. So
an answer built from such an object stays true as long as the object is the one in use, and the
hot paths (GetEnvironment, VerifyApiKey) answer most calls with something they built before.
Entries are found by id() and checked by identity (the memo holds the object, so its id cannot
be reused meanwhile); the memo is emptied when full. Callers return or copy what they get,
never change it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Built = TypeVar("Built")


class IdentityMemo(Generic[Built]):
    """What `build` made from an object (and an optional part of the request), per object."""

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._built: dict[tuple[int, Hashable], tuple[object, Built]] = {}

    def get(self, source: object, part: Hashable, build: Callable[[], Built]) -> Built:
        """`build()`'s result for `source` and `part`, built on first use."""
        key = (id(source), part)
        known = self._built.get(key)
        if known is not None and known[0] is source:
            return known[1]
        if len(self._built) >= self._limit:
            self._built.clear()
        built = build()
        self._built[key] = (source, built)
        return built
