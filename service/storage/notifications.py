"""Commit notifications between replicas: PostgreSQL LISTEN on a connection of its own.

Every write NOTIFYs `organization_id:revision` on `REVISION_CHANNEL` inside its transaction, so
the notification is delivered exactly when the write commits. A replica listens on one dedicated
asyncpg connection (never a pooled one: a pooled connection would stop listening when returned).
A notification can be lost while the connection is down; each (re)connection is therefore
reported, and the follower then catches up from the event log itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import URL

log = logging.getLogger(__name__)

REVISION_CHANNEL = "agentpost_revisions"

OnRevision = Callable[[str, int], None]
OnConnected = Callable[[], Awaitable[None]]


def parse_payload(payload: str) -> tuple[str, int] | None:
    """`organization_id:revision`, or None for anything else on the channel."""
    organization_id, _, revision = payload.rpartition(":")
    if not organization_id or not revision.isdigit():
        return None
    return organization_id, int(revision)


async def listen_for_revisions(
    url: URL,
    on_revision: OnRevision,
    on_connected: OnConnected,
    *,
    connect_seconds: float,
    retry_seconds: float = 1.0,
) -> None:
    """Listens until cancelled, reconnecting after `retry_seconds` whenever the connection fails.
    `on_connected` runs after each (re)connection, once the LISTEN is in place, so nothing
    committed after it is missed and anything committed before it can be read from the log."""
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    failures = 0
    while True:
        connection: Any = None
        try:
            connection = await asyncpg.connect(dsn, timeout=connect_seconds)
            lost = asyncio.Event()
            connection.add_termination_listener(lambda _connection, lost=lost: lost.set())

            def notified(_connection: Any, _pid: int, _channel: str, payload: str) -> None:
                parsed = parse_payload(payload)
                if parsed is not None:
                    on_revision(*parsed)

            await connection.add_listener(REVISION_CHANNEL, notified)
            if failures:
                log.info("listening for other replicas' commits again after %d failures", failures)
            failures = 0
            await on_connected()
            # asyncpg notices a dead server only when it next talks to it: check now and then.
            while not lost.is_set():
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await lost.wait()
                if not lost.is_set():
                    async with asyncio.timeout(connect_seconds):
                        await connection.execute("SELECT 1")
            raise ConnectionError("the listening connection was closed")
        except asyncio.CancelledError:
            raise
        except Exception as error:
            failures += 1
            if failures == 1:
                log.warning("listening for other replicas' commits failed (%r); retrying", error)
            await asyncio.sleep(retry_seconds)
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(connect_seconds):
                        await connection.close()
