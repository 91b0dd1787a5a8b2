"""The benchmark's baseline: a bare grpc.aio server that echoes bytes back.

Run as `python -m tests.bench.echo PORT`. It has no interceptor, no protobuf and no storage, so
it measures what grpc.aio itself costs per unary call on this machine; `tests.bench` divides
every scenario's throughput by this one's.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc

ECHO_METHOD = "/bench.Echo/Echo"


async def _echo(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
    return request


def echo_handler() -> grpc.GenericRpcHandler:
    """A generic handler serving `/bench.Echo/Echo` with identity (bytes) serializers."""
    return grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )


async def serve(port: int) -> None:
    """Serves the echo on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((echo_handler(),))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
