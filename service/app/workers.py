"""`serve --workers N`: N server processes sharing one listen address.

The process the command started becomes the supervisor. It never builds a gRPC server or
channel: it checks that no other process holds the address, migrates and bootstraps once, then
starts each worker as a fresh interpreter (`python -m service serve --worker-of ...`), so no gRPC
state crosses a fork. Every worker is a full server with its own engine and its own access cache,
which follows the event log like any replica's; the kernel spreads new connections across the
workers (SO_REUSEPORT). The supervisor forwards SIGTERM/SIGINT to every worker, each drains in
order, and it exits 0 once all have. A worker that exits on its own is not restarted: the
supervisor stops the others and exits non-zero, so whatever runs the service (systemd, Kubernetes)
restarts the whole set and sees the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.app.config import Settings
from service.application.access import AccessCache
from service.application.dependencies import Dependencies
from service.application.organizations import CreatedOrganization, Organizations
from service.domain.keys import SecretHasher
from service.domain.pagination import Pager, PageTokens
from service.storage import migrate
from service.storage.database import Database, build_engine

log = logging.getLogger(__name__)

WORKER_FLAG = "--worker-of"
# How often a worker checks that its supervisor still lives; an orphan drains and exits.
SUPERVISOR_CHECK_SECONDS = 0.5
# On top of the drain and the grace, how long stopping workers may take before they are killed.
STOP_MARGIN_SECONDS = 10.0
READY_POLL_SECONDS = 0.05
_READY = b"R"

Bootstrap = Callable[[Organizations], Awaitable[CreatedOrganization]]
Announce = Callable[[CreatedOrganization, str], None]


class AddressUnavailable(RuntimeError):
    """The listen address cannot be served by workers: held by another process, or not TCP."""


@dataclass(frozen=True)
class WorkerRole:
    """A worker's place: its number among `count`, its supervisor, and the pipe on which it
    reports that it serves. Travels as the one hidden `--worker-of` argument."""

    index: int
    count: int
    supervisor_pid: int
    ready_fd: int

    def argument(self) -> str:
        """The `--worker-of` value that `parse` reads back."""
        return f"{self.index}/{self.count}:{self.supervisor_pid}:{self.ready_fd}"

    @classmethod
    def parse(cls, text: str) -> WorkerRole:
        """Reads a `--worker-of` value written by `argument`."""
        place, supervisor, ready = text.split(":")
        index, count = place.split("/")
        return cls(int(index), int(count), int(supervisor), int(ready))

    @property
    def tag(self) -> str:
        """What every log line of this worker starts with."""
        return f"worker {self.index}/{self.count} pid {os.getpid()}"

    def report_serving(self) -> None:
        """Tells the supervisor this worker accepts calls."""
        try:
            os.write(self.ready_fd, _READY)
        except OSError:
            log.warning("could not report serving to the supervisor")
        finally:
            with contextlib.suppress(OSError):
                os.close(self.ready_fd)


# -- in a worker ------------------------------------------------------------------------------------


def become_worker(role: WorkerRole) -> None:
    """Prepares this process to serve as one of the supervisor's workers: log lines say which
    worker wrote them, and the worker drains and exits if its supervisor disappears (killed
    without the chance to forward a signal), so it never holds the port alone."""
    tag_log_lines(role.tag)
    # Until the server installs its own handlers, a signal finds nothing to drain.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_before_serving)
    if os.getppid() != role.supervisor_pid:
        log.warning("the supervisor (pid %d) is already gone", role.supervisor_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    threading.Thread(
        target=_drain_when_orphaned, args=(role.supervisor_pid,), name="supervisor-watch", daemon=True
    ).start()


def _stop_before_serving(signum: int, _frame: object) -> None:
    log.info("signal %d before serving: exiting", signum)
    raise SystemExit(0)


def _drain_when_orphaned(supervisor_pid: int) -> None:
    while os.getppid() == supervisor_pid:
        time.sleep(SUPERVISOR_CHECK_SECONDS)
    log.warning("the supervisor (pid %d) is gone: draining", supervisor_pid)
    os.kill(os.getpid(), signal.SIGTERM)


class _TaggedFormatter(logging.Formatter):
    """Another formatter's lines, each starting with the process's tag: the workers share stderr,
    so every line must say which process wrote it."""

    def __init__(self, inner: logging.Formatter, tag: str) -> None:
        super().__init__()
        self._inner = inner
        self._tag = tag

    def format(self, record: logging.LogRecord) -> str:
        """The inner formatter's line after the tag."""
        return f"{self._tag} {self._inner.format(record)}"


