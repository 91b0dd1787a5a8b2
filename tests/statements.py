"""The SQL statements a test server sends to its database while a block runs, for tests of what a
call costs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from tests.harness import Harness


def background_statement(statement: str) -> bool:
    """A statement of the server's timers (revision poll, last-used flush, key-directory pass)."""
    text = " ".join(statement.split()).lower()
    # With no organization held yet, the poll only checks that the database answers.
    return (
        text == "select 1"
        or text.startswith("select organizations.id, organizations.revision")
        or (text.startswith("update api_keys set last_used_time"))
        or text.startswith("select api_keys.id, api_keys.secret_hash from api_keys where api_keys.id >")
    )


@contextmanager
def counted_sql(harness: Harness, *, background: bool = False) -> Iterator[list[str]]:
    """Records the statements the server sends while the block runs (its timers' too, with `background`)."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if background or not background_statement(statement):
            statements.append(statement)

    # Every engine: reads and writes may have engines of their own (SQLite).
    engines = harness.app.database.engines
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)
