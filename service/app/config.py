"""Configuration from environment variables (AGENTPOST_*), overridable by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    cache_refresh_seconds: float = Field(
        1.0, gt=0, description="how often other replicas' writes are looked for (the revocation bound)"
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    database_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="PostgreSQL: how long a connect or a wait for a pooled connection may take "
        "before the call answers UNAVAILABLE",
    )
    metrics_address: str | None = Field(
        None, description="host:port to serve Prometheus metrics on at /metrics; unset: no metrics"
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
