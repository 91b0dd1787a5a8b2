"""Which API keys exist, compactly: what lets a throttled peer's valid key through (SPEC §7).

While a peer address is throttled (transport/throttle.py), a secret it sends that this process
has never loaded is looked up in the database only if this directory says a key may have its
digest; a flood of made-up secrets is then refused without database work, and a valid key made
on another replica or worker is still served ("valid keys from the same peer are unaffected").

The directory holds the first 64 bits of the digest of every unrevoked key: 8 bytes a key in a
sorted array (8 MB per million keys), plus a set of those added since it was last sorted (at
most 65,536 or a quarter of the sorted ones, about 70 bytes each). A
collision only costs one lookup that finds nothing. It is filled by passes over the keys in id
order, a few thousand a read so that no read holds the event loop long (on SQLite reads run on
it): the first pass reads every key, later ones the keys made since a minute before the previous
pass began (ids start with their creation time on the clock of the replica that made them; the
minute covers clocks that far apart). Passes run every second, and on demand: a throttled
secret it does not know waits for a pass that began after the call arrived (at most one pass
every `MIN_PASS_GAP_SECONDS`, whatever the number of callers), so a key committed anywhere
before the call is found. Keys made here are added as they are made.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from bisect import bisect_left
from itertools import chain

from service.domain import ids
from service.storage.database import Database

PASS_SECONDS = 1.0
MIN_PASS_GAP_SECONDS = 0.1
CLOCK_MARGIN_SECONDS = 60.0
BATCH = 2_000
# Reads of one pass before it yields the rest to the next: a first pass over a million keys is
# spread over a few seconds rather than held in one call's wait.
MAX_BATCHES_PER_PASS = 100
_PREFIX_HEX = 16
_MIN_RESORT = 65_536


def _prefix(digest: str) -> int | None:
    try:
        return int(digest[:_PREFIX_HEX], 16) if len(digest) >= _PREFIX_HEX else None
    except ValueError:
        return None


class KeyDirectory:
    """The digests of the keys in the database, as far as the passes have read them."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._sorted = array("Q")
        self._recent: set[int] = set()
        self._after = ""  # the id the next read starts after
        self._pass_began: float | None = None  # wall clock, for ids (None: no pass under way)
        # time.monotonic() when the last pass that reached the end began.
        self._completed_began: float | None = None
        self._last_began = float("-inf")
        self._pass: asyncio.Task[None] | None = None

    def add(self, digest: str) -> None:
        """Notes the digest of a key made (or found) here."""
        value = _prefix(digest)
        if value is not None and not self._holds(value):
            self._recent.add(value)

    def may_exist(self, digest: str) -> bool:
        """Whether a key with that digest may exist (False: none did when the last pass ran)."""
        value = _prefix(digest)
        return value is not None and self._holds(value)

    def _holds(self, value: int) -> bool:
        if value in self._recent:
            return True
        index = bisect_left(self._sorted, value)
        return index < len(self._sorted) and self._sorted[index] == value

    async def knows(self, digest: str, asked_at: float) -> bool:
        """`may_exist`, once a pass that began at or after `asked_at` (time.monotonic()) has
        reached the end: a key committed before then anywhere is included (before the first
        pass has read every key, that waits for it too)."""
        if self.may_exist(digest):
            return True
        while self._completed_began is None or self._completed_began < asked_at:
            await self.run_pass()
        return self.may_exist(digest)

    async def run_pass(self) -> None:
        """Runs one pass, or waits for the one under way (shared by every caller)."""
        if self._pass is None:
            self._pass = asyncio.ensure_future(self._paced_pass())
            self._pass.add_done_callback(self._pass_ended)
        await asyncio.shield(self._pass)

    def _pass_ended(self, task: asyncio.Task[None]) -> None:
        self._pass = None
        if not task.cancelled():
            task.exception()  # retrieved: its callers were told

    async def _paced_pass(self) -> None:
        wait = self._last_began + MIN_PASS_GAP_SECONDS - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        began = self._last_began = time.monotonic()
        if self._pass_began is None:
            self._pass_began = time.time()
        for _ in range(MAX_BATCHES_PER_PASS):
            async with self._db.read() as uow:
                rows = await uow.api_keys.digests_after(self._after, BATCH)
            for _, digest in rows:
                self.add(digest)
            self._resort()
            if len(rows) < BATCH:
                # The end: the next pass reads what was made since a margin before this one.
                self._after = ids.first_id_at(ids.API_KEY, self._pass_began - CLOCK_MARGIN_SECONDS)
                self._pass_began = None
                self._completed_began = began
                return
            self._after = rows[-1][0]

    def _resort(self) -> None:
        """Moves the recent digests into the sorted array once they are many, so that the cost
        of sorting stays in proportion to the keys added. The two hold no digest in common
        (`add`): the merge is one sort of two sorted runs, which Python's sort does in one pass."""
        if len(self._recent) < max(_MIN_RESORT, len(self._sorted) // 4):
            return
        self._sorted = array("Q", sorted(chain(self._sorted, self._recent)))
        self._recent.clear()