def tag_log_lines(tag: str) -> None:
    """Every line the root handlers write from now on starts with `tag`."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_TaggedFormatter(handler.formatter or logging.Formatter(), tag))


# -- in the supervisor ------------------------------------------------------------------------------


def supervise(
    settings: Settings,
    *,
    migrate_first: bool,
    bootstrap: Bootstrap | None,
    announce: Announce,
) -> int:
    """Runs `settings.workers` server processes on the listen address until SIGTERM/SIGINT;
    returns the exit status (0 after an ordered stop, 2 when the address is unavailable, 1 when
    a worker failed)."""
    tag_log_lines(f"supervisor pid {os.getpid()}")
    try:
        address = check_address_free(settings.listen_address)
    except AddressUnavailable as error:
        log.error("%s", error)
        return 2
    shared = settings.model_copy(update={"listen_address": address})
    return asyncio.run(_Supervisor(shared).run(migrate_first, bootstrap, announce))


def check_address_free(listen_address: str) -> str:
    """Binds each of the address's sockets without SO_REUSEPORT, then closes them: that fails if
    any other process listens there, even one that would share the port (SO_REUSEPORT under the
    same user), which the workers' own binds would not notice. Returns the address to share, its
    port chosen here when it was 0.

    SO_REUSEADDR is set, as gRPC sets it, so that connections of a previous run still in TIME_WAIT
    do not count as a holder; on Linux it never lets a second socket bind beside a listening one.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise AddressUnavailable("--workers needs SO_REUSEPORT, which this platform lacks")
    host, port = _split(listen_address)
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise AddressUnavailable(f"cannot listen on {listen_address}: {error}") from error
    bound = 0
    for family, kind, protocol, _name, sockaddr in found:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # A dual-stack wildcard, as gRPC binds `[::]`, must also find IPv4 holders.
                with contextlib.suppress(OSError):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind((sockaddr[0], port, *sockaddr[2:]))
            except OSError as error:
                if error.errno == errno.EADDRNOTAVAIL:
                    continue  # e.g. ::1 for `localhost` on a host without IPv6, as gRPC skips it
                raise AddressUnavailable(f"cannot listen on {listen_address}: {error.strerror}") from error
            port = port or int(probe.getsockname()[1])
            bound += 1
    if bound == 0:
        raise AddressUnavailable(f"cannot listen on {listen_address}: no address can be bound")
    return f"{listen_address.rsplit(':', 1)[0]}:{port}"


def _split(listen_address: str) -> tuple[str, int]:
    if listen_address.startswith("unix:"):
        raise AddressUnavailable(f"--workers needs a TCP listen address, not {listen_address}")
    host, _, port = listen_address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise AddressUnavailable(f"cannot listen on {listen_address}: expected host:port") from None


async def prepare_database(
    settings: Settings, migrate_first: bool, bootstrap: Bootstrap | None
) -> CreatedOrganization | None:
    """Migrates and bootstraps once, for every worker, with storage only (no gRPC); returns the
    organization made on an empty database."""
    if not migrate_first and bootstrap is None:
        return None
    engine = build_engine(
        settings.database_url, schema=settings.database_schema, timeout=settings.database_timeout_seconds
    )
    database = Database(engine)
    try:
        if migrate_first:
            await migrate.upgrade(engine)
        if bootstrap is None:
            return None
        hasher = SecretHasher(settings.key_pepper)
        organizations = Organizations(
            Dependencies(
                database=database,
                # Never started: nothing is served here, the cache only completes the wiring.
                access=AccessCache(database, hasher),
                hasher=hasher,
                pager=Pager(PageTokens(settings.key_pepper)),
            )
        )
        if await organizations.any_exists():
            return None
        return await bootstrap(organizations)
    finally:
        await database.dispose()


@dataclass
class _Worker:
    role: WorkerRole
    process: asyncio.subprocess.Process
    ready_fd: int
    serving: bool = False


def _stopped_cleanly(worker: _Worker) -> bool:
    """Exited 0 after its ordered stop, or ended by a forwarded signal while still starting
    (before it could handle one): nothing was served, so nothing needed draining."""
    code = worker.process.returncode
    return code == 0 or (not worker.serving and code in (-signal.SIGTERM, -signal.SIGINT))


