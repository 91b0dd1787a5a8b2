"""A PostgreSQL server of the test's own, in a temporary folder on a free port, that a fault test
may stop and start at will without touching any shared server.

`initdb` and `pg_ctl` come from `PG_BIN` (default: the newest /usr/lib/postgresql/*/bin, else
PATH). PostgreSQL refuses to run as root, so under root every command runs as the `postgres` user,
who then owns the folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.servers import free_port

START_TIMEOUT_SECONDS = 30


def _bin_dir() -> Path | None:
    given = os.environ.get("PG_BIN")
    if given:
        return Path(given)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parent.parent.name)
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def available() -> str | None:
    """None when a private server can be started here, else why not."""
    directory = _bin_dir()
    if directory is None or not (directory / "initdb").exists():
        return "PostgreSQL server binaries (initdb, pg_ctl) were not found; set PG_BIN"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root needs runuser to start PostgreSQL as the postgres user"
    return None


class PrivatePostgres:
    """One throwaway cluster: `create()`, `start()`, `stop()`, `destroy()`; trust auth on 127.0.0.1."""

    def __init__(self) -> None:
        directory = _bin_dir()
        assert directory is not None, available()
        self._bin = directory
        self._root = Path(tempfile.mkdtemp(prefix="agentpost-pg-"))
        self._data = self._root / "data"
        self._log = self._root / "server.log"
        self.port = free_port()
        self._as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the cluster's `postgres` database."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *arguments: str) -> None:
        command = [str(self._bin / arguments[0]), *arguments[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(
                f"{arguments[0]} failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}\n"
                f"{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for error messages."""
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def create(self) -> None:
        """Makes the cluster (trust auth for the `postgres` user)."""
        if self._as_root:
            shutil.chown(self._root, user="postgres", group="postgres")
        self._run("initdb", "-D", str(self._data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        """Starts the server on its port and waits until it accepts connections."""
        options = f"-p {self.port} -k {self._root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "start", "-D", str(self._data), "-l", str(self._log), "-o", options,
            "-w", "-t", str(START_TIMEOUT_SECONDS),
        )  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """Stops the server: `immediate` drops every connection at once, like a crash."""
        self._run("pg_ctl", "stop", "-D", str(self._data), "-m", mode, "-w")

    def destroy(self) -> None:
        """Stops the server if it runs and deletes its folder."""
        if (self._data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self.stop()
        shutil.rmtree(self._root, ignore_errors=True)


@contextlib.contextmanager
def running() -> Iterator[PrivatePostgres]:
    """A new cluster, started; stopped and deleted when the block ends."""
    pg = PrivatePostgres()
    try:
        pg.create()
        pg.start()
        yield pg
    finally:
        pg.destroy()
