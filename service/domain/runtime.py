"""What every domain service needs: storage, the access cache, secret hashing and page tokens."""

from __future__ import annotations

from dataclasses import dataclass

from service.domain.access import AccessCache, utcnow
from service.domain.errors import Conflict
from service.domain.keys import SecretHasher
from service.domain.pagination import PageTokens
from service.storage.database import Database

__all__ = ["Runtime", "check_etag", "utcnow"]


@dataclass(frozen=True)
class Runtime:
    """The shared collaborators of the domain services."""

    database: Database
    access: AccessCache
    hasher: SecretHasher
    page_tokens: PageTokens


def check_etag(given: str, current: str) -> None:
    """ABORTED when the client's etag is stale (AIP-154); an empty etag skips the check."""
    if given and given != current:
        raise Conflict("the resource changed since it was read; read it again", reason="ETAG_MISMATCH")
