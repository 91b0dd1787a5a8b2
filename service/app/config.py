"""Configuration from environment variables (AGENTPOST_*), overridable by CLI flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATABASE_URL = f"sqlite+aiosqlite:///{PROJECT_ROOT / 'var' / 'agentpost.db'}"


class Settings(BaseSettings):
    """Every setting of the server. Each field's description is its `--help` text."""

    model_config = SettingsConfigDict(env_prefix="AGENTPOST_", extra="ignore")

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
        None, description="bearer token for CreateOrganization; unset: CreateOrganization is refused"
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
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    database_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="PostgreSQL: how long a connect or a wait for a pooled connection may take "
        "before the call answers UNAVAILABLE",
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
        90.0, gt=0, description="how long events are kept; older ones are pruned in small batches"
    )
    event_prune_interval_seconds: float = Field(
        300.0, gt=0, description="how often events older than the retention are looked for and pruned"
    )
