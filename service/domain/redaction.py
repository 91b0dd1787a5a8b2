"""No API key secret leaves the service in text it writes itself: error messages (answered and
logged) and log lines. A caller may send a secret where none belongs (as an environment, an id,
a scope, an update-mask path); it is recognised by its prefix and cut off there, whatever
follows, so a mangled or truncated secret is cut too."""

from __future__ import annotations

import re
from typing import Final

SECRET_PREFIX: Final = "ap_sk_"
_SECRET: Final = re.compile(r"ap_sk_[0-9A-Za-z_]*")
REPLACEMENT: Final = "ap_sk_[redacted]"


def redacted(text: str) -> str:
    """`text` with every secret-shaped run replaced."""
    return _SECRET.sub(REPLACEMENT, text) if SECRET_PREFIX in text else text


def printable(text: str) -> str:
    """`text` with every character that is not printable (line breaks, escapes, C1 controls,
    U+2028) written as its Python escape, so that it stays on one line of a text log."""
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)
