"""`make bench-large`: the hot paths on a large database against the same paths on a small one.

Seeds two SQLite files (or PostgreSQL schemas) with `agentpost-environments seed`:

- small: one organization with 200 environments and 40,000 keys (enough for the cold scenario,
  and for a full page at 90% of the environments);
- large: one organization with 100,000 environments and 1,000,000 keys, and beside it 10,000
  organizations with 10 environments and 100 keys each (1,100,000 keys, 200,000 environments).

Then it serves each with one process and measures, with the load client of `make bench`: cold
VerifyApiKey (every call a key never seen before: a database read), warm VerifyApiKey, GetEnvironment
by slug, a ListEnvironments page deep in the list (its token taken after 90% of the environments),
and CreateEnvironment (a write into the organization holding them all). Last it verifies as many
distinct keys as the key cache holds (100,000 by default) and reports the server's resident memory
before and after: the memory of a full key cache.

Run: `python -m tests.bench.large [--duration S] [--postgres URL] [--keys N] [--environments N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from agentpost.environments.v1 import api_key_pb2, api_key_pb2_grpc, environment_pb2, environment_pb2_grpc

from tests.bench.__main__ import (
    CREATE_ENVIRONMENT,
    GET_ENVIRONMENT,
    LIST_ENVIRONMENTS,
    VERIFY,
    service_arguments,
)
from tests.bench.load import Load, Result, Scenario, run_load
from tests.bench.processes import PROJECT_ROOT, ServerProcess, health_serving, start_server
from tests.bench.report import environment_facts
from tests.harness import auth
from tests.servers import scratch_schema

DEFAULT_KEY_CACHE_SIZE = 100_000
LIST_PAGE_SIZE = 10
WALK_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Shape:
    """One database to seed: a main organization, and optionally many small ones beside it."""

    name: str
    environments: int
    keys: int
    spread_organizations: int = 0
    spread_environments: int = 0
    spread_keys: int = 0


@dataclass
class Measured:
    """What one database measured, by scenario name."""

    shape: Shape
    seed_seconds: float = 0.0
    results: dict[str, Result] = field(default_factory=dict)
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    filled_keys: int = 0
    fill_seconds: float = 0.0


def _seed(
    url: str, schema: str | None, organizations: int, environments: int, keys: int, sample: int, out: Path
) -> dict[str, Any]:
    command = [sys.executable, "-m", "service", "seed", "--database-url", url, "--output", str(out)]
    command += ["--organizations", str(organizations), "--environments", str(environments)]
    command += ["--keys", str(keys), "--sample", str(sample)]
    if schema is not None:
        command += ["--database-schema", schema]
    subprocess.run(command, cwd=PROJECT_ROOT, check=True, stdout=subprocess.DEVNULL)
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _rss_kib(server: ServerProcess) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _verify(secret: str) -> bytes:
    return api_key_pb2.VerifyApiKeyRequest(
        secret=secret, required_scopes=["inboxes:read"]
    ).SerializeToString()


def _rotating(requests: list[bytes]) -> Callable[[], bytes]:
    cycle = itertools.cycle(requests)
    return lambda: next(cycle)


def _each_once(requests: Iterator[bytes]) -> Callable[[], bytes]:
    """A fresh request per call; repeats the last one if the supply runs out (then it is warm)."""
    last = b""

    def request() -> bytes:
        nonlocal last
        last = next(requests, last)
        return last

    return request


async def _deep_token(channel: grpc.aio.Channel, owner: str, environments: int) -> str:
    """The page token after about 90% of the environments, walked in pages of WALK_PAGE_SIZE."""
    stub = environment_pb2_grpc.EnvironmentServiceStub(channel)
    token, seen = "", 0
    target = max(1, int(environments * 0.9))
    while seen < target:
        size = min(WALK_PAGE_SIZE, target - seen)
        page = await stub.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=size, page_token=token),
            metadata=auth(owner),
            timeout=30.0,
        )
        seen += len(page.environments)
        token = page.next_page_token
        if not token:
            break
    return token


async def _fill(server: ServerProcess, secrets_left: Iterator[str], concurrency: int) -> int:
    """Verifies every remaining secret once (each a cache miss); returns how many were valid."""
    valid = 0
    async with server.channel() as channel:
        stub = api_key_pb2_grpc.ApiKeyServiceStub(channel)

        async def worker() -> None:
            nonlocal valid
            for secret in secrets_left:
                answer = await stub.VerifyApiKey(api_key_pb2.VerifyApiKeyRequest(secret=secret), timeout=30.0)
                valid += answer.valid

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return valid


async def measure_shape(
    shape: Shape, directory: Path, postgres: str | None, load: Load, fill: int
) -> Measured:
    """Seeds one database, serves it and measures every scenario on it."""
    measured = Measured(shape)
    async with _database(postgres, directory, shape.name) as (url, schema):
        token = "t" + secrets.token_hex(16)
        # The schema first (seeding migrates too, but the server must find it current).
        started = time.perf_counter()
        sample = fill + 1000 + 30_000  # the warm keys, the cold scenario's, and the fill's
        main = _seed(
            url, schema, 1, shape.environments - 1, shape.keys - 1, sample, directory / f"{shape.name}.json"
        )
        if shape.spread_organizations:
            _seed(
                url,
                schema,
                shape.spread_organizations,
                shape.spread_environments - 1,
                shape.spread_keys - 1,
                0,
                directory / f"{shape.name}-spread.json",
            )
        measured.seed_seconds = time.perf_counter() - started
        print(f"  {shape.name}: seeded in {measured.seed_seconds:.0f} s", file=sys.stderr, flush=True)
        owner = main["organizations"][0]["owner_secret"]
        key_secrets: list[str] = main["key_secrets"]
        slug = main["environment_slugs"][len(main["environment_slugs"]) // 2]
        server = await start_server(
            f"service {shape.name}", service_arguments(url, schema, token, False), health_serving, directory
        )
        try:
            async with server.channel() as channel:
                deep = await _deep_token(channel, owner, shape.environments)
            warm = [_verify(secret) for secret in key_secrets[:1000]]
            cold = (_verify(secret) for secret in key_secrets[1000:])
            list_request = environment_pb2.ListEnvironmentsRequest(page_size=LIST_PAGE_SIZE, page_token=deep)
            scenarios = [
                Scenario("VerifyApiKey cold (a new key each call)", server, VERIFY, _each_once(cold)),
                Scenario("VerifyApiKey warm (1,000 keys)", server, VERIFY, _rotating(warm)),
                Scenario(
                    "GetEnvironment by slug",
                    server,
                    GET_ENVIRONMENT,
                    _rotating([environment_pb2.GetEnvironmentRequest(slug=slug).SerializeToString()]),
                    auth(owner),
                ),
                Scenario(
                    f"ListEnvironments, a page of {LIST_PAGE_SIZE} at 90%",
                    server,
                    LIST_ENVIRONMENTS,
                    _rotating([list_request.SerializeToString()]),
                    auth(owner),
                ),
            ]
            counter = itertools.count()
            create = Scenario(
                "CreateEnvironment (write)",
                server,
                CREATE_ENVIRONMENT,
                lambda: environment_pb2.CreateEnvironmentRequest(
                    name=f"large bench {next(counter)}"
                ).SerializeToString(),
                auth(owner),
            )
            # Cold first: nothing has touched the keys yet. No warm-up for it (it would use up keys).
            for scenario in scenarios:
                scenario_load = (
                    load if scenario is not scenarios[0] else Load(load.concurrency, 1, 0.0, load.duration)
                )
                print(f"  {shape.name}: {scenario.name} ...", file=sys.stderr, flush=True)
                measured.results[scenario.name] = await run_load(scenario, scenario_load)
            async with server.channel() as channel:  # the seeded keys must verify
                answer = await channel.unary_unary(VERIFY)(warm[0], timeout=10.0)
            if not api_key_pb2.VerifyApiKeyResponse.FromString(answer).valid:
                raise SystemExit(f"{shape.name}: a seeded key did not verify")
            write_load = Load(load.concurrency, 1, load.warmup, min(load.duration, 2.0))
            measured.results[create.name] = await run_load(create, write_load)
            if fill:
                measured.rss_before_kib = _rss_kib(server)
                used = measured.results[scenarios[0].name].calls + 1000
                remaining = iter(key_secrets[used : used + fill])
                print(f"  {shape.name}: verifying {fill:,} keys once ...", file=sys.stderr, flush=True)
                started = time.perf_counter()
                measured.filled_keys = await _fill(server, remaining, load.concurrency)
                measured.fill_seconds = time.perf_counter() - started
                measured.rss_after_kib = _rss_kib(server)
        finally:
            server.stop()
    return measured


@contextlib.asynccontextmanager
async def _database(
    postgres: str | None, directory: Path, name: str
) -> AsyncIterator[tuple[str, str | None]]:
    if postgres is None:
        yield f"sqlite+aiosqlite:///{directory / (name + '.db')}", None
        return
    async with scratch_schema(postgres, f"agentpost_large_{name}") as schema:
        yield postgres, schema


def render(small: Measured, large: Measured, load: Load, backend: str) -> str:
    """The two databases side by side."""
    facts = environment_facts()
    lines = [
        f"AgentPost Environments large-database benchmark, {facts['date']}",
        f"python {facts['python']}, {facts['cores']} cores ({facts['machine']}), backend {backend}; "
        f"{load.concurrency} workers, {load.duration:g} s per scenario",
    ]
    for measured in (small, large):
        shape = measured.shape
        spread = (
            f" + {shape.spread_organizations:,} organizations of {shape.spread_environments} environments"
            f" and {shape.spread_keys} keys"
            if shape.spread_organizations
            else ""
        )
        lines.append(
            f"{shape.name}: one organization of {shape.environments:,} environments and {shape.keys:,} keys"
            f"{spread}; seeded in {measured.seed_seconds:.0f} s"
        )
    header = f"{'scenario':<44} {'small /s':>9} {'large /s':>9} {'large/small':>11} {'p99 small':>10} {'p99 large':>10}"
    lines += ["", header, "-" * len(header)]
    for name, result in small.results.items():
        other = large.results.get(name)
        if other is None:
            continue
        ratio = other.calls_per_second / result.calls_per_second if result.calls_per_second else 0.0
        errors = (
            f"  errors: {dict(result.errors)} / {dict(other.errors)}" if result.errors or other.errors else ""
        )
        lines.append(
            f"{name:<44} {result.calls_per_second:>9,.0f} {other.calls_per_second:>9,.0f} {ratio:>11.2f}"
            f" {result.percentile_ms(0.99):>8.1f}ms {other.percentile_ms(0.99):>8.1f}ms{errors}"
        )
    if large.filled_keys:
        grown = large.rss_after_kib - large.rss_before_kib
        lines += [
            "",
            f"key cache filled on the large database: {large.filled_keys:,} more keys verified in "
            f"{large.fill_seconds:.0f} s; resident memory {large.rss_before_kib / 1024:,.0f} MiB -> "
            f"{large.rss_after_kib / 1024:,.0f} MiB ({grown * 1024 / max(large.filled_keys, 1):,.0f} B per key, "
            f"{grown * 1024 / max(large.filled_keys, 1) * 1e6 / 2**30:.2f} GiB per million)",
        ]
    return "\n".join(lines)


async def run(arguments: argparse.Namespace) -> str:
    load = Load(arguments.concurrency, 1, arguments.warmup, arguments.duration)
    small = Shape("small", 200, 40_000)
    large = Shape(
        "large",
        arguments.environments,
        arguments.keys,
        arguments.spread_organizations,
        10,
        100,
    )
    with tempfile.TemporaryDirectory(prefix="agentpost-large-") as scratch:
        directory = Path(scratch)
        measured_small = await measure_shape(small, directory, arguments.postgres, load, fill=0)
        measured_large = await measure_shape(large, directory, arguments.postgres, load, fill=arguments.fill)
    return render(measured_small, measured_large, load, "postgresql" if arguments.postgres else "sqlite")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.large", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, default=4.0, help="measured seconds per scenario (default 4)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each (default 1)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent workers (default 32)")
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys of the large organization")
    parser.add_argument(
        "--environments", type=int, default=100_000, help="environments of the large organization"
    )
    parser.add_argument(
        "--spread-organizations",
        type=int,
        default=10_000,
        help="small organizations beside it (10 environments, 100 keys)",
    )
    parser.add_argument(
        "--fill",
        type=int,
        default=DEFAULT_KEY_CACHE_SIZE,
        help="keys verified once at the end, for the memory figure",
    )
    parser.add_argument(
        "--postgres", metavar="URL", help="seed and serve PostgreSQL (postgresql+asyncpg://...)"
    )
    arguments = parser.parse_args()
    print(asyncio.run(run(arguments)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
