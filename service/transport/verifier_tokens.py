"""The bearer tokens that callers of `VerifyApiKey` present (SPEC §7, `AGENTPOST_VERIFIER_TOKENS`).

`VerifyApiKey` tells whoever asks whether a secret is valid; in production only the platform's
own backends should be able to ask, so the server may require one of a set of tokens from them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence

from service.domain.errors import Unauthenticated


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of both lengths.
    return hashlib.sha256(token.encode()).digest()


class VerifierTokens:
    """The configured tokens; with none, every caller may verify (local use). `newer`, when
    given, is asked before each check for tokens that replace these (None: no change); it must
    be cheap while nothing changed."""

    def __init__(
        self, tokens: Iterable[str], newer: Callable[[], Iterable[str] | None] | None = None
    ) -> None:
        self._digests: tuple[bytes, ...] = ()
        self._newer: Callable[[], Iterable[str] | None] | None = None
        self.follow(tokens, newer)

    def follow(self, tokens: Iterable[str], newer: Callable[[], Iterable[str] | None] | None = None) -> None:
        """Takes these tokens, and `newer` as where later ones come from (before any call)."""
        self._digests = tuple(_digest(token) for token in tokens)
        self._newer = newer

    def require(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Raises `Unauthenticated` `VERIFIER_TOKEN_REQUIRED` unless the call's one
        `authorization: Bearer <token>` names a configured token (or none are configured)."""
        if self._newer is not None:
            replacing = self._newer()
            if replacing is not None:
                self._digests = tuple(_digest(token) for token in replacing) or self._digests
        if not self._digests:
            return
        values = [value for key, value in metadata if key == "authorization"]
        presented = b""
        if len(values) == 1 and isinstance(values[0], str):
            scheme, _, token = values[0].strip().partition(" ")
            if scheme.lower() == "bearer":
                presented = _digest(token.strip())
        # Every configured token is compared, so the time taken does not tell which one was close.
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(presented, expected)
        if not matched:
            raise Unauthenticated(
                "VerifyApiKey needs `authorization: Bearer <verifier token>` with a token this server "
                "was configured with",
                reason="VERIFIER_TOKEN_REQUIRED",
            )
