"""A database of its own for a test that starts its own server."""

from __future__ import annotations

from pathlib import Path

from tests.servers import Backend


def own_database(backend: Backend, directory: Path) -> Backend:
    """`backend`, but on SQLite in a file of its own. A second server writing to the session
    server's SQLite file can find it busy (one writer at a time); PostgreSQL has no such limit,
    so its run schema is kept."""
    if backend.name != "sqlite":
        return backend
    directory.mkdir(parents=True, exist_ok=True)
    return Backend("sqlite", f"sqlite+aiosqlite:///{directory / 'own.db'}", None)
