"""Credentials an operator rotates, taken up without a restart: the TLS files and a verifier-token
file (`AGENTPOST_VERIFIER_TOKENS=@FILE`).

Certificates are short-lived where they are issued automatically, and tokens are rotated by
writing a new file (or by a secret store swapping a mounted one). Each set of files is looked at
at most once every `CHECK_SECONDS`, a `stat` of each file, when it is next needed: TLS files when
a client connects (gRPC asks for the certificate at every handshake), the token file when a
`VerifyApiKey` call arrives. When a file's identity, size or modification time changed,
the set is read again and checked as at start. What cannot be used (a key that is not the
certificate's, half of a pair written, an empty token file) is logged once as a warning and the
previous credentials stay in use: a rotation gone wrong never leaves a server without TLS or
with VerifyApiKey open. Connections already open keep the certificate they were made with.

A certificate's expiry is logged when it is loaded (a warning when it is past or less than
`EXPIRY_WARNING` away) and exported as `agentpost_tls_certificate_expiry_timestamp_seconds`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from service.app.config import checked_tls_files, read_token_file

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0
EXPIRY_WARNING = timedelta(days=14)

# What tells one version of a file from the next: (device, inode, size, modification time in ns),
# or None while the file cannot be looked at.
_Stamp = tuple[int, int, int, int] | None


def _stamp(path: str) -> _Stamp:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


class WatchedFiles:
    """Files looked at (a `stat` each) at most once every `interval` seconds; `changed()` says
    whether any differs from when it last said so. Safe to call from any thread."""

    def __init__(self, paths: Iterable[str], interval: float = CHECK_SECONDS) -> None:
        self._paths = tuple(paths)
        self._interval = interval
        self._seen = self._stamps()
        self._next_look = time.monotonic() + interval
        self._lock = threading.Lock()

    def _stamps(self) -> tuple[_Stamp, ...]:
        return tuple(_stamp(path) for path in self._paths)

    def changed(self) -> bool:
        """Whether a file changed since the last look that said so (False between looks)."""
        now = time.monotonic()
        if now < self._next_look or not self._lock.acquire(blocking=False):
            return False
        try:
            self._next_look = now + self._interval
            stamps = self._stamps()
            if stamps == self._seen:
                return False
            self._seen = stamps
            return True
        finally:
            self._lock.release()


@dataclass(frozen=True)
class TlsFiles:
    """The TLS files' contents, checked to serve together."""

    chain: bytes
    key: bytes
    client_ca: bytes | None
    subject: str
    not_after: datetime

    @staticmethod
    def read(cert_file: str, key_file: str, client_ca_file: str | None) -> TlsFiles:
        """The files' contents, each read once and checked as they are (see
        `config.usable_tls`); a ValueError naming the setting when they cannot serve TLS.
        Checking the bytes that will be served, not the paths, means a file changed meanwhile
        is never served unchecked: a pair caught half written is refused, and the next change
        is read again."""
        chain, key, client_ca, leaf = checked_tls_files(cert_file, key_file, client_ca_file)
        return TlsFiles(
            chain=chain,
            key=key,
            client_ca=client_ca,
            subject=leaf.subject.rfc4514_string(),
            not_after=leaf.not_valid_after_utc,
        )

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """What gRPC serves for them."""
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.chain)], root_certificates=self.client_ca
        )

    def report_expiry(self) -> None:
        """Logs when the certificate expires: a warning when it has, or soon will."""
        left = self.not_after - datetime.now(UTC)
        if left <= timedelta(0):
            log.warning(
                "the TLS certificate (%s) expired at %s; clients refuse it until it is replaced",
                self.subject,
                self.not_after.isoformat(),
            )
        elif left < EXPIRY_WARNING:
            log.warning(
                "the TLS certificate (%s) expires at %s, in %d days; replace its files (taken up "
                "without a restart)",
                self.subject,
                self.not_after.isoformat(),
                left.days,
            )
        else:
            log.info("TLS certificate %s, valid until %s", self.subject, self.not_after.isoformat())


class ServerTls:
    """The server's TLS credentials, re-read when their files change (see the module)."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None) -> None:
        self._files = (cert_file, key_file, client_ca_file)
        self._watched: WatchedFiles | None = None
        self.current: TlsFiles | None = None
        self.reloads = {"loaded": 0, "refused": 0}

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that serve the files as they are now, and as they will be. A ValueError
        when they cannot serve TLS now."""
        # Looked at before they are read: a change while they are read is then seen as one.
        self._watched = WatchedFiles(path for path in self._files if path is not None)
        self.current = TlsFiles.read(*self._files)
        self.current.report_expiry()
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration(),
            self._newer,
            require_client_authentication=self.current.client_ca is not None,
        )

    def _newer(self) -> grpc.ServerCertificateConfiguration | None:
        """Asked by gRPC, on its own thread, at every handshake: the new configuration when the
        files changed and can be used, else None (keep serving the current one). Never raises
        (gRPC would log the error as a failed reload and keep the current one)."""
        try:
            if self._watched is None or not self._watched.changed():
                return None
            loaded = TlsFiles.read(*self._files)
        except ValueError as error:
            self.reloads["refused"] += 1
            log.warning(
                "the TLS files changed but cannot be used (%s); still serving the previous ones", error
            )
            return None
        except Exception:
            self.reloads["refused"] += 1
            log.exception("reading the changed TLS files failed; still serving the previous ones")
            return None
        self.reloads["loaded"] += 1
        self.current = loaded
        log.info("the TLS files changed; new connections get the new certificate")
        loaded.report_expiry()
        return loaded.configuration()

    def expiry_timestamp(self) -> float | None:
        """When the certificate served to new connections expires (Unix time), once loaded."""
        return None if self.current is None else self.current.not_after.timestamp()


class TokenFile:
    """Tokens read from a file (`tokens`), read again when it changes: call it for the tokens
    when they changed (None while they did not, or when the new file cannot be used). `what`
    names them in log lines ("verifier tokens", "operator token"); `commas` whether commas also
    separate them (see `token_list`)."""

    def __init__(self, path: Path, what: str, *, commas: bool) -> None:
        self._path = path
        self._what = what
        self._commas = commas
        # Looked at before it is read: a change while it is read is then seen as one.
        self._watched = WatchedFiles([str(path)])
        self.tokens = read_token_file(path, commas=commas)

    def __call__(self) -> tuple[str, ...] | None:
        if not self._watched.changed():
            return None
        try:
            tokens = read_token_file(self._path, commas=self._commas)
        except ValueError as error:
            log.warning(
                "the %s file changed but cannot be used (%s); the tokens read before still apply",
                self._what,
                error,
            )
            return None
        log.info("the %s file changed: %d tokens now", self._what, len(tokens))
        return tokens
