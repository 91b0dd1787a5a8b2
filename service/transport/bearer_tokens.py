"""The bearer tokens configured on the server itself (SPEC §7): those `VerifyApiKey` callers
present (`AGENTPOST_VERIFIER_TOKENS`) and the operator token of `CreateOrganization`
(`AGENTPOST_OPERATOR_TOKEN`).

`VerifyApiKey` tells whoever asks whether a secret is valid; in production only the platform's
own backends should be able to ask, so the server may require one of a set of tokens from them.
Either setting may name a file that holds more than one token, so that a new one can be handed
out before the old one is withdrawn.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence

from service.domain.errors import Unauthenticated


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of both lengths.
    return hashlib.sha256(token.encode()).digest()


class BearerTokens:
    """A set of configured tokens. `newer`, when given, is asked at each check for tokens that
    replace these (None: no change); it must be cheap while nothing changed."""

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

    def configured(self) -> bool:
        """Whether any token is configured, taking up replacing ones first (a replacement that
        names none keeps the tokens before it)."""
        if self._newer is not None:
            replacing = self._newer()
            if replacing is not None:
                self._digests = tuple(_digest(token) for token in replacing) or self._digests
        return bool(self._digests)

    def accepts(self, token: str | None) -> bool:
        """Whether `token` is one of the tokens (as of the last `configured`). Every token is
        compared, so the time taken does not tell which one was close."""
        presented = b"" if token is None else _digest(token)
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(presented, expected)
        return matched


class VerifierTokens(BearerTokens):
    """The tokens `VerifyApiKey` callers present; with none, every caller may verify (local use)."""

    def require(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Raises `Unauthenticated` `VERIFIER_TOKEN_REQUIRED` unless the call's one
        `authorization: Bearer <token>` names a configured token (or none are configured)."""
        if not self.configured():
            return
        values = [value for key, value in metadata if key == "authorization"]
        presented = None
        if len(values) == 1 and isinstance(values[0], str):
            scheme, _, token = values[0].strip().partition(" ")
            if scheme.lower() == "bearer":
                presented = token.strip()
        if not self.accepts(presented):
            raise Unauthenticated(
                "VerifyApiKey needs `authorization: Bearer <verifier token>` with a token this server "
                "was configured with",
                reason="VERIFIER_TOKEN_REQUIRED",
            )