class _Supervisor:
    """Starts the workers, forwards signals to them and waits for them."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._workers: list[_Worker] = []
        self._stopping = asyncio.Event()
        self._announced = False

    async def run(self, migrate_first: bool, bootstrap: Bootstrap | None, announce: Announce) -> int:
        """The whole life of the set of workers; returns the exit status."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        # A signal during a migration lets it finish; then no worker starts.
        created = await prepare_database(self._settings, migrate_first, bootstrap)
        try:
            for index in range(1, self._settings.workers + 1):
                if self._stopping.is_set():
                    break
                self._workers.append(await self._start(index))
            return await self._supervise(created, announce)
        finally:
            for worker in self._workers:
                with contextlib.suppress(OSError):
                    os.close(worker.ready_fd)

    async def _start(self, index: int) -> _Worker:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        role = WorkerRole(index, self._settings.workers, os.getpid(), write_fd)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service",
                "serve",
                WORKER_FLAG,
                role.argument(),
                env=self._worker_environment(),
                pass_fds=(write_fd,),
                # Out of the terminal's process group: a Ctrl-C reaches the supervisor only, which
                # forwards it once; a second one would make the workers exit at once.
                process_group=0,
            )
        finally:
            os.close(write_fd)
        log.info("started worker %d/%d (pid %d)", index, self._settings.workers, process.pid)
        return _Worker(role, process, read_fd)

    def _worker_environment(self) -> dict[str, str]:
        """This environment, with every setting as its variable: flags given to the supervisor
        reach the workers without showing secrets in their command lines."""
        environment = dict(os.environ)
        for name, value in self._settings.model_dump().items():
            variable = f"AGENTPOST_{name.upper()}"
            if value is None:
                environment.pop(variable, None)
            else:
                environment[variable] = str(value)
        return environment

    async def _supervise(self, created: CreatedOrganization | None, announce: Announce) -> int:
        exits = {asyncio.ensure_future(worker.process.wait()): worker for worker in self._workers}
        stopping = asyncio.ensure_future(self._stopping.wait())
        watching = asyncio.ensure_future(self._announce_when_serving(created, announce))
        try:
            await asyncio.wait([*exits, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            stopping.cancel()
        if created is not None and not self._announced:
            # Stopped before every worker served: the organization exists, its key is shown once.
            announce(created, self._settings.listen_address)
        status = 0
        dead: _Worker | None = None
        if not self._stopping.is_set():
            dead = next(worker for future, worker in exits.items() if future.done())
            code = dead.process.returncode
            log.error(
                "worker %d (pid %d) exited with status %s; stopping the others",
                dead.role.index,
                dead.process.pid,
                code,
            )
            # A worker that could not bind reports it the way a single process would.
            status = 2 if code == 2 and not dead.serving else 1
            self._stopping.set()
            self._forward(signal.SIGTERM)
        if not await self._all_exited(list(exits)):
            return 1
        for worker in self._workers:
            if worker is not dead and not _stopped_cleanly(worker):
                log.error(
                    "worker %d (pid %d) exited with status %s",
                    worker.role.index,
                    worker.process.pid,
                    worker.process.returncode,
                )
                status = status or 1
        if status == 0:
            log.info("all %d workers stopped", len(self._workers))
        return status

    async def _announce_when_serving(self, created: CreatedOrganization | None, announce: Announce) -> None:
        while not all(worker.serving for worker in self._workers):
            for worker in self._workers:
                if not worker.serving:
                    with contextlib.suppress(BlockingIOError):
                        worker.serving = os.read(worker.ready_fd, 1) == _READY
            await asyncio.sleep(READY_POLL_SECONDS)
        pids = ", ".join(str(worker.process.pid) for worker in self._workers)
        log.info(
            "%d workers serving on %s (pids %s)", len(self._workers), self._settings.listen_address, pids
        )
        if created is not None:
            self._announced = True
            announce(created, self._settings.listen_address)

    async def _all_exited(self, exits: list[asyncio.Future[int]]) -> bool:
        """Waits for every worker's ordered stop; kills those still running past the drain, the
        grace and a margin. False when any had to be killed."""
        bound = (
            self._settings.shutdown_drain_seconds
            + self._settings.shutdown_grace_seconds
            + STOP_MARGIN_SECONDS
        )
        try:
            async with asyncio.timeout(bound):
                await asyncio.gather(*exits)
        except TimeoutError:
            for worker in self._workers:
                if worker.process.returncode is None:
                    log.error(
                        "worker %d (pid %d) did not stop in %.0f s: killed",
                        worker.role.index,
                        worker.process.pid,
                        bound,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            await asyncio.gather(*exits)
            return False
        return True

    def _on_signal(self, signum: int) -> None:
        if self._stopping.is_set():
            log.warning("second signal: the workers exit at once")
        else:
            log.info("signal received: draining %d workers", len(self._workers))
            self._stopping.set()
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)
