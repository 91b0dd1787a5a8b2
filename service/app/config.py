"""Configuration from environment variables (AGENTPOST_*), overridable by CLI flags."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATABASE_URL = f"sqlite+aiosqlite:///{PROJECT_ROOT / 'var' / 'agentpost.db'}"
SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


def environment_variable(setting: str) -> str:
    """The environment variable of a setting, e.g. `database_url` -> AGENTPOST_DATABASE_URL."""
    return f"AGENTPOST_{setting.upper()}"


# A credential file (certificate, key, CA bundle, token list) is never near this size; a larger
# one is a mistake, read no further.
MAX_CREDENTIAL_FILE_BYTES = 1 << 20
# The key types gRPC's TLS serves (others, such as Ed448 or secp256k1, pass Python's ssl checks
# but gRPC refuses them when it binds, or when it takes up rotated files).
_SERVED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def read_credential_file(path: str | Path) -> bytes:
    """The bytes of a credential file; a ValueError saying what is wrong when it cannot be read,
    is not a regular file (a FIFO or a device would block the reader) or is larger than
    `MAX_CREDENTIAL_FILE_BYTES`. Opened without blocking, and checked once open, so that a file
    swapped for a FIFO in between cannot block it either."""
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_NOCTTY", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_BINARY", 0)
    )
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError(f"{path} is not a regular file")
        content = b""
        while len(content) <= MAX_CREDENTIAL_FILE_BYTES:
            chunk = os.read(descriptor, MAX_CREDENTIAL_FILE_BYTES + 1 - len(content))
            if not chunk:
                break
            content += chunk
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    finally:
        os.close(descriptor)
    if len(content) > MAX_CREDENTIAL_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CREDENTIAL_FILE_BYTES // 1024} KiB")
    return content


def _readable_pem(path: str) -> str:
    """The path, if it names a readable PEM file; a ValueError saying what is wrong otherwise."""
    if b"-----BEGIN " not in read_credential_file(path):
        raise ValueError(f"{path} is not a PEM file")
    return path


def _named(setting: str) -> str:
    """A setting as an operator sets it: its variable and its flag."""
    return f"{environment_variable(setting)} (--{setting.replace('_', '-')})"


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def usable_tls(cert: bytes, key: bytes, client_ca: bytes | None) -> x509.Certificate:
    """The leaf certificate, when these PEM contents can serve TLS together; else a ValueError
    naming the setting: no certificate, no private key, a key behind a passphrase, a key of a
    type gRPC does not serve, a key that is not the certificate's, a client CA without a
    certificate. gRPC would say so only when it binds the port, after migrating, in lines of its
    own that name no setting (or at the first handshake, or never for rotated files)."""
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ValueError(f"{_named('tls_cert_file')} holds no certificate")
    if b"PRIVATE KEY-----" not in key:
        raise ValueError(f"{_named('tls_key_file')} holds no private key")
    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError as error:
        raise ValueError(f"{_named('tls_cert_file')} holds no usable certificate: {error}") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:
        raise ValueError(
            f"{_named('tls_key_file')} holds a key protected by a passphrase; the server needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ValueError(f"{_named('tls_key_file')} holds no usable private key: {error}") from None
    served = isinstance(private, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) or (
        isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, _SERVED_CURVES)
    )
    if not served:
        kind = getattr(getattr(private, "curve", None), "name", None) or type(private).__name__
        raise ValueError(
            f"{_named('tls_key_file')} holds a {kind} key; gRPC serves RSA, ECDSA (P-256, P-384, "
            "P-521) and Ed25519 keys"
        )
    try:
        certified = leaf.public_key()
    except UnsupportedAlgorithm:
        raise ValueError(
            f"{_named('tls_cert_file')} holds a certificate for a key of an unknown type"
        ) from None
    if _public_der(private.public_key()) != _public_der(certified):
        raise ValueError(
            f"the key in {_named('tls_key_file')} does not belong to the certificate in "
            f"{_named('tls_cert_file')}"
        )
    if client_ca is not None:
        if b"-----BEGIN CERTIFICATE-----" not in client_ca:
            raise ValueError(f"{_named('tls_client_ca_file')} holds no certificate")
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError as error:
            raise ValueError(f"{_named('tls_client_ca_file')} holds no usable certificate: {error}") from None
    return leaf


def checked_tls_files(
    cert: str, key: str, client_ca: str | None
) -> tuple[bytes, bytes, bytes | None, x509.Certificate]:
    """The TLS files' contents, each read once (see `read_credential_file`) and checked to serve
    together (see `usable_tls`), and the leaf certificate."""
    chain = read_credential_file(cert)
    private = read_credential_file(key)
    authorities = None if client_ca is None else read_credential_file(client_ca)
    return chain, private, authorities, usable_tls(chain, private, authorities)


def token_list(text: str, *, commas: bool = True) -> tuple[str, ...]:
    """Tokens as an operator writes them: one a line, and also separated by commas when `commas`
    (verifier tokens; an operator token is one a line, commas and all), blanks around them
    ignored; a ValueError when there is none."""
    if commas:
        text = text.replace(",", "\n")
    tokens = tuple(token.strip() for token in text.split("\n") if token.strip())
    if not tokens:
        raise ValueError("names no token")
    return tokens


TokenSetting = Literal["verifier_tokens", "operator_token"]
# Whether commas separate tokens as lines do: verifier tokens are a list even inline; an
# operator token is one token, commas and all, inline and on each line of its file.
_COMMAS: dict[TokenSetting, bool] = {"verifier_tokens": True, "operator_token": False}


@dataclass(frozen=True)
class TokenSource:
    """The tokens a setting names itself (`inline`), or the file it names (`@FILE`) and whether
    commas separate the tokens in it."""

    inline: tuple[str, ...]
    file: Path | None
    commas: bool


def token_path(value: str) -> Path:
    """The file a `@FILE` setting names; a ValueError when `@` names none."""
    named = value[1:].strip()
    if not named:
        raise ValueError("@ must be followed by the path of a file")
    return Path(named)


def read_token_file(path: Path, *, commas: bool = True) -> tuple[str, ...]:
    """The tokens a file holds (see `token_list`); a ValueError saying why when it cannot be
    read or holds none."""
    try:
        # utf-8-sig: a byte order mark (as some editors write) is not part of the first token.
        text = read_credential_file(path).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"cannot read {path}: not UTF-8 text") from None
    try:
        return token_list(text, commas=commas)
    except ValueError:
        raise ValueError(f"{path} names no token") from None


def host_and_port(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as (host, port): a ValueError unless the port is 0 to 65535 in
    ASCII digits (gRPC would take 70000 for 4464 and a missing port for 443)."""
    host, separator, port = address.rpartition(":")
    if not separator or not (port.isascii() and port.isdigit()) or int(port) > 65_535:
        raise ValueError(f"must be host:port with a port from 0 to 65535, not {address[:100]!r}")
    return host.strip("[]"), int(port)


