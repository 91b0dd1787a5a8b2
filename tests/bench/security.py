"""`make bench`, the security part: what TLS, verifier tokens and the failed-authentication
throttle cost, measured in the same run as the plaintext figures.

Two more replicas run on the same database: one serving TLS (certificates made at run time), and
one that requires a verifier token and has the throttle off. Then one client floods made-up (well
formed, unknown) secrets while a legitimate caller measures its latency beside it, once against
replica A (throttle on, the default 120 a minute) and once against the unthrottled replica.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from agentpost.environments.v1 import environment_pb2

from service.domain import keys
from service.domain.models import KeyMode
from tests.bench.load import CALL_TIMEOUT_SECONDS, CHANNEL_OPTIONS, Load, Result, Scenario, run_load
from tests.bench.processes import ServerProcess, health_serving, start_server
from tests.certificates import Authority

VERIFIER_TOKEN = secrets.token_urlsafe(24)
FLOOD_WORKERS = 16
LEGITIMATE_WORKERS = 4
_UNKNOWN_SECRETS = 4096


@dataclass
class Flood:
    """A legitimate caller's figures alone and beside a flood of refused credentials."""

    target: str
    quiet: Result
    flooded: Result
    flood_calls: int = 0
    flood_seconds: float = 0.0
    flood_codes: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {
            "target": self.target,
            "quiet": self.quiet.as_json(),
            "flooded": self.flooded.as_json(),
            "flood_calls_per_second": round(self.flood_calls / self.flood_seconds, 1)
            if self.flood_seconds
            else 0,
            "flood_codes": dict(self.flood_codes),
        }


@dataclass
class SecurityServers:
    """The TLS replica and the verifier-token replica."""

    tls: ServerProcess
    verifier: ServerProcess


async def start_security_servers(arguments: Callable[[int], list[str]], directory: Path) -> SecurityServers:
    """Starts a TLS replica and a replica requiring `VERIFIER_TOKEN` with the throttle off."""
    ca = Authority(directory, "bench")
    server = ca.issue("server", server=True)
    tls = await start_server(
        "service TLS",
        lambda port: [
            *arguments(port),
            "--tls-cert-file",
            str(server.cert),
            "--tls-key-file",
            str(server.key),
        ],
        health_serving,
        directory,
        credentials=grpc.ssl_channel_credentials(root_certificates=ca.pem),
    )
    try:
        verifier = await start_server(
            "service verifier tokens",
            lambda port: [
                *arguments(port),
                f"--verifier-tokens={VERIFIER_TOKEN}",  # one argument: a token may start with "-"
                "--auth-failures-per-minute",
                "0",
            ],
            health_serving,
            directory,
        )
    except BaseException:
        tls.stop()
        raise
    return SecurityServers(tls, verifier)


async def _flood(server: ServerProcess, method: str, until: float, flood: Flood) -> None:
    """Sends GetEnvironment with made-up secrets from FLOOD_WORKERS workers until `until`."""
    made_up = [keys.generate(KeyMode.LIVE).secret for _ in range(_UNKNOWN_SECRETS)]
    request = environment_pb2.GetEnvironmentRequest(slug="staging").SerializeToString()
    started = time.perf_counter()
    async with server.channel(options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(method)

        async def worker(offset: int) -> None:
            number = offset
            while time.perf_counter() < until:
                number += FLOOD_WORKERS
                secret = made_up[number % _UNKNOWN_SECRETS]
                try:
                    await call(
                        request,
                        metadata=(("authorization", f"Bearer {secret}"),),
                        timeout=CALL_TIMEOUT_SECONDS,
                    )
                    flood.flood_codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    flood.flood_codes[error.code().name] += 1
                flood.flood_calls += 1

        await asyncio.gather(*(worker(offset) for offset in range(FLOOD_WORKERS)))
    flood.flood_seconds = time.perf_counter() - started


async def measure_flood(target: str, legitimate: Scenario, load: Load) -> Flood:
    """The legitimate caller alone, then beside a flood of made-up secrets to the same server."""
    caller = Load(LEGITIMATE_WORKERS, 1, load.warmup, load.duration)
    quiet = await run_load(legitimate, caller)
    quiet.name = f"{legitimate.name}, alone"
    flood = Flood(target, quiet, Result(legitimate.name))
    until = time.perf_counter() + load.warmup + load.duration
    flooding = asyncio.ensure_future(_flood(legitimate.server, legitimate.method, until, flood))
    flood.flooded = await run_load(legitimate, caller)
    flood.flooded.name = f"{legitimate.name}, during the flood"
    await flooding
    return flood


def render_floods(floods: list[Flood]) -> list[str]:
    """The flood measurements as printed lines."""
    if not floods:
        return []
    lines = [
        "",
        f"a flood of made-up secrets ({FLOOD_WORKERS} workers, GetEnvironment) beside a legitimate caller "
        f"({LEGITIMATE_WORKERS} workers, valid key, GetEnvironment), both from 127.0.0.1:",
    ]
    for flood in floods:
        rate = flood.flood_calls / flood.flood_seconds if flood.flood_seconds else 0.0
        codes = ", ".join(f"{code} {count}" for code, count in flood.flood_codes.most_common())
        lines.append(
            f"  {flood.target}: legitimate p50/p99 {flood.quiet.percentile_ms(0.5):.2f}/"
            f"{flood.quiet.percentile_ms(0.99):.2f} ms alone -> {flood.flooded.percentile_ms(0.5):.2f}/"
            f"{flood.flooded.percentile_ms(0.99):.2f} ms flooded ({flood.flooded.calls_per_second:,.0f} calls/s, "
            f"{flood.flooded.error_count} errors); flood {rate:,.0f} calls/s ({codes})"
        )
    return lines
