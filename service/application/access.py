"""The in-memory view that serves authentication, VerifyApiKey and environment reads.

The database stays the truth; the event log is how this view follows it. Every write appends one
event per changed resource under its organization's revision, and the view applies events
instead of forgetting organizations: a key event replaces that key's record (if newer), an
environment, member or membership event patches the organization's snapshot, and a registered
resource changes nothing at all. Writes made here are applied as they commit, so the next call
sees them; other replicas' writes are heard through PostgreSQL NOTIFY, or found by polling the
revisions of the organizations held here (the only way on SQLite, the safety net on PostgreSQL),
and read from the log after the revision applied so far. A miss loads once, whatever the number
of concurrent callers asking for it.

During a database outage the view keeps answering for what it holds: a failed poll empties
nothing. Each answer from memory is as old as the later of the last successful poll and the
moment its key and organization were loaded; once that is more than `max_staleness` seconds ago,
cached entries are refused as `Unavailable` until the database answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import Any, TypeVar

from service.application.key_directory import PASS_SECONDS, KeyDirectory
from service.domain import keys
from service.domain.clock import utcnow
from service.domain.events import Event
from service.domain.models import ApiKey
from service.domain.principal import Denial, OrgSnapshot, Principal, key_denial
from service.storage.database import Database
from service.storage.errors import database_unavailable

log = logging.getLogger(__name__)

LAST_USED_FLUSH_SECONDS = 30.0
LAST_USED_BATCH = 500  # keys per last-used transaction
STOP_WAIT_SECONDS = 5.0  # how long stop() waits for cancelled background work
DEFAULT_MAX_STALENESS_SECONDS = 300.0
DEFAULT_POLL_TIMEOUT_SECONDS = 10.0
# Past this many events behind, an organization is loaded afresh rather than caught up.
MAX_CATCH_UP_EVENTS = 5_000
# How long a caller asking for a revision not yet visible here waits for it.
MIN_REVISION_WAIT_SECONDS = 2.0
OWN_COMMIT_GRACE_SECONDS = 0.002
# At most this many such moments while a write here commits the very revision heard of.
OWN_COMMIT_WAITS = 25
# The longest shutdown waits to write last-used times.
FINAL_FLUSH_SECONDS = 2.0
# Key versions seen in events, remembered so a load that raced an event keeps the newer record.
_SEEN_KEY_VERSIONS = 100_000

T = TypeVar("T")
# Told each revision this view applies, with its events (none for a revision without any).
AppliedListener = Callable[[str, int, Sequence[Event]], None]


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
    # The most revisions of one followed organization that this replica knows were committed
    # (notified, polled or written here) but has not applied yet.
    revision_lag: int
    # Seconds since a poll last confirmed the view with the database (infinite before the first):
    # the bound on any lag not known of yet.
    unconfirmed_seconds: float
    # Reads of the event log to catch up an organization: other replicas' commits, or a gap.
    log_reads: int = 0


@dataclass(slots=True)  # one per cached key
class _KeyEntry:
    key: ApiKey
    stored_hash: str
    # time.monotonic() when the load started: the entry is at least that fresh.
    loaded_at: float = field(default_factory=time.monotonic)
    principal: Principal | None = None


def _task_stack(task: asyncio.Task[Any]) -> str:
    """Where a task is suspended, as a traceback."""
    out = io.StringIO()
    task.print_stack(file=out)
    return out.getvalue()


class _SingleFlight:
    """Concurrent requests for the same load share one: it runs in a task of its own, which the
    first caller starts and every caller awaits. A caller that gives up (its deadline passed) is
    cancelled alone: the load goes on for the others, who get its result, not the cancellation."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[Any]] = {}

    async def run(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        """The result of `load`, run once for all callers that ask while it runs."""
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(load())
            self._running[key] = running
            running.add_done_callback(lambda done: self._finished(key, done))
        result: T = await asyncio.shield(running)
        return result

    def _finished(self, key: Hashable, done: asyncio.Future[Any]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        if not done.cancelled():
            # Every caller may have given up: mark the outcome retrieved so it is not reported lost.
            done.exception()


class AccessCache:
    """Keys, organization snapshots and last-used times, kept in memory and following the log."""

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
        self._digests: dict[str, str] = {}  # key id -> digest of the cached entry
        self._seen_key_versions: OrderedDict[str, int] = OrderedDict()
        # Every key's digest, in brief (those loaded or made here included, kept across
        # invalidations): a throttled caller's credential is looked up only if it is one of them.
        self.directory = KeyDirectory(database)
        self._snapshots: dict[str, OrgSnapshot] = {}
        self._snapshot_loaded_at: dict[str, float] = {}
        # The revision of each followed organization whose events are all applied here.
        self._applied: dict[str, int] = {}
        # Per organization, this replica's own commits shown before the revisions below them
        # were applied (another replica committed in between): revision -> its events.
        self._ahead: dict[str, dict[int, list[Event]]] = {}
        # The newest revision of each organization this replica committed or heard of.
        self._heard: dict[str, int] = {}
        self._loads = _SingleFlight()
        # time.monotonic() when the last successful poll started; None before the first one.
        self._confirmed_at: float | None = None
        self._last_used: dict[str, datetime] = {}
        self._flushed: dict[str, datetime] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._catch_ups: set[asyncio.Task[None]] = set()
        self._applied_listeners: list[AppliedListener] = []
        self._key_hits = 0
        self._key_misses = 0
        self._log_reads = 0
        database.on_commit(self._committed)

    def stats(self) -> CacheStats:
        """Sizes, key hit/miss counts and how far behind the database the view is, for metrics."""
        applied = dict(self._applied)
        lag = max(
            (heard - applied[org] for org, heard in list(self._heard.items()) if org in applied), default=0
        )
        return CacheStats(
            len(self._keys),
            len(self._snapshots),
            self._key_hits,
            self._key_misses,
            max(lag, 0),
            self.staleness(),
            self._log_reads,
        )

    # -- following the log --------------------------------------------------------------------

    def revision(self, organization_id: str) -> int | None:
        """The revision of the organization this view reflects; None when it holds none."""
        return self._applied.get(organization_id)

    def _committed(self, organization_id: str, revision: int, events: list[Event]) -> None:
        """A write of this replica committed: apply it now when it follows what is applied,
        else catch up from the log (another replica's commit came in between). Key records are
        replaced at once either way, so a revoke is refused from the very next call."""
        self._apply_keys(events)
        self._heard[organization_id] = max(revision, self._heard.get(organization_id, 0))
        applied = self._applied.get(organization_id)
        if applied is None or revision <= applied:
            return
        if revision == applied + 1:
            self._apply(organization_id, revision, events)
            return
        # Another process committed in between: show this write at once (re-applying an event is
        # harmless), and read the ones missed from the log, which applies this one again after.
        # Kept until the log reaches it: a catch-up already reading may stop short of it, and the
        # older events it applies would otherwise undo this write here until the next catch-up.
        snapshot = self._snapshots.get(organization_id)
        if snapshot is not None:
            self._snapshots[organization_id] = snapshot.applying(events, snapshot.revision)
            self._ahead.setdefault(organization_id, {})[revision] = events
        self._schedule_catch_up(organization_id)

    def _heard_of(self, organization_id: str, revision: int) -> None:
        """Another replica committed `revision` (a notification)."""
        self._heard[organization_id] = max(revision, self._heard.get(organization_id, 0))
        applied = self._applied.get(organization_id)
        if applied is not None and revision > applied:
            self._schedule_catch_up(organization_id)

    def on_applied(self, listener: AppliedListener) -> None:
        """Calls `listener(organization_id, revision, events)` for each revision applied here,
        in revision order per organization (a snapshot loaded afresh skips revisions unseen)."""
        self._applied_listeners.append(listener)

    def _apply(self, organization_id: str, revision: int, events: Sequence[Event]) -> None:
        """Applies one revision's events in order to the snapshot; keys were applied already."""
        snapshot = self._snapshots.get(organization_id)
        if snapshot is not None:
            snapshot = snapshot.applying(events, revision)
            ahead = self._ahead.get(organization_id)
            if ahead:
                for own in sorted(ahead):
                    if own <= revision:
                        del ahead[own]
                    else:  # this replica's own later write stays shown
                        snapshot = snapshot.applying(ahead[own], revision)
                if not ahead:
                    del self._ahead[organization_id]
            self._snapshots[organization_id] = snapshot
        self._applied[organization_id] = revision
        for listener in self._applied_listeners:
            listener(organization_id, revision, events)

    def _apply_keys(self, events: Iterable[Event]) -> None:
        for event in events:
            record = event.resource
            if not isinstance(record, ApiKey):
                continue
            self._seen_key_versions[record.id] = max(
                record.version, self._seen_key_versions.get(record.id, 0)
            )
            self._seen_key_versions.move_to_end(record.id)
            while len(self._seen_key_versions) > _SEEN_KEY_VERSIONS:
                self._seen_key_versions.popitem(last=False)
            digest = self._digests.get(record.id)
            entry = self._keys.get(digest) if digest is not None else None
            if entry is not None and entry.key.version < record.version:
                entry.key = record
                entry.principal = None

    def _schedule_catch_up(self, organization_id: str) -> None:
        task = asyncio.ensure_future(self._catch_up_quietly(organization_id))
        self._catch_ups.add(task)
        task.add_done_callback(self._catch_ups.discard)

    def _all_applied(self, organization_id: str) -> bool:
        """Whether every revision of the organization heard of is applied here."""
        return self._heard.get(organization_id, 0) <= self._applied.get(organization_id, 0)

    async def _own_commit_applied(self, organization_id: str) -> bool:
        """Whether all that was heard of the organization is applied, waiting (a bounded while)
        when the one revision missing is the one a write in this process is committing: its
        writer applies it as soon as it resumes, which under load can take a while after the
        commit was announced (its own NOTIFY) or seen (a poll)."""
        for _ in range(OWN_COMMIT_WAITS):
            if self._all_applied(organization_id):
                return True
            heard = self._heard.get(organization_id, 0)
            if (
                not self._db.committing(organization_id, heard)
                or self._applied.get(organization_id, 0) != heard - 1
            ):
                return False
            await asyncio.sleep(OWN_COMMIT_GRACE_SECONDS)
        return self._all_applied(organization_id)

    async def _catch_up_unless_own(self, organization_id: str) -> None:
        """Reads the log for what was heard of, unless it was this process's own commit."""
        if not await self._own_commit_applied(organization_id):
            await self.catch_up(organization_id)

    async def _catch_up_quietly(self, organization_id: str) -> None:
        # A replica hears its own commits too, sometimes before the writer applies them: give the
        # writer a moment, so a commit made here costs no read of the log.
        await asyncio.sleep(OWN_COMMIT_GRACE_SECONDS)
        if await self._own_commit_applied(organization_id):
            return
        try:
            # A read already running may predate the commit that asked for this one: go on
            # until what was heard of is applied (the next poll takes over after a few tries).
            for _ in range(3):
                await self.catch_up(organization_id)
                if self._all_applied(organization_id):
                    return
        except Exception:
            log.warning("catching up organization %s failed; the next poll retries", organization_id)

    async def catch_up(self, organization_id: str) -> None:
        """Reads and applies the organization's events after the applied revision, up to its
        current revision. Concurrent calls for one organization share the read."""
        if organization_id not in self._applied:
            return
        await self._loads.run(("catch-up", organization_id), lambda: self._read_and_apply(organization_id))

    async def _read_and_apply(self, organization_id: str) -> None:
        applied = self._applied.get(organization_id)
        if applied is None:
            return
        self._log_reads += 1
        async with self._db.read() as uow:
            # The revision first: every event up to it has committed, so none is skipped.
            latest = (await uow.organizations.revisions([organization_id])).get(organization_id)
            if latest is None or latest <= applied:
                return
            events = await uow.events.after(
                organization_id, applied, up_to=latest, limit=MAX_CATCH_UP_EVENTS + 1
            )
        if len(events) > MAX_CATCH_UP_EVENTS:
            log.info("organization %s is %d+ events behind: loading it afresh", organization_id, len(events))
            self._forget(organization_id)
            return
        self._apply_keys(events)
        for revision, group in groupby(events, key=lambda event: event.revision):
            if revision > self._applied.get(organization_id, revision):
                self._apply(organization_id, revision, list(group))
        # Revisions without events (a write that changed nothing) are applied too.
        if latest > self._applied.get(organization_id, latest):
            self._apply(organization_id, latest, ())

    async def reach(self, organization_id: str, revision: int) -> bool:
        """Waits, within a bounded time, until this view reflects at least `revision` of the
        organization (a caller's freshness demand); reads through to the log to get there.

        False when the view no longer follows the organization: it was too far behind to catch
        up event by event and was dropped, so what the caller holds of it is stale and must be
        loaded afresh (which reflects every revision committed before the load)."""
        deadline = time.monotonic() + MIN_REVISION_WAIT_SECONDS
        while True:
            applied = self._applied.get(organization_id)
            if applied is None:
                return False
            if applied >= revision or time.monotonic() >= deadline:
                return True
            await self.catch_up(organization_id)
            if (self._applied.get(organization_id) or 0) < revision:
                await asyncio.sleep(0.01)

    def _forget(self, organization_id: str) -> None:
        """Drops everything held about the organization; the next call loads it afresh."""
        self._snapshots.pop(organization_id, None)
        self._snapshot_loaded_at.pop(organization_id, None)
        self._applied.pop(organization_id, None)
        self._ahead.pop(organization_id, None)
        for key_id, digest in list(self._digests.items()):
            entry = self._keys.get(digest)
            if entry is None or entry.key.organization_id == organization_id:
                self._digests.pop(key_id, None)
                self._keys.pop(digest, None)

    # -- snapshots ----------------------------------------------------------------------------

    async def snapshot(self, organization_id: str) -> OrgSnapshot | None:
        """The organization's access snapshot, loaded on a miss; None if there is no such org."""
        cached = self._snapshots.get(organization_id)
        if cached is not None:
            return cached
        return await self._loads.run(
            ("snapshot", organization_id), lambda: self._load_snapshot(organization_id)
        )

    async def _load_snapshot(self, organization_id: str) -> OrgSnapshot | None:
        started = time.monotonic()
        async with self._db.read() as uow:
            # The revision first: the state read after it reflects at least that revision, and
            # events after it re-applied on top change nothing they already show.
            revision = (await uow.organizations.revisions([organization_id])).get(organization_id)
            if revision is None:
                return None
            organization = await uow.organizations.get(organization_id)
            environments = await uow.environments.all_of(organization_id)
            roles = await uow.members.roles_of(organization_id)
            environment_roles = await uow.members.environment_roles_of(organization_id)
        if organization is None:  # pragma: no cover - organizations are never removed
            return None
        snapshot = OrgSnapshot(
            organization=organization,
            revision=revision,
            environments={env.id: env for env in environments},
            member_roles=roles,
            environment_roles=environment_roles,
        )
        self._snapshots[organization_id] = snapshot
        self._snapshot_loaded_at[organization_id] = started
        self._applied[organization_id] = revision
        self._ahead.pop(organization_id, None)  # a load shows every commit made before it
        if self._heard.get(organization_id, 0) > revision:
            # A commit was applied to nothing while this load ran: read it from the log.
            self._schedule_catch_up(organization_id)
        return snapshot

    # -- keys ---------------------------------------------------------------------------------

    def _cached_entry(self, digest: str) -> _KeyEntry | None:
        """The cached key with that digest (counted as a hit, and made the most recent)."""
        entry = self._keys.get(digest)
        if entry is not None:
            self._key_hits += 1
            self._keys.move_to_end(digest)
        return entry

    async def _loaded_entry(self, digest: str) -> _KeyEntry | None:
        """The key with that digest read from the database (counted as a miss); concurrent
        misses for one digest share the read."""
        self._key_misses += 1
        return await self._loads.run(("key", digest), lambda: self._load_key_entry(digest))

    async def _load_key_entry(self, digest: str) -> _KeyEntry | None:
        started = time.monotonic()
        async with self._db.read() as uow:
            found = await uow.api_keys.find_by_hash(digest)
        if found is None:
            return None
        key, stored_hash = found
        if key.version < self._seen_key_versions.get(key.id, 0):
            # An event newer than this read was applied while it ran: read once more.
            async with self._db.read() as uow:
                found = await uow.api_keys.find_by_hash(digest)
            if found is None:  # pragma: no cover - keys are never removed
                return None
            key, stored_hash = found
        self.remember(digest)
        # The read matched on the digest, so the stored one is equal: keep one string, not two.
        same = self._hasher.same(stored_hash, digest)
        entry = _KeyEntry(key=key, stored_hash=digest if same else stored_hash, loaded_at=started)
        self._keys[digest] = entry
        self._digests[key.id] = digest
        while len(self._keys) > self._max_keys:
            _, evicted = self._keys.popitem(last=False)
            self._digests.pop(evicted.key.id, None)
        return entry

    def remember(self, digest: str) -> None:
        """Notes the digest of a key that exists (loaded, or made by this process), so that it is
        looked up even for a throttled caller (`known_only`)."""
        self.directory.add(digest)

    async def authenticate(
        self, secret: str, now: datetime | None = None, *, min_revision: int = 0, known_only: bool = False
    ) -> Authentication:
        """Who the secret is, as of at least `min_revision` of its organization (see `reach`). A
        malformed secret is refused before any lookup; with `known_only`, so is one this process
        never loaded (NOT_FOUND without reading the database)."""
        # A cached digest is only ever one of a well-formed secret, so a warm key skips the shape
        # and checksum checks (a third of this method); any other secret meets them before a
        # lookup. Only secrets of a plausible length are hashed first.
        digest = self._hasher.digest(secret) if len(secret) <= keys.MAX_SECRET_LENGTH else ""
        entry = self._cached_entry(digest)
        key_cached = entry is not None
        if entry is None:
            if keys.parse(secret) is None:
                return Authentication(None, Denial.MALFORMED)
            if known_only and not await self.directory.knows(digest, time.monotonic()):
                return Authentication(None, Denial.NOT_FOUND)
            entry = await self._loaded_entry(digest)
        if entry is None or not self._hasher.same(entry.stored_hash, digest):
            return Authentication(None, Denial.NOT_FOUND)
        organization_id = entry.key.organization_id
        snapshot = self._snapshots.get(organization_id)
        if snapshot is None:
            snapshot = await self.snapshot(organization_id)
            if key_cached and organization_id not in self._snapshots:
                # The key outlived its organization's snapshot (a load failed in between, as in
                # an outage): nothing followed the log for it since. Read it again.
                entry = await self._load_key_entry(digest)
                if entry is None or not self._hasher.same(entry.stored_hash, digest):
                    return Authentication(None, Denial.NOT_FOUND)
        if snapshot is None:  # pragma: no cover - keys always belong to an organization
            return Authentication(None, Denial.NOT_FOUND)
        if min_revision > (self._applied.get(organization_id) or 0):
            if not await self.reach(organization_id, min_revision):
                # Dropped meanwhile, key entry and all: loaded afresh, the answer reflects every
                # revision committed before the load, so the demand needs no second wait.
                return await self.authenticate(secret, now, known_only=known_only)
            snapshot = self._snapshots.get(organization_id, snapshot)
        self._require_fresh(entry, organization_id)
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
        # In batches, each its own short transaction: other writers (and, on SQLite, whose writes
        # run on the event loop's thread, other calls) go on between them.
        pending = list(due.items())
        for start in range(0, len(pending), LAST_USED_BATCH):
            batch = dict(pending[start : start + LAST_USED_BATCH])
            async with self._db.write(None) as uow:
                await uow.last_used.record(batch)
            self._flushed.update(batch)

    # -- background work ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Confirms the view with the database: catches up every followed organization whose
        revision moved on (another replica wrote), or, following none, just reaches the
        database. Only a poll that succeeds counts as a confirmation; one that fails leaves the
        view as it was."""
        started = time.monotonic()
        followed = list(self._applied)
        if followed:
            async with self._db.read() as uow:
                revisions = await uow.organizations.revisions(followed)
            behind = [
                organization_id
                for organization_id, revision in revisions.items()
                if revision > self._applied.get(organization_id, revision)
            ]
            for organization_id in behind:
                self._heard[organization_id] = max(
                    revisions[organization_id], self._heard.get(organization_id, 0)
                )
            await asyncio.gather(*(self._catch_up_unless_own(organization_id) for organization_id in behind))
        else:
            await self._db.ping()
        self._confirmed_at = started

    async def confirm(self) -> bool:
        """One poll now, for start-up: True when the database answered."""
        try:
            async with asyncio.timeout(self._poll_timeout):
                await self.refresh()
        except Exception:
            log.exception("the database did not answer at start-up; retrying in the background")
            return False
        return True

    async def _caught_up_after_reconnect(self) -> None:
        """The listener (re)connected: commits made while it was away are read from the log."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._poll_timeout):
                await self.refresh()

    async def _every(self, seconds: float, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Runs `work` every `seconds` until cancelled, each run bounded by the poll timeout. A
        failure never ends the loop: the first of a run of failures of one kind is logged with its
        traceback, the repeats on one line each, so an outage does not flood the log."""
        failing: type[BaseException] | None = None
        failures = 0
        while True:
            await asyncio.sleep(seconds)
            try:
                # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that arrives
                # as `work` completes, and this loop would then outlive stop().
                async with asyncio.timeout(max(self._poll_timeout, seconds)):
                    await work()
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
        """Starts following other replicas' commits and flushing last-used times."""
        self._tasks = [
            asyncio.create_task(self._every(self.refresh_interval, "refresh", self.refresh)),
            asyncio.create_task(self._every(LAST_USED_FLUSH_SECONDS / 3, "flush", self.flush_last_used)),
            asyncio.create_task(self._every(PASS_SECONDS, "key directory", self.directory.run_pass)),
        ]
        if self._db.notifies:
            self._tasks.append(
                asyncio.create_task(
                    self._db.follow_commits(
                        self._heard_of, self._caught_up_after_reconnect, self._poll_timeout
                    )
                )
            )

    async def stop(self) -> None:
        """Stops background work and writes pending last-used times (a failure is logged: the
        times are advisory and shutdown must go on)."""
        tasks = [*self._tasks, *self._catch_ups]
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_WAIT_SECONDS)
            for task in stuck:  # shutdown goes on; say what did not end
                log.error(
                    "background task %s did not stop when cancelled:\n%s", task.get_name(), _task_stack(task)
                )
        self._tasks = []
        self._flushed.clear()
        try:
            # Advisory times must not hold shutdown: a write lock still held by a background task
            # cancelled mid-transaction would otherwise keep this waiting for SQLite's busy timeout.
            async with asyncio.timeout(min(self._poll_timeout, FINAL_FLUSH_SECONDS)):
                await self.flush_last_used()
        except Exception:
            log.exception("last-used times could not be written at shutdown")
