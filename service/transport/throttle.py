"""Failed-authentication throttling per peer address (SPEC §7).

Each peer address gets a fixed one-minute window that opens with its first refused credential.
Past `limit` refusals in that window, its further refusals are answered `RESOURCE_EXHAUSTED`
`TOO_MANY_AUTH_FAILURES` with a `RetryInfo` saying when the window ends. Valid credentials are
never refused by the throttle. While a peer is throttled, the credentials it sends are looked up
only if a key with that digest exists (see `AccessCache.authenticate(known_only=...)` and
`application/key_directory.py`), so a flood of made-up secrets causes no lookups.

State is per process and bounded: at most `max_peers` windows are kept, oldest first out, and
expired windows go first. Log lines name the peer address and the reason, never a credential:
the first refusal of each window, and the moment a peer becomes throttled.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from service.domain.errors import ResourceExhausted, Unauthenticated

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
# About 300 bytes per tracked address: 50,000 addresses take about 15 MB (measured with tracemalloc).
DEFAULT_MAX_PEERS = 50_000

T = TypeVar("T")


def peer_address(peer: str) -> str:
    """The client host of a gRPC peer string (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`, `unix:...`).

    The port changes with every connection, so it is dropped; an IPv6 client is grouped by its /64,
    the block a single host is usually handed.
    """
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv4":
        return rest.rsplit(":", 1)[0]
    if scheme == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
        try:
            return str(ipaddress.IPv6Network(f"{host}/64", strict=False))
        except ValueError:
            return host
    return peer


@dataclass(slots=True)
class _Window:
    opened: float
    refusals: int = 0


class AuthFailureThrottle:
    """Counts refused credentials per peer address and throttles addresses past the limit."""

    def __init__(
        self,
        limit: int,
        *,
        max_peers: int = DEFAULT_MAX_PEERS,
        window: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.max_peers = max_peers
        self._window = window
        self._clock = clock
        # Insertion order is window-opening order, so expired windows are always at the front.
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def _current(self, address: str, now: float) -> _Window | None:
        window = self._windows.get(address)
        if window is not None and now - window.opened >= self._window:
            del self._windows[address]
            return None
        return window

    def _open(self, address: str, now: float) -> _Window:
        windows = self._windows
        while windows and now - next(iter(windows.values())).opened >= self._window:
            windows.popitem(last=False)
        while len(windows) >= self.max_peers:
            windows.popitem(last=False)
        window = windows[address] = _Window(now)
        return window

    def retry_after(self, address: str) -> float | None:
        """Seconds until the address's window ends if it is throttled now, else None."""
        now = self._clock()
        window = self._current(address, now)
        if window is None or not self.limit or window.refusals <= self.limit:
            return None
        return window.opened + self._window - now

    def refused(self, address: str, error: Unauthenticated) -> Unauthenticated | ResourceExhausted:
        """Counts one refused credential; returns the error to answer it with."""
        now = self._clock()
        window = self._current(address, now) or self._open(address, now)
        window.refusals += 1
        if window.refusals == 1:
            log.info(
                "refused credentials from %s: %s (more refusals from it this minute are counted, not logged)",
                address,
                error.reason,
            )
        if not self.limit or window.refusals <= self.limit:
            return error
        retry_after = window.opened + self._window - now
        if window.refusals == self.limit + 1:
            log.warning(
                "%s sent more than %d refused credentials within a minute: throttled for %.0f s",
                address,
                self.limit,
                retry_after,
            )
        return ResourceExhausted(
            f"too many refused credentials from this address; retry in {retry_after:.0f} s",
            retry_after=retry_after,
            reason="TOO_MANY_AUTH_FAILURES",
        )

    async def guard(self, peer: str, authenticate: Callable[[bool], Awaitable[T]]) -> T:
        """Runs `authenticate(throttled)` for a call from `peer`; a credential it refuses is counted,
        and answered `TOO_MANY_AUTH_FAILURES` once the peer is past the limit."""
        # No window open anywhere (the usual case): nobody is throttled, and the peer's address
        # is worked out only if this credential is refused.
        throttled = bool(self._windows) and self.retry_after(peer_address(peer)) is not None
        try:
            return await authenticate(throttled)
        except Unauthenticated as error:
            raise self.refused(peer_address(peer), error) from None
