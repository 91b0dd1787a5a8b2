"""`make bench`: this service's hot paths against a bare grpc.aio echo, measured in one run.

Starts a bare echo server and this service (SQLite by default, `--postgres URL` for PostgreSQL)
in subprocesses on 127.0.0.1, sets up an organization over gRPC, and drives every scenario with
the same load client (tests/bench/load.py). Throughput is reported (tests/bench/report.py) as a
ratio to the echo, run first and again last; the mean of both is 1.0. Each read scenario runs
interleaved (off, on, on, off) with a replica of the same database that has Prometheus metrics on,
for the cost of metrics. Then a second replica on the same database measures how long a revoke on
one replica takes to be honoured by the other, and how long an event takes from its write's commit
to WatchEvents consumers on both replicas.

Run: `python -m tests.bench [--duration S] [--concurrency N] [--postgres URL] [--json PATH]`.
A scenario whose setup fails (an RPC not implemented yet, say) prints "skipped: <reason>".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from agentpost.environments.v1 import (
    api_key_pb2,
    api_key_pb2_grpc,
    environment_pb2,
    environment_pb2_grpc,
    organization_pb2,
    organization_pb2_grpc,
    resource_pb2,
    resource_pb2_grpc,
)

from tests.bench.delivery import Delivery, measure_delivery
from tests.bench.echo import ECHO_METHOD
from tests.bench.load import Load, Result, Scenario, run_load
from tests.bench.processes import ServerProcess, echo_answers, health_serving, start_server
from tests.bench.report import (
    REVOCATION_POLL_SECONDS,
    SQLITE_POLL_SECONDS,
    Report,
    Revocation,
    UnderWrites,
    render,
)
from tests.bench.security import VERIFIER_TOKEN, Flood, measure_flood, start_security_servers
from tests.harness import auth, corrupt
from tests.servers import free_port, scratch_schema

SCOPED_KEY_SCOPES = ["environments:read", "inboxes:read", "inboxes:write"]
REVOCATION_TIMEOUT_SECONDS = 10.0
WRITE_PATH_SECONDS = 2.0

Metadata = tuple[tuple[str, str], ...]


class Skip(Exception):
    """A scenario cannot run; the message says why."""


def _path(module: Any, service: str, method: str) -> str:
    return f"/{module.DESCRIPTOR.services_by_name[service].full_name}/{method}"


VERIFY = _path(api_key_pb2, "ApiKeyService", "VerifyApiKey")
GET_ENVIRONMENT = _path(environment_pb2, "EnvironmentService", "GetEnvironment")
LIST_ENVIRONMENTS = _path(environment_pb2, "EnvironmentService", "ListEnvironments")
CREATE_ENVIRONMENT = _path(environment_pb2, "EnvironmentService", "CreateEnvironment")
GET_RESOURCE = _path(resource_pb2, "ResourceService", "GetResource")
REGISTER_RESOURCE = _path(resource_pb2, "ResourceService", "RegisterResource")


def failure(error: grpc.aio.AioRpcError) -> str:
    """A failed call in a few words, for "skipped: ..." lines."""
    return f"{error.code().name} ({error.details()})"


# -- setup over gRPC ---------------------------------------------------------------------------


@dataclass
class Setup:
    """What the scenarios act on, and why a part of it could not be made."""

    owner_secret: str
    staging: environment_pb2.Environment
    scoped_secret: str | None = None
    scoped_key_problem: str | None = None
    resource_problem: str | None = None


async def set_up(service: ServerProcess, operator_token: str) -> Setup:
    """An organization, a "staging" environment, a key scoped to it and an inbox registered in it."""
    async with grpc.aio.insecure_channel(service.address) as channel:
        created = await organization_pb2_grpc.OrganizationServiceStub(channel).CreateOrganization(
            organization_pb2.CreateOrganizationRequest(
                name="Bench", owner_email="owner@bench.example", owner_display_name="Owner"
            ),
            metadata=(("authorization", f"Bearer {operator_token}"),),
        )
        owner = created.owner_api_key_secret
        staging = await environment_pb2_grpc.EnvironmentServiceStub(channel).CreateEnvironment(
            environment_pb2.CreateEnvironmentRequest(name="Staging", slug="staging"), metadata=auth(owner)
        )
        setup = Setup(owner_secret=owner, staging=staging)
        try:
            key = await api_key_pb2_grpc.ApiKeyServiceStub(channel).CreateApiKey(
                api_key_pb2.CreateApiKeyRequest(
                    name="bench scoped", scopes=SCOPED_KEY_SCOPES, environment_ids=[staging.id]
                ),
                metadata=auth(owner),
            )
            setup.scoped_secret = key.secret
        except grpc.aio.AioRpcError as error:
            setup.scoped_key_problem = f"CreateApiKey failed: {failure(error)}"
        try:
            await resource_pb2_grpc.ResourceServiceStub(channel).RegisterResource(
                resource_pb2.RegisterResourceRequest(
                    kind=resource_pb2.ScopedResource.Kind.INBOX, resource_id="inbox-1", display_name="Inbox 1"
                ),
                metadata=auth(owner, "staging"),
            )
        except grpc.aio.AioRpcError as error:
            setup.resource_problem = f"RegisterResource failed: {failure(error)}"
    return setup


# -- scenarios ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """A scenario to probe, with the check its probe answer must pass."""

    name: str
    method: str
    request: Callable[[], bytes]
    metadata: Metadata = ()
    response_type: Any = None
    check: Callable[[Any], str | None] = lambda _response: None
    fixed_answer: bool = True  # False for writes: each answer differs, only success is checked
    problem: str | None = None


def _constant(message: Any) -> Callable[[], bytes]:
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    return lambda: payload


def _verify_request(setup: Setup) -> api_key_pb2.VerifyApiKeyRequest:
    return api_key_pb2.VerifyApiKeyRequest(
        secret=setup.scoped_secret or setup.owner_secret,
        environment="staging",
        required_scopes=["inboxes:read"],
    )


def service_plans(setup: Setup) -> list[Plan]:
    """The read hot paths, in the order they run."""
    denial = api_key_pb2.VerifyApiKeyResponse.DenialReason
    verify_key = "scoped key" if setup.scoped_secret else "owner key"
    plans = [
        Plan(
            f"VerifyApiKey valid ({verify_key})",
            VERIFY,
            _constant(_verify_request(setup)),
            response_type=api_key_pb2.VerifyApiKeyResponse,
            check=lambda r: None if r.valid else f"valid=false ({denial.Name(r.denial_reason)})",
        ),
        Plan(
            "VerifyApiKey malformed secret",
            VERIFY,
            _constant(
                api_key_pb2.VerifyApiKeyRequest(
                    secret=corrupt(setup.owner_secret, -1),
                    environment="staging",
                    required_scopes=["inboxes:read"],
                )
            ),
            response_type=api_key_pb2.VerifyApiKeyResponse,
            check=lambda r: (
                None
                if not r.valid and r.denial_reason == denial.MALFORMED
                else f"expected MALFORMED, got valid={r.valid} {denial.Name(r.denial_reason)}"
            ),
        ),
        Plan(
            "GetEnvironment by slug (owner)",
            GET_ENVIRONMENT,
            _constant(environment_pb2.GetEnvironmentRequest(slug="staging")),
            auth(setup.owner_secret),
            environment_pb2.Environment,
            check=lambda r: None if r.id == setup.staging.id else f"got environment {r.id!r}",
        ),
        Plan(
            "ListEnvironments (owner)",
            LIST_ENVIRONMENTS,
            _constant(environment_pb2.ListEnvironmentsRequest()),
            auth(setup.owner_secret),
            environment_pb2.ListEnvironmentsResponse,
            check=lambda r: (
                None if len(r.environments) == 2 else f"{len(r.environments)} environments, not 2"
            ),
        ),
    ]
    resource = Plan(
        "GetResource in staging (scoped key)",
        GET_RESOURCE,
        _constant(
            resource_pb2.GetResourceRequest(
                kind=resource_pb2.ScopedResource.Kind.INBOX, resource_id="inbox-1"
            )
        ),
        auth(setup.scoped_secret or "", "staging"),
        resource_pb2.ScopedResource,
        check=lambda r: (
            None if r.environment_id == setup.staging.id else f"in environment {r.environment_id!r}"
        ),
        problem=setup.scoped_key_problem or setup.resource_problem,
    )
    return [*plans, resource]


def write_plan(setup: Setup) -> Plan:
    """CreateEnvironment with a fresh name per call: the write path, reported apart."""
    run = uuid.uuid4().hex[:6]
    counter = itertools.count()

    def request() -> bytes:
        message = environment_pb2.CreateEnvironmentRequest(name=f"bench {run} {next(counter)}")
        return message.SerializeToString()

    return Plan(
        "CreateEnvironment (write path)",
        CREATE_ENVIRONMENT,
        request,
        auth(setup.owner_secret),
        environment_pb2.Environment,
        check=lambda r: None if r.state == environment_pb2.Environment.State.ACTIVE else "not ACTIVE",
        fixed_answer=False,
    )


def register_plan(setup: Setup) -> Plan:
    """RegisterResource of a fresh inbox per call in staging: the write other backends make most."""
    run = uuid.uuid4().hex[:6]
    counter = itertools.count()

    def request() -> bytes:
        message = resource_pb2.RegisterResourceRequest(
            kind=resource_pb2.ScopedResource.Kind.INBOX, resource_id=f"bench-{run}-{next(counter)}"
        )
        return message.SerializeToString()

    return Plan(
        "RegisterResource (write path)",
        REGISTER_RESOURCE,
        request,
        auth(setup.owner_secret, "staging"),
        resource_pb2.ScopedResource,
        check=lambda r: None if r.environment_id == setup.staging.id else "registered elsewhere",
        fixed_answer=False,
        problem=setup.resource_problem,
    )


async def measure_under_writes(
    read: Plan, write: Plan, server: ServerProcess, load: Load, writers: int
) -> UnderWrites:
    """The read plan alone, then again while `writers` callers run the write plan in the same
    window: back to back on one server, so that the ratio compares like with like."""
    label = f"{read.name}, {writers} x {write.name.split(' ')[0]}"
    try:
        alone_scenario = await prepare(read, server)
        read_scenario = await prepare(read, server)
        write_scenario = await prepare(write, server)
    except Skip as skip:
        skipped = [Result(name, skipped=str(skip)) for name in (f"{read.name}, alone", label, write.name)]
        return UnderWrites(*skipped)
    alone_scenario.name = f"{read.name}, alone"
    read_scenario.name = label
    write_scenario.name = f"{write.name.split(' ')[0]}, {writers} callers beside it"
    print(f"  running {label} ...", file=sys.stderr, flush=True)
    alone = await run_load(alone_scenario, load)
    write_load = Load(writers, 1, load.warmup, load.duration)
    under, writes = await asyncio.gather(run_load(read_scenario, load), run_load(write_scenario, write_load))
    return UnderWrites(alone, under, writes)


async def prepare(plan: Plan, server: ServerProcess) -> Scenario:
    """Probes the call once; its answer must pass the plan's check. Raises Skip otherwise."""
    if plan.problem:
        raise Skip(plan.problem)
    async with server.channel() as channel:
        try:
            answer = await channel.unary_unary(plan.method)(
                plan.request(), metadata=plan.metadata or None, timeout=10.0
            )
        except grpc.aio.AioRpcError as error:
            raise Skip(f"{plan.method.rsplit('/', 1)[1]} failed: {failure(error)}") from error
    problem = plan.check(plan.response_type.FromString(answer))
    if problem:
        raise Skip(problem)
    return Scenario(
        plan.name, server, plan.method, plan.request, plan.metadata, answer if plan.fixed_answer else None
    )


