"""The in-memory view that serves authentication, VerifyApiKey and environment reads.

The database stays the truth. This replica's writes invalidate what they touch as they commit,
so the next call sees them; other replicas' writes are noticed by polling each cached
organization's `revision` every `refresh_interval` seconds. Keys are held in a bounded LRU keyed
by the digest of their secret; unknown secrets are never cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from service.domain import keys
from service.domain.clock import utcnow
from service.domain.errors import DomainError
from service.domain.models import ApiKey
from service.domain.principal import Denial, OrgSnapshot, Principal, key_denial
from service.storage.database import Database

log = logging.getLogger(__name__)

LAST_USED_FLUSH_SECONDS = 30.0


@dataclass(frozen=True)
class Authentication:
    """The outcome of presenting a secret: a principal, or a denial (with the key when known)."""

    principal: Principal | None
    denial: Denial | None
    key: ApiKey | None = None


@dataclass
class _KeyEntry:
    key: ApiKey
    stored_hash: str
    principal: Principal | None = None


class AccessCache:
    """Keys, organization snapshots and last-used times, kept in memory."""

    def __init__(
        self,
        database: Database,
        hasher: keys.SecretHasher,
        *,
        max_keys: int = 100_000,
        refresh_interval: float = 1.0,
    ) -> None:
        self._db = database
        self._hasher = hasher
        self._max_keys = max_keys
        self.refresh_interval = refresh_interval
        self._keys: OrderedDict[str, _KeyEntry] = OrderedDict()
        self._org_keys: dict[str, set[str]] = {}
        self._snapshots: dict[str, OrgSnapshot] = {}
        self._epoch = 0
        self._invalidated_at: dict[str, int] = {}
        self._last_used: dict[str, datetime] = {}
        self._flushed: dict[str, datetime] = {}
        self._tasks: list[asyncio.Task[None]] = []
        database.on_commit(self.invalidate)

    # -- invalidation -------------------------------------------------------------------------

    def invalidate(self, organization_id: str) -> None:
        """Forgets everything cached about the organization; called after each of its writes."""
        self._epoch += 1
        self._invalidated_at[organization_id] = self._epoch
        self._snapshots.pop(organization_id, None)
        for digest in self._org_keys.pop(organization_id, set()):
            self._keys.pop(digest, None)

    def _still_fresh(self, organization_id: str, epoch_before: int) -> bool:
        return self._invalidated_at.get(organization_id, 0) <= epoch_before

    # -- snapshots ----------------------------------------------------------------------------

    async def snapshot(self, organization_id: str) -> OrgSnapshot | None:
        """The organization's access snapshot, loaded on a miss; None if there is no such org."""
        cached = self._snapshots.get(organization_id)
        if cached is not None:
            return cached
        epoch_before = self._epoch
        async with self._db.read() as uow:
            organization = await uow.organizations.get(organization_id)
            if organization is None:
                return None
            revision = (await uow.organizations.revisions([organization_id])).get(organization_id, 0)
            environments = await uow.environments.all_of(organization_id)
            members = uow.members
            roles = await members.roles_of(organization_id)
            environment_roles = await members.environment_roles_of(organization_id)
        snapshot = OrgSnapshot(
            organization=organization,
            revision=revision,
            environments={env.id: env for env in environments},
            member_roles=roles,
            environment_roles=environment_roles,
        )
        if self._still_fresh(organization_id, epoch_before):
            self._snapshots[organization_id] = snapshot
        return snapshot

    # -- keys ---------------------------------------------------------------------------------

    async def _key_entry(self, digest: str) -> _KeyEntry | None:
        entry = self._keys.get(digest)
        if entry is not None:
            self._keys.move_to_end(digest)
            return entry
        epoch_before = self._epoch
        async with self._db.read() as uow:
            found = await uow.api_keys.find_by_hash(digest)
        if found is None:
            return None
        key, stored_hash = found
        entry = _KeyEntry(key=key, stored_hash=stored_hash)
        if self._still_fresh(key.organization_id, epoch_before):
            self._keys[digest] = entry
            self._org_keys.setdefault(key.organization_id, set()).add(digest)
            while len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        return entry

    async def authenticate(self, secret: str, now: datetime | None = None) -> Authentication:
        """Who the secret is. A malformed secret is refused before any lookup."""
        parsed = keys.parse(secret)
        if parsed is None:
            return Authentication(None, Denial.MALFORMED)
        digest = self._hasher.digest(parsed.secret)
        entry = await self._key_entry(digest)
        if entry is None or not self._hasher.same(entry.stored_hash, digest):
            return Authentication(None, Denial.NOT_FOUND)
        key = entry.key
        snapshot = await self.snapshot(key.organization_id)
        if snapshot is None:  # pragma: no cover - keys always belong to an organization
            return Authentication(None, Denial.NOT_FOUND)
        when = now or utcnow()
        denial = key_denial(key, snapshot, when)
        if denial is not None:
            return Authentication(None, denial, key)
        principal = entry.principal
        if principal is None or principal.snapshot is not snapshot:
            principal = Principal.of(key, snapshot)
            entry.principal = principal
        self._touch(key.id, when)
        return Authentication(principal, None, key)

    # -- last used ----------------------------------------------------------------------------

    def _touch(self, key_id: str, when: datetime) -> None:
        self._last_used[key_id] = when

    def last_used(self, key: ApiKey) -> datetime | None:
        """The key's last use as this replica knows it: stored, or newer and not yet written."""
        pending = self._last_used.get(key.id)
        if pending is None or (key.last_used_time is not None and key.last_used_time >= pending):
            return key.last_used_time
        return pending

    async def flush_last_used(self) -> None:
        """Writes last-used times, at most one write per key per flush interval."""
        due = {
            key_id: when
            for key_id, when in self._last_used.items()
            if when - self._flushed.get(key_id, datetime.min.replace(tzinfo=UTC))
            >= timedelta(seconds=LAST_USED_FLUSH_SECONDS)
        }
        if not due:
            return
        async with self._db.write(None) as uow:
            await uow.last_used.record(due)
        self._flushed.update(due)

    # -- background work ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Drops organizations whose revision moved on in the database (another replica wrote)."""
        cached = dict(self._snapshots)
        if not cached:
            return
        async with self._db.read() as uow:
            revisions = await uow.organizations.revisions(list(cached))
        for organization_id, snapshot in cached.items():
            # A snapshot reloaded while the poll ran is newer than the one compared: keep it.
            if (
                self._snapshots.get(organization_id) is snapshot
                and revisions.get(organization_id) != snapshot.revision
            ):
                self.invalidate(organization_id)

    async def _every(self, seconds: float, work: str) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await (self.refresh() if work == "refresh" else self.flush_last_used())
            except DomainError as error:
                log.warning("access cache %s failed: %s", work, error.message)

    def start(self) -> None:
        """Starts polling for other replicas' writes and flushing last-used times."""
        self._tasks = [
            asyncio.create_task(self._every(self.refresh_interval, "refresh")),
            asyncio.create_task(self._every(LAST_USED_FLUSH_SECONDS / 3, "flush")),
        ]

    async def stop(self) -> None:
        """Stops background work and writes pending last-used times."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with contextlib.suppress(DomainError):
            self._flushed.clear()
            await self.flush_last_used()
