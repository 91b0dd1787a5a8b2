"""The in-memory view that serves authentication, VerifyApiKey and environment reads.

The database stays the truth. This replica's writes invalidate what they touch as they commit,
so the next call sees them; other replicas' writes are noticed by polling each cached
organization's `revision` every `refresh_interval` seconds. Keys are held in a bounded LRU keyed
by the digest of their secret; unknown secrets are never cached.

During a database outage the cache keeps answering for what it holds: a failed poll empties
nothing. Each answer from memory is as old as the later of the last successful poll and the
moment its key and organization were loaded; once that is more than `max_staleness` seconds ago,
cached entries are refused as `Unavailable` until the database answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from service.domain import keys
from service.domain.clock import utcnow
from service.domain.models import ApiKey
from service.domain.principal import Denial, OrgSnapshot, Principal, key_denial
from service.storage.database import Database
from service.storage.errors import database_unavailable

log = logging.getLogger(__name__)

LAST_USED_FLUSH_SECONDS = 30.0
DEFAULT_MAX_STALENESS_SECONDS = 300.0
DEFAULT_POLL_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Authentication:
    """The outcome of presenting a secret: a principal, or a denial (with the key when known)."""

    principal: Principal | None
    denial: Denial | None
    key: ApiKey | None = None


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds and how often key lookups found the key there, since start."""

    keys: int
    organizations: int
    key_hits: int
    key_misses: int