def echo_scenario(echo: ServerProcess, size: int, name: str) -> Scenario:
    """Random bytes of `size`, echoed back unchanged."""
    payload = os.urandom(size)
    return Scenario(name, echo, ECHO_METHOD, lambda: payload, expected=payload)


async def measure(plan: Plan, server: ServerProcess, load: Load) -> Result:
    """Probes and runs one plan, or returns it as skipped."""
    try:
        scenario = await prepare(plan, server)
    except Skip as skip:
        return Result(plan.name, skipped=str(skip), channels=load.channels)
    print(f"  running {plan.name} ...", file=sys.stderr, flush=True)
    return await run_load(scenario, load)


async def measure_metrics_cost(
    plan: Plan, off: ServerProcess, on: ServerProcess, load: Load, rounds: int
) -> tuple[Result, Result]:
    """The plan with metrics off and on, `rounds` times in the order off, on, on, off, each run
    measured for `load.duration / (2 * rounds)`, so that a change in what else runs on the cores
    weighs on both alike. Each side is measured for `load.duration` in all."""
    part = Load(load.concurrency, load.channels, load.warmup, load.duration / (2 * rounds))
    runs: dict[str, list[Result]] = {"off": [], "on": []}
    for which in ("off", "on", "on", "off") * rounds:
        runs[which].append(await measure(plan, off if which == "off" else on, part))
    return Result.combined(runs["off"]), Result.combined(runs["on"])


