"""What every use case shares: storage, the access cache, secret hashing and the pager."""

from __future__ import annotations

from dataclasses import dataclass

from service.application.access import AccessCache
from service.domain.keys import SecretHasher
from service.domain.pagination import Pager
from service.storage.database import Database


@dataclass(frozen=True)
class Dependencies:
    """The shared collaborators of the use cases, built once by the wiring."""

    database: Database
    access: AccessCache
    hasher: SecretHasher
    pager: Pager