@dataclass
class _KeyEntry:
    key: ApiKey
    stored_hash: str
    # time.monotonic() when the load started: the entry is at least that fresh.
    loaded_at: float = field(default_factory=time.monotonic)
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
        max_staleness: float = DEFAULT_MAX_STALENESS_SECONDS,
        poll_timeout: float = DEFAULT_POLL_TIMEOUT_SECONDS,
    ) -> None:
        self._db = database
        self._hasher = hasher
        self._max_keys = max_keys
        self.refresh_interval = refresh_interval
        # Below two polls, warm keys would be refused between two successful polls.
        self.max_staleness = max(max_staleness, 2 * refresh_interval)
        self._poll_timeout = poll_timeout
        self._keys: OrderedDict[str, _KeyEntry] = OrderedDict()
        self._org_keys: dict[str, set[str]] = {}
        self._snapshots: dict[str, OrgSnapshot] = {}
        self._snapshot_loaded_at: dict[str, float] = {}
        # time.monotonic() when the last successful poll started; None before the first one.
        self._confirmed_at: float | None = None
        self._epoch = 0
        self._invalidated_at: dict[str, int] = {}
        self._last_used: dict[str, datetime] = {}
        self._flushed: dict[str, datetime] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._key_hits = 0
        self._key_misses = 0
        database.on_commit(self.invalidate)

    def stats(self) -> CacheStats:
        """Sizes and key hit/miss counts, for metrics."""
        return CacheStats(len(self._keys), len(self._snapshots), self._key_hits, self._key_misses)

    # -- invalidation -------------------------------------------------------------------------

    def invalidate(self, organization_id: str) -> None:
        """Forgets everything cached about the organization; called after each of its writes."""
        self._epoch += 1
        self._invalidated_at[organization_id] = self._epoch
        self._snapshots.pop(organization_id, None)
        self._snapshot_loaded_at.pop(organization_id, None)
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
        return await self._load_snapshot(organization_id)

    async def _load_snapshot(self, organization_id: str) -> OrgSnapshot | None:
        epoch_before = self._epoch
        started = time.monotonic()
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
            self._snapshot_loaded_at[organization_id] = started
        return snapshot

    # -- keys ---------------------------------------------------------------------------------

    async def _key_entry(self, digest: str) -> tuple[_KeyEntry | None, bool]:
        """The key with that digest and whether it came from the cache."""
        entry = self._keys.get(digest)
        if entry is not None:
            self._key_hits += 1
            self._keys.move_to_end(digest)
            return entry, True
        self._key_misses += 1
        return await self._load_key_entry(digest), False

    async def _load_key_entry(self, digest: str) -> _KeyEntry | None:
        epoch_before = self._epoch
        started = time.monotonic()
        async with self._db.read() as uow:
            found = await uow.api_keys.find_by_hash(digest)
        if found is None:
            return None
        key, stored_hash = found
        entry = _KeyEntry(key=key, stored_hash=stored_hash, loaded_at=started)
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
        entry, key_cached = await self._key_entry(digest)
        if entry is None or not self._hasher.same(entry.stored_hash, digest):
            return Authentication(None, Denial.NOT_FOUND)
        snapshot = self._snapshots.get(entry.key.organization_id)
        if snapshot is None:
            snapshot = await self._load_snapshot(entry.key.organization_id)
            if key_cached:
                # The key outlived its organization's snapshot (a load failed in between, as in
                # an outage): no poll covered it since, so it may predate what the new snapshot
                # shows. Read it again rather than trust it.
                entry = await self._load_key_entry(digest)
                if entry is None or not self._hasher.same(entry.stored_hash, digest):
                    return Authentication(None, Denial.NOT_FOUND)
        if snapshot is None:  # pragma: no cover - keys always belong to an organization
            return Authentication(None, Denial.NOT_FOUND)
        self._require_fresh(entry, snapshot.organization.id)
        key = entry.key
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

    # -- staleness ----------------------------------------------------------------------------

    def staleness(self) -> float:
        """Seconds since the database last confirmed what the cache holds (infinite before the
        first successful poll)."""
        if self._confirmed_at is None:
            return float("inf")
        return time.monotonic() - self._confirmed_at

    def fresh_enough(self) -> bool:
        """True while the last successful poll is within the maximum staleness."""
        return self.staleness() <= self.max_staleness

    def _require_fresh(self, entry: _KeyEntry, organization_id: str) -> None:
        """Refuses an answer built from entries no poll or load has confirmed for too long."""
        loaded_at = min(entry.loaded_at, self._snapshot_loaded_at.get(organization_id, entry.loaded_at))
        confirmed_at = loaded_at if self._confirmed_at is None else max(self._confirmed_at, loaded_at)
        age = time.monotonic() - confirmed_at
        if age > self.max_staleness:
            raise database_unavailable(
                f"the database has not answered for {age:.0f} s, longer than cached credentials are trusted"
            )

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
        """Confirms the cache with the database: drops organizations whose revision moved on
        (another replica wrote), or, with nothing cached, just reaches the database. Only a poll
        that succeeds counts as a confirmation; one that fails leaves the cache as it was."""
        started = time.monotonic()
        cached = dict(self._snapshots)
        if cached:
            async with self._db.read() as uow:
                revisions = await uow.organizations.revisions(list(cached))
            for organization_id, snapshot in cached.items():
                # A snapshot reloaded while the poll ran is newer than the one compared: keep it.
                if (
                    self._snapshots.get(organization_id) is snapshot
                    and revisions.get(organization_id) != snapshot.revision
                ):
                    self.invalidate(organization_id)
        else:
            await self._db.ping()
        self._confirmed_at = started

    async def confirm(self) -> bool:
        """One poll now, for start-up: True when the database answered."""
        try:
            await asyncio.wait_for(self.refresh(), timeout=self._poll_timeout)
        except Exception:
            log.exception("the database did not answer at start-up; retrying in the background")
            return False
        return True

    async def _every(self, seconds: float, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Runs `work` every `seconds` until cancelled, each run bounded by the poll timeout. A
        failure never ends the loop: the first of a run of failures of one kind is logged with its
        traceback, the repeats on one line each, so an outage does not flood the log."""
        failing: type[BaseException] | None = None
        failures = 0
        while True:
            await asyncio.sleep(seconds)
            try:
                await asyncio.wait_for(work(), timeout=max(self._poll_timeout, seconds))
            except Exception as error:
                failures += 1
                if type(error) is not failing:
                    failing = type(error)
                    log.exception("access cache %s failed; retrying every %.1f s", name, seconds)
                else:
                    log.warning("access cache %s failed again (%d in a row): %r", name, failures, error)
                continue
            if failing is not None:
                log.info("access cache %s works again after %d failures", name, failures)
            failing, failures = None, 0

    def start(self) -> None:
        """Starts polling for other replicas' writes and flushing last-used times."""
        self._tasks = [
            asyncio.create_task(self._every(self.refresh_interval, "refresh", self.refresh)),
            asyncio.create_task(self._every(LAST_USED_FLUSH_SECONDS / 3, "flush", self.flush_last_used)),
        ]

    async def stop(self) -> None:
        """Stops background work and writes pending last-used times (a failure is logged: the
        times are advisory and shutdown must go on)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._flushed.clear()
        try:
            await asyncio.wait_for(self.flush_last_used(), timeout=self._poll_timeout)
        except Exception:
            log.exception("last-used times could not be written at shutdown")