async def measure_echo(echo: ServerProcess, size: int, name: str, load: Load) -> Result:
    """Runs the bare echo."""
    print(f"  running {name} ...", file=sys.stderr, flush=True)
    return await run_load(echo_scenario(echo, size, name), load)


# -- revocation across replicas ----------------------------------------------------------------


async def _verify(stub: Any, secret: str) -> Any:
    return await stub.VerifyApiKey(
        api_key_pb2.VerifyApiKeyRequest(secret=secret, environment="staging"), timeout=5.0
    )


async def measure_revocation(
    replica_a: ServerProcess, replica_b: ServerProcess, setup: Setup, rounds: int
) -> Revocation:
    """Warms a fresh key on both replicas, revokes it through A and polls B until it says no."""
    outcome = Revocation()
    async with (
        grpc.aio.insecure_channel(replica_a.address) as channel_a,
        grpc.aio.insecure_channel(replica_b.address) as channel_b,
    ):
        keys_a = api_key_pb2_grpc.ApiKeyServiceStub(channel_a)
        keys_b = api_key_pb2_grpc.ApiKeyServiceStub(channel_b)
        for round_number in range(rounds):
            created = await keys_a.CreateApiKey(
                api_key_pb2.CreateApiKeyRequest(
                    name=f"revocation {round_number}",
                    scopes=["environments:read"],
                    environment_ids=[setup.staging.id],
                ),
                metadata=auth(setup.owner_secret),
            )
            # A random phase against B's refresh timer, so the rounds sample the whole interval.
            await asyncio.sleep(random.uniform(0.0, SQLITE_POLL_SECONDS))
            for stub in (keys_a, keys_b):
                if not (await _verify(stub, created.secret)).valid:
                    outcome.problems.append(f"round {round_number}: a fresh key was not valid")
            await keys_a.RevokeApiKey(
                api_key_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=auth(setup.owner_secret)
            )
            revoked_at = time.perf_counter()
            while True:
                answer = await _verify(keys_b, created.secret)
                elapsed = time.perf_counter() - revoked_at
                if not answer.valid:
                    denial = api_key_pb2.VerifyApiKeyResponse.DenialReason.Name(answer.denial_reason)
                    if denial != "REVOKED":
                        outcome.problems.append(f"round {round_number}: refused as {denial}, not REVOKED")
                    outcome.delays_ms.append(elapsed * 1000.0)
                    break
                if elapsed > REVOCATION_TIMEOUT_SECONDS:
                    outcome.problems.append(f"round {round_number}: still valid after {elapsed:.1f} s")
                    break
                await asyncio.sleep(REVOCATION_POLL_SECONDS)
    return outcome


