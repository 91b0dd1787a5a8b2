"""What every use case shares: storage, the access cache, secret hashing and the pager."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from service.application.access import AccessCache
from service.domain.keys import SecretHasher
from service.domain.pagination import Pager
from service.storage.database import Database
from service.storage.server_secrets import PAGE_TOKEN_KEY

_PAGE_TOKEN_KEY_BYTES = 32


@dataclass(frozen=True)
class Dependencies:
    """The shared collaborators of the use cases, built once by the wiring."""

    database: Database
    access: AccessCache
    hasher: SecretHasher
    pager: Pager

    async def use_stored_page_token_key(self) -> None:
        """Without a pepper, every server on this database signs page tokens with the random
        key stored in it, made by the first to start. Called at start-up once the schema is
        known to be current, before calls are let through."""
        if self.pager.tokens.has_key:
            return
        async with self.database.write(None, require_schema=False) as uow:
            stored = await uow.server_secrets.get_or_create(
                PAGE_TOKEN_KEY, secrets.token_hex(_PAGE_TOKEN_KEY_BYTES)
            )
        self.pager.tokens.use_key(bytes.fromhex(stored))
