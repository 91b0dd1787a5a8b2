"""gRPC calls over plain HTTP/2 (the h2 library), for request metadata a gRPC client refuses to
send (non-ASCII or control bytes, upper-case names) but any other HTTP/2 client, or a proxy in
between, can."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
from google.rpc import error_details_pb2, status_pb2

REQUEST_ID = "x-request-id"
# The answer is expected well within this; it only keeps a hung call from hanging a test.
HANG_SECONDS = 10.0


@dataclass
class RawAnswer:
    """What a gRPC call made over plain HTTP/2 was answered."""

    status: int | None
    message: str
    reason: str
    headers: dict[bytes, bytes]
    reset: bool
    # The answer's message, without its gRPC length prefix (empty when none came).
    data: bytes = b""

    @property
    def request_id(self) -> bytes | None:
        """The `x-request-id` the answer echoed, if any."""
        return self.headers.get(REQUEST_ID.encode())


def _reason_of(details: bytes | None) -> str:
    """The ErrorInfo reason in a `grpc-status-details-bin` trailer (unpadded base64)."""
    if not details:
        return ""
    status = status_pb2.Status.FromString(base64.b64decode(details + b"=" * (-len(details) % 4)))
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def _framed(message: bytes) -> bytes:
    """A gRPC length-prefixed, uncompressed message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def raw_call(
    port: int,
    method: str,
    headers: Sequence[tuple[bytes, bytes]],
    message: bytes = b"",
    *,
    source: str | None = None,
    target: str = "127.0.0.1",
) -> RawAnswer:
    """A unary (or, answered at once, server-streaming) gRPC call over plain HTTP/2 with exactly
    `headers` as its metadata: bytes no conforming gRPC client would send. From the local address
    `source` when given, to `target` (an IPv6 address too)."""
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    reader, writer = await asyncio.open_connection(
        target, port, local_addr=None if source is None else (source, 0), family=family
    )
    received_headers: dict[bytes, bytes] = {}
    data = b""
    try:
        connection.initiate_connection()
        connection.send_headers(
            1,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", method.encode()),
                (b":authority", f"{target}:{port}".encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                *headers,
            ],
        )
        connection.send_data(1, _framed(message), end_stream=True)
        async with asyncio.timeout(HANG_SECONDS):
            while True:
                writer.write(connection.data_to_send())
                await writer.drain()
                received = await reader.read(65536)
                if not received:
                    return RawAnswer(None, "", "", received_headers, True)
                for event in connection.receive_data(received):
                    if isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        return RawAnswer(None, "", "", received_headers, True)
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        received_headers.update((bytes(name), bytes(value)) for name, value in event.headers)
                    if isinstance(event, h2.events.DataReceived):
                        data += event.data or b""
                        connection.acknowledge_received_data(event.flow_controlled_length, 1)
                    if isinstance(event, h2.events.StreamEnded):
                        status = received_headers.get(b"grpc-status")
                        return RawAnswer(
                            int(status) if status is not None else None,
                            received_headers.get(b"grpc-message", b"").decode(errors="replace"),
                            _reason_of(received_headers.get(b"grpc-status-details-bin")),
                            received_headers,
                            False,
                            data[5:],
                        )
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