# -- processes and the run ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bench_schema(url: str | None) -> AsyncIterator[str | None]:
    """A PostgreSQL schema of its own for this run, dropped at the end; None on SQLite."""
    if url is None:
        yield None
        return
    async with scratch_schema(url, "agentpost_bench") as schema:
        yield schema


def service_arguments(
    database_url: str,
    schema: str | None,
    operator_token: str,
    migrate: bool,
    metrics: bool = False,
    workers: int = 1,
) -> Callable[[int], list[str]]:
    """The command line of one replica of this service, given its port."""

    def arguments(port: int) -> list[str]:
        command = ["-m", "service", "serve", "--database-url", database_url]
        # One argument with `=`: a token may start with "-", which argparse would take for a flag.
        command += ["--listen-address", f"127.0.0.1:{port}", f"--operator-token={operator_token}"]
        command += ["--log-level", "WARNING"]
        if migrate:
            command.append("--migrate")
        if metrics:
            command += ["--metrics-address", f"127.0.0.1:{free_port()}"]
        if schema is not None:
            command += ["--database-schema", schema]
        if workers > 1:
            command += ["--workers", str(workers)]
        return command

    return arguments


async def run(arguments: argparse.Namespace) -> Report:
    """Starts the servers, sets up, measures everything, and stops the servers."""
    load = Load(arguments.concurrency, arguments.channels, arguments.warmup, arguments.duration)
    write_load = Load(
        arguments.concurrency,
        arguments.channels,
        arguments.warmup,
        min(WRITE_PATH_SECONDS, arguments.duration),
    )
    operator_token = secrets.token_urlsafe(24)
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="agentpost-bench-") as scratch:
        directory = Path(scratch)
        database_url = arguments.postgres or f"sqlite+aiosqlite:///{directory / 'bench.db'}"
        async with bench_schema(arguments.postgres) as schema:
            try:
                echo = await start_server(
                    "echo", lambda port: ["-m", "tests.bench.echo", str(port)], echo_answers, directory
                )
                servers.append(echo)
                replica_a = await start_server(
                    "service A",
                    service_arguments(database_url, schema, operator_token, True),
                    health_serving,
                    directory,
                )
                servers.append(replica_a)
                setup = await set_up(replica_a, operator_token)
                echo_size = len(_verify_request(setup).SerializeToString())
                security = await start_security_servers(
                    service_arguments(database_url, schema, operator_token, False), directory
                )
                servers += [security.tls, security.verifier]
                plans = service_plans(setup)
                verify = plans[0]
                # What TLS and a verifier token cost, next to the plaintext row they compare with.
                measured = [
                    (verify, replica_a),
                    (replace(verify, name="VerifyApiKey valid, TLS"), security.tls),
                    (
                        replace(
                            verify,
                            name="VerifyApiKey valid, verifier token",
                            metadata=(("authorization", f"Bearer {VERIFIER_TOKEN}"),),
                        ),
                        security.verifier,
                    ),
                    *((plan, replica_a) for plan in plans[1:]),
                ]

                metered: ServerProcess | None = None
                if arguments.metrics:
                    metered = await start_server(
                        "service A with metrics",
                        service_arguments(database_url, schema, operator_token, False, metrics=True),
                        health_serving,
                        directory,
                    )
                    servers.append(metered)

                echo_first = await measure_echo(echo, echo_size, "echo (first)", load)
                reads = [await measure(plan, server, load) for plan, server in measured]
                metrics_pairs: list[tuple[Result, Result]] = []
                if metered is not None:
                    for plan in plans:
                        metrics_pairs.append(
                            await measure_metrics_cost(
                                plan, replica_a, metered, load, arguments.metrics_rounds
                            )
                        )
                echo_last = await measure_echo(echo, echo_size, "echo (last)", load)
                # Writes last: they add environments, which the list scenario must not see. One
                # process on the cores: the other replicas, which would follow every write from
                # the log on the same two cores (in production they have machines of their own),
                # are stopped first; the flood below starts its own.
                for follower in (security.tls, security.verifier, *([metered] if metered else [])):
                    follower.stop()
                writes = [
                    await measure(write_plan(setup), replica_a, write_load),
                    await measure(register_plan(setup), replica_a, write_load),
                ]
                under_writes = await measure_under_writes(
                    service_plans(setup)[0], register_plan(setup), replica_a, load, writers=4
                )

                channel_results: list[Result] = []
                if arguments.multi_channels > 1 and arguments.multi_channels != arguments.channels:
                    multi = Load(
                        arguments.concurrency, arguments.multi_channels, arguments.warmup, arguments.duration
                    )
                    channel_results.append(await measure_echo(echo, echo_size, "echo", multi))
                    channel_results.append(await measure(service_plans(setup)[0], replica_a, multi))
                    # The same on `serve --workers 2`: the kernel spreads the channels' connections.
                    two_workers = await start_server(
                        "service, 2 workers",
                        service_arguments(database_url, schema, operator_token, False, workers=2),
                        health_serving,
                        directory,
                    )
                    servers.append(two_workers)
                    verify_two = service_plans(setup)[0]
                    verify_two.name = f"{verify_two.name}, serve --workers 2"
                    channel_results.append(await measure(verify_two, two_workers, multi))

                revocation = Revocation()
                delivery = Delivery()
                if setup.scoped_key_problem:
                    revocation.skipped = delivery.skipped = setup.scoped_key_problem
                elif reads[0].skipped:
                    revocation.skipped = delivery.skipped = reads[0].skipped
                else:
                    print("  measuring revocation across replicas ...", file=sys.stderr, flush=True)
                    replica_b = await start_server(
                        "service B",
                        service_arguments(database_url, schema, operator_token, False),
                        health_serving,
                        directory,
                    )
                    servers.append(replica_b)
                    try:
                        revocation = await measure_revocation(
                            replica_a, replica_b, setup, arguments.revocation_rounds
                        )
                    except grpc.aio.AioRpcError as error:
                        revocation.skipped = f"failed: {failure(error)}"
                    print("  measuring event delivery ...", file=sys.stderr, flush=True)
                    try:
                        delivery = await measure_delivery(
                            replica_a, replica_b, setup.owner_secret, "staging", arguments.delivery_rounds
                        )
                    except (grpc.aio.AioRpcError, TimeoutError) as error:
                        delivery.skipped = f"failed: {error}"

                # Last: the flood leaves replica A throttling this client for a minute.
                security = await start_security_servers(
                    service_arguments(database_url, schema, operator_token, False), directory
                )
                servers += [security.tls, security.verifier]
                floods: list[Flood] = []
                legitimate = plans[2]
                for target, server in (
                    ("replica A, throttle on (120 a minute)", replica_a),
                    ("throttle off", security.verifier),
                ):
                    try:
                        scenario = await prepare(legitimate, server)
                    except Skip as skip:
                        print(f"  flood on {target} skipped: {skip}", file=sys.stderr)
                        continue
                    print(f"  flooding {target} ...", file=sys.stderr, flush=True)
                    floods.append(await measure_flood(target, scenario, load))
            finally:
                for server in reversed(servers):
                    server.stop()
    backend = "postgresql" if arguments.postgres else "sqlite"
    return Report(
        backend,
        load,
        echo_first,
        echo_last,
        reads,
        writes,
        under_writes,
        channel_results,
        revocation,
        floods,
        metrics_pairs,
        delivery,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, default=5.0, help="measured seconds per scenario (default 5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each (default 1)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent workers (default 32)")
    parser.add_argument("--channels", type=int, default=1, help="channels the workers share (default 1)")
    parser.add_argument(
        "--multi-channels",
        type=int,
        default=2,
        help="also run echo and VerifyApiKey on this many channels (default 2; 0: no)",
    )
    parser.add_argument(
        "--revocation-rounds", type=int, default=100, help="revocations to time (default 100)"
    )
    parser.add_argument(
        "--metrics-rounds",
        type=int,
        default=1,
        help="off-on-on-off rounds per read scenario for the metrics cost (default 1)",
    )
    parser.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="skip the read scenarios on a replica with Prometheus metrics on",
    )
    parser.add_argument(
        "--delivery-rounds", type=int, default=300, help="events whose delivery delay is timed (default 300)"
    )
    parser.add_argument(
        "--postgres", metavar="URL", help="run the service on PostgreSQL (postgresql+asyncpg://...)"
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON here")
    return parser


def main() -> int:
    """Runs the benchmark and prints (and optionally writes) the report."""
    arguments = _parser().parse_args()
    if (
        arguments.duration <= 0
        or arguments.concurrency < 1
        or arguments.channels < 1
        or arguments.warmup < 0
        or arguments.metrics_rounds < 1
    ):
        raise SystemExit(
            "--duration must be > 0, --warmup >= 0, --concurrency, --channels and --metrics-rounds >= 1"
        )
    report = asyncio.run(run(arguments))
    print(render(report))
    if arguments.json:
        arguments.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
        print(f"\nresults written to {arguments.json}")
    under = report.under_writes.results if report.under_writes is not None else []
    metered = [on for _, on in report.metrics_pairs]
    checked = (report.echo_first, *report.reads, report.echo_last, *report.writes, *under, *metered)
    flagged = [r for r in (*checked, *(f.flooded for f in report.floods)) if r.error_count]
    return 1 if flagged or report.revocation.problems or report.delivery.problems else 0


if __name__ == "__main__":
    sys.exit(main())