class Settings(BaseSettings):
    """Every setting of the server. Each field's description is its `--help` text."""

    # No setting is infinite: an endless drain, time-out or staleness would be a hang, not a bound.
    model_config = SettingsConfigDict(env_prefix="AGENTPOST_", extra="ignore", allow_inf_nan=False)

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="SQLAlchemy URL: sqlite+aiosqlite:///FILE (embedded) or postgresql+asyncpg://USER@HOST/DB",
    )
    database_schema: str | None = Field(
        None, description="PostgreSQL only: keep every table in this schema (it must exist)"
    )
    listen_address: str = Field(
        "127.0.0.1:50051", description="host:port to serve gRPC on (port 0: any free port)"
    )
    operator_token: str | None = Field(
        None,
        description="bearer token for CreateOrganization, or @FILE (one token per line, read again when "
        "it changes); unset: CreateOrganization is refused",
    )
    key_pepper: str | None = Field(
        None, description="secret that keys the HMAC-SHA-256 of API key secrets; unset: plain SHA-256"
    )
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="on SIGTERM/SIGINT, how long in-flight calls may take to finish"
    )
    shutdown_drain_seconds: float = Field(
        2.0,
        ge=0,
        description="on SIGTERM/SIGINT, how long calls are still served after health turns NOT_SERVING, "
        "so that load balancers move traffic away first",
    )
    key_cache_size: int = Field(100_000, ge=1, description="how many API keys the verification cache holds")
    cache_refresh_seconds: float | None = Field(
        None,
        gt=0,
        description="how often the revisions of cached organizations are polled for other processes' "
        "writes: the way they are found on SQLite (default 0.05), the safety net behind LISTEN/NOTIFY "
        "on PostgreSQL (default 1.0)",
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="serve: how many processes share the listen address (SO_REUSEPORT), each a full "
        "server whose cache follows the event log",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    database_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="PostgreSQL: how long a connect or a wait for a pooled connection may take "
        "before the call answers UNAVAILABLE",
    )
    tls_cert_file: str | None = Field(
        None, description="PEM certificate chain to serve TLS with (needs --tls-key-file); unset: plaintext"
    )
    tls_key_file: str | None = Field(None, description="PEM private key of --tls-cert-file")
    tls_client_ca_file: str | None = Field(
        None, description="PEM CA certificates: require client certificates signed by them (mTLS)"
    )
    verifier_tokens: str | None = Field(
        None,
        description="comma-separated bearer tokens (or @FILE, one per line) that VerifyApiKey callers "
        "must send; unset: VerifyApiKey is open (local use only)",
    )
    auth_failures_per_minute: int = Field(
        120,
        ge=0,
        description="refused credentials one peer address may send per minute before its further "
        "refusals are RESOURCE_EXHAUSTED (per process; 0: no limit)",
    )
    metrics_address: str | None = Field(
        None, description="host:port to serve Prometheus metrics on at /metrics; unset: no metrics"
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="the event loop a server process runs on: uvloop (faster, see make bench) or "
        "asyncio's own; uvloop falls back to asyncio where it is not installed",
    )
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one JSON object per line")
    access_log: bool = Field(
        False, description="log one line per finished call: method, status code, duration"
    )
    max_staleness_seconds: float = Field(
        300.0,
        ge=0,
        description="while the database does not answer, how long cached keys keep verifying and "
        "health stays SERVING (at least twice the cache refresh interval)",
    )
    watch_heartbeat_seconds: float = Field(
        10.0,
        gt=0,
        description="WatchEvents: the longest a stream goes without a message; a heartbeat carries "
        "the revision reached, and the caller's key is checked again at each",
    )
    watch_buffer_revisions: int = Field(
        1000,
        ge=1,
        description="WatchEvents: how many revisions a stream may fall behind before it ends with "
        "RESOURCE_EXHAUSTED (the consumer watches again from the revision it reached)",
    )
    event_retention_days: float = Field(
        90.0,
        gt=0,
        le=36_500,
        description="how long events are kept (at most 100 years); older ones are pruned in small batches",
    )
    event_prune_interval_seconds: float = Field(
        300.0, gt=0, description="how often events older than the retention are looked for and pruned"
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("use DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @field_validator("listen_address")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        if not value.startswith("unix:"):
            host_and_port(value)
        return value

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        if value is not None:
            host_and_port(value)
        return value

    @field_validator("operator_token")
    @classmethod
    def _operator_token(cls, value: str | None) -> str | None:
        # As a client's bearer token is read (stripped): a token from a file keeps no newline,
        # and a blank one is no token.
        stripped = None if value is None else value.strip()
        if stripped and stripped.startswith("@"):
            # Read again at start, and whenever it changes.
            read_token_file(token_path(stripped), commas=_COMMAS["operator_token"])
        return stripped or None

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError:
            # The value is not echoed: a URL may hold a password.
            raise ValueError("not a database URL (expected DRIVER://...)") from None
        if url.drivername not in SUPPORTED_DRIVERS:
            raise ValueError(
                f"unsupported scheme {url.drivername!r}: use one of {', '.join(SUPPORTED_DRIVERS)}"
            )
        if url.drivername.startswith("sqlite") and value != DEFAULT_DATABASE_URL:
            # The default's folder is the project's own var/, made on first start; any other folder
            # must exist, so a typo fails here instead of creating a stray tree.
            path = url.database or ""
            if path and path != ":memory:" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise ValueError(f"the folder of the SQLite file {path!r} does not exist")
            if path and os.path.isdir(path):
                raise ValueError(f"{path!r} is a folder, not an SQLite file")
        return value

    @field_validator("tls_cert_file", "tls_key_file", "tls_client_ca_file")
    @classmethod
    def _pem_file(cls, value: str | None) -> str | None:
        return None if value is None else _readable_pem(value)

    @field_validator("verifier_tokens")
    @classmethod
    def _tokens(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("@"):
            read_token_file(token_path(value), commas=_COMMAS["verifier_tokens"])  # read again later too
            return value
        return ",".join(token_list(value))

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = "tls_key_file" if self.tls_key_file is None else "tls_cert_file"
            raise ValueError(
                f"{environment_variable(missing)} is required with "
                f"{environment_variable('tls_cert_file' if missing == 'tls_key_file' else 'tls_key_file')}"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                f"{environment_variable('tls_client_ca_file')} needs {environment_variable('tls_cert_file')} "
                f"and {environment_variable('tls_key_file')}"
            )
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            checked_tls_files(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
        return self

    def tokens(self, name: TokenSetting) -> TokenSource:
        """Where the setting `name` takes its tokens from: the value itself, or the file it names."""
        value: str | None = getattr(self, name)
        commas = _COMMAS[name]
        if value is None:
            return TokenSource((), None, commas)
        if value.startswith("@"):
            return TokenSource((), token_path(value), commas)
        return TokenSource(token_list(value, commas=True) if commas else (value,), None, commas)
