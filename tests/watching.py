"""A WatchEvents consumer for tests: reads a stream in the background and waits for what it needs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import grpc
from agentpost.environments.v1 import event_pb2, event_pb2_grpc

from tests.harness import Failure, auth, failure_of

WAIT_SECONDS = 10.0


class Watcher:
    """One WatchEvents stream, read into `messages` until it ends (`failure` then says how)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        secret: str,
        after_revision: int = 0,
        resource_types: Sequence[int] = (),
    ) -> None:
        stub = event_pb2_grpc.EventServiceStub(channel)
        self.call = stub.WatchEvents(
            event_pb2.WatchEventsRequest(
                after_revision=after_revision, resource_types=cast(Any, list(resource_types))
            ),
            metadata=auth(secret),
        )
        self.messages: list[event_pb2.WatchEventsResponse] = []
        self.failure: Failure | None = None
        self.ended = False
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.messages.append(message)
                self._changed.set()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.failure = failure_of(error)
        finally:
            self.ended = True
            self._changed.set()

    async def until(self, condition: Callable[[], bool], seconds: float = WAIT_SECONDS) -> None:
        """Waits until `condition()` holds; fails after `seconds` or if the stream ended first."""
        deadline = time.monotonic() + seconds
        while not condition():
            if self.ended:
                raise AssertionError(f"the stream ended first: {self.failure}")
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"not reached within {seconds} s; got {len(self.messages)} messages"
            self._changed.clear()
            # Woken by each message, and now and then for conditions on anything else.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.05)):
                    await self._changed.wait()

    async def live(self) -> int:
        """Waits for the first message without events (the stream is live); its revision."""
        await self.until(lambda: any(not message.events for message in self.messages))
        return next(message.revision for message in self.messages if not message.events)

    async def ended_with(self, seconds: float = WAIT_SECONDS) -> Failure:
        """Waits for the stream to end with an error; the decoded failure."""
        deadline = time.monotonic() + seconds
        while not self.ended:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the stream did not end within {seconds} s"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
        assert self.failure is not None, "the stream ended without an error"
        return self.failure

    @property
    def events(self) -> list[event_pb2.Event]:
        """Every event received so far, in order."""
        return [event for message in self.messages for event in message.events]

    @property
    def revision(self) -> int:
        """The revision of the last message received (0 before any)."""
        return self.messages[-1].revision if self.messages else 0

    async def reached(self, revision: int, seconds: float = WAIT_SECONDS) -> None:
        """Waits until a message says the stream reached `revision`."""
        await self.until(lambda: self.revision >= revision, seconds)

    async def close(self) -> None:
        """Cancels the stream (a client disconnecting)."""
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._task
