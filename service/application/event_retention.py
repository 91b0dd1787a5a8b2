"""Event retention: events older than the retention period are pruned by a background task.

Each batch is its own short transaction of at most about `batch` events (whole revisions, the
oldest first), with a pause between batches, so pruning a large backlog never holds locks that
writes wait on for long. Every replica runs the task; concurrent pruners delete the same rows at
worst, which is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from service.domain.clock import utcnow
from service.storage.database import Database

log = logging.getLogger(__name__)

PRUNE_BATCH = 500
PAUSE_BETWEEN_BATCHES_SECONDS = 0.05


class EventRetention:
    """Prunes the event log of every organization to the retention period."""

    def __init__(
        self, database: Database, *, retention: timedelta, interval_seconds: float, batch: int = PRUNE_BATCH
    ) -> None:
        self._db = database
        self._retention = retention
        self._interval = interval_seconds
        self._batch = batch
        self._task: asyncio.Task[None] | None = None

    async def prune(self) -> int:
        """Deletes every event older than the retention period, batch by batch; returns how many."""
        cutoff = utcnow() - self._retention
        total = 0
        while True:
            async with self._db.write(None) as uow:
                deleted = await uow.events.prune(cutoff, self._batch)
            total += deleted
            if deleted == 0:
                return total
            await asyncio.sleep(PAUSE_BETWEEN_BATCHES_SECONDS)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                pruned = await self.prune()
            except Exception as error:
                log.warning("pruning the event log failed (%r); retrying in %.0f s", error, self._interval)
                continue
            if pruned:
                log.info("pruned %d events older than %s", pruned, self._retention)

    def start(self) -> None:
        """Starts pruning every `interval_seconds`."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stops pruning (a batch in progress rolls back)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
