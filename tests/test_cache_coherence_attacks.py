"""Differential tests of the access cache: replicas that follow the event log incrementally must
answer exactly what a freshly started replica answers.

Each server process keeps an organization's keys, environments, member roles and environment
memberships in memory and patches them event by event (its own commits as they happen, other
replicas' from the log). A fresh replica loads everything from the database instead. Any
difference between the two is a bug in applying events. These tests start two replicas A and B
on one database, run seeded random sequences (and fixed scenarios) of mutating RPCs spread over
both, and then ask A and B (demanding the last revision written) and a replica C started after
the writes the same questions:

- VerifyApiKey for every key, every environment of the organization by id and by slug (another
  organization's and an unknown one too) and a few scope sets: `valid`, `denial_reason` and the
  whole principal;
- as each key: ListEnvironments (with and without deleted ones), GetEnvironment by id and by slug,
  GetMember and ListMemberEnvironments for every member, ListApiKeys, and GetResource of every
  registered resource in its environment's context and in the key's default context;
- how far each key gets with two writes that are refused whatever it is (and rolled back, raising
  no revision): RemoveEnvironmentMember of no member in each environment (environment ADMIN or
  not) and UpdateMember of the first OWNER with a stale etag (acts as OWNER or not), since
  environment roles and the OWNER rank show in nothing a key reads.

After each step of a random run, A and B must also agree on VerifyApiKey, and the replica that
made the step's write must answer for that organization without any freshness demand as it does
with one: a replica honours its own change on the very next call (README "Revocation and
expiry").

Every answer (response or code, reason, message and metadata) must be identical; `last_used_time`
alone is left out, since each replica keeps its own to within a minute (README "Revocation and
expiry"). A failure prints the backend, the seed and every step taken (ids replaced by short
labels such as `o0.e2` or `o1.k3`), so the sequence can be replayed.

AGENTPOST_COHERENCE_SEEDS (comma-separated), AGENTPOST_COHERENCE_STEPS and
AGENTPOST_COHERENCE_CHECK_EVERY size the random runs; the defaults keep both databases together
within about two minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2, environment_pb2, member_pb2, resource_pb2
from google.protobuf import duration_pb2, text_format
from google.protobuf.message import Message

from service.domain import scopes
from tests.harness import Harness, Org, auth, failure_of, mask, stamp
from tests.servers import Backend, serving
from tests.writes import revision_of

MIN_REVISION = "x-agentpost-min-revision"
# Only ends a wait that would never end; nothing here is timed.
HANG = 20.0
SEEDS = tuple(
    int(seed) for seed in os.environ.get("AGENTPOST_COHERENCE_SEEDS", "7,1013,4099,65537").split(",") if seed
)
STEPS = int(os.environ.get("AGENTPOST_COHERENCE_STEPS", "48"))
CHECK_EVERY = int(os.environ.get("AGENTPOST_COHERENCE_CHECK_EVERY", "6"))
# Calls in flight at once while probing one replica.
PROBE_CONCURRENCY = 24

Kind = resource_pb2.ScopedResource.Kind
INBOX, MESSAGE = resource_pb2.ScopedResource.INBOX, resource_pb2.ScopedResource.MESSAGE
KIND_NAMES = {INBOX: "INBOX", MESSAGE: "MESSAGE"}
SCOPE_POOL = (
    "environments:read",
    "environments:write",
    "members:read",
    "members:write",
    "api_keys:read",
    "api_keys:write",
    "inboxes:read",
    "inboxes:write",
    "messages:read",
    "events:read",
)
# Required scopes VerifyApiKey is asked for, beyond none at all.
SCOPE_SETS: tuple[tuple[str, ...], ...] = (
    ("inboxes:read",),
    ("environments:read", "api_keys:write"),
    ("messages:read", "events:read"),
)
RESOURCE_IDS = ("r1", "r2", "r3", "r4")
# VerifyApiKey denials that concern the key itself, whatever the environment.
KEY_DENIALS = frozenset({"REVOKED", "EXPIRED", "OWNER_REMOVED", "NOT_FOUND"})
ENV_ROLES = ("ADMIN", "MEMBER")
NO_SUCH_MEMBER = "mem_01J0000000000000000000000A"
STALE_ETAG = "0000000000000000"
ORG_ROLES = ("OWNER", "ADMIN", "MEMBER")


# -- what the tests know of each organization ------------------------------------------------


@dataclass
class EnvRef:
    id: str
    slug: str
    label: str
    default: bool = False
    deleted: bool = False


@dataclass
class MemberRef:
    id: str
    label: str
    role: str
    original: bool = False  # the organization's first OWNER, whose key drives most writes
    deleted: bool = False


@dataclass
class KeyRef:
    id: str
    secret: str
    label: str
    owner: str  # member id, "" when no member owns it
    original: bool = False
    revoked: bool = False


@dataclass
class World:
    """One organization as the test has seen it: the objects it made, in the order it made them,
    and the highest revision any write answered."""

    label: str
    org: Org
    envs: list[EnvRef]
    members: list[MemberRef]
    keys: list[KeyRef]
    memberships: dict[tuple[str, str], str] = field(default_factory=dict)  # (member, env) -> role
    resources: dict[tuple[Kind, str], str] = field(default_factory=dict)  # (kind, id) -> env id
    revision: int = 0
    counter: int = 0

    @property
    def owner(self) -> KeyRef:
        return self.keys[0]

    def next_number(self) -> int:
        self.counter += 1
        return self.counter


class Run:
    """Two replicas, the organizations written through them, and the steps taken so far."""

    def __init__(self, backend: Backend, name: str, servers: dict[str, Harness]) -> None:
        self.backend = backend
        self.name = name
        self.servers = servers
        self.worlds: list[World] = []
        self.trace: list[str] = []
        self.labels: dict[str, str] = {}

    # -- naming ---------------------------------------------------------------------------------

    def name_of(self, object_id: str, label: str) -> None:
        self.labels[object_id] = label

    def readable(self, text: str) -> str:
        """`text` with every id the test made replaced by its label."""
        if not self.labels:
            return text
        pattern = re.compile(
            "|".join(re.escape(object_id) for object_id in sorted(self.labels, key=len)[::-1])
        )
        return pattern.sub(lambda match: self.labels[match.group(0)], text)

    def note(self, line: str) -> None:
        self.trace.append(self.readable(line))

    def story(self) -> str:
        steps = "\n".join(f"  {line}" for line in self.trace)
        return f"[{self.backend.name}] {self.name}\nsteps:\n{steps}"

    # -- organizations --------------------------------------------------------------------------

    async def new_world(self, server: str = "A") -> World:
        index = len(self.worlds)
        label = f"o{index}"
        org = await self.servers[server].new_org(f"Coherence {label}")
        default = EnvRef(
            org.default_environment.id, org.default_environment.slug, f"{label}.e0", default=True
        )
        owner = MemberRef(org.owner_member_id, f"{label}.m0", "OWNER", original=True)
        key = KeyRef(org.owner_key_id, org.owner_secret, f"{label}.k0", org.owner_member_id, original=True)
        world = World(label, org, [default], [owner], [key])
        self.name_of(org.id, label)
        for ref in (default, owner, key):
            self.name_of(ref.id, ref.label)
        self.worlds.append(world)
        self.note(f"{server}: CreateOrganization -> {label}")
        return world

    # -- writes ---------------------------------------------------------------------------------

    async def write(
        self,
        world: World,
        server: str,
        method: Callable[..., Any],
        request: Message,
        caller: KeyRef,
        *,
        environment: str | None = None,
        demand: bool = True,
    ) -> Any | None:
        """One write as `caller` on `server`, demanding the organization's last revision (unless
        `demand` is off, as in concurrent bursts); the response, or None when it was refused."""
        metadata = auth(caller.secret, environment)
        if demand:
            metadata = (*metadata, (MIN_REVISION, str(world.revision)))
        described = (
            f"{server}: {type(request).__name__.removesuffix('Request')} "
            + text_format.MessageToString(request, as_one_line=True)
        )
        if environment is not None:
            described += f" in {environment}"
        call = method(request, metadata=metadata, timeout=HANG)
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            self.note(f"{described} as {caller.label} -> {failure.code.name} {failure.reason}")
            return None
        revision = await revision_of(call)
        world.revision = max(world.revision, revision)
        self.note(f"{described} as {caller.label} -> OK r{revision}")
        return response


# -- answers ---------------------------------------------------------------------------------


def _scrubbed(response: Message) -> Message:
    """The response without what each replica keeps on its own (a key's last use)."""
    if isinstance(response, api_key_pb2.ListApiKeysResponse):
        copy = api_key_pb2.ListApiKeysResponse()
        copy.CopyFrom(response)
        for key in copy.api_keys:
            key.ClearField("last_used_time")
        return copy
    return response


async def answer_of(call: Awaitable[Any]) -> str:
    """A call's whole answer as text: the response, or code, reason, message and metadata."""
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        return f"{failure.code.name} {failure.reason} {failure.message!r} {sorted(failure.metadata.items())}"
    return text_format.MessageToString(_scrubbed(response), as_one_line=True)


Probe = tuple[str, Callable[[Harness], Awaitable[str]]]


def verify_probe(label: str, secret: str, environment: str, required: Sequence[str], revision: int) -> Probe:
    def ask(server: Harness) -> Awaitable[str]:
        return answer_of(
            server.api_keys.VerifyApiKey(
                api_key_pb2.VerifyApiKeyRequest(
                    secret=secret,
                    environment=environment,
                    required_scopes=list(required),
                    min_revision=revision,
                ),
                timeout=HANG,
            )
        )

    return label, ask


def call_probe(
    label: str,
    pick: Callable[[Harness], Callable[..., Any]],
    request: Message,
    metadata: tuple[tuple[str, str], ...],
) -> Probe:
    def ask(server: Harness) -> Awaitable[str]:
        return answer_of(pick(server)(request, metadata=metadata, timeout=HANG))

    return label, ask


def demanding(world: World, demand: bool) -> int:
    """The revision a probe demands: the organization's last one written, or none."""
    return world.revision if demand else 0


def with_demand(metadata: tuple[tuple[str, str], ...], revision: int) -> tuple[tuple[str, str], ...]:
    return (*metadata, (MIN_REVISION, str(revision))) if revision else metadata


def verify_probes(world: World, foreign: Sequence[World], demand: bool = True) -> list[Probe]:
    """VerifyApiKey of every key of `world` in every environment reference (by id and by slug,
    another organization's and an unknown one included) and a few scope sets."""
    revision = demanding(world, demand)
    references = [("", "none"), ("no-such-env", "unknown")]
    for env in world.envs:
        references += [(env.id, env.label), (env.slug, f"{env.label}/slug")]
    for other in foreign:
        other_env = other.envs[-1]
        references += [(other_env.id, other_env.label), (other_env.slug, f"{other_env.label}/slug")]
    with_scopes = ["", *(env.id for env in world.envs[:2])]
    probes = []
    for key in world.keys:
        for reference, label in references:
            probes.append(verify_probe(f"Verify {key.label} in {label}", key.secret, reference, (), revision))
        for reference in with_scopes:
            for required in SCOPE_SETS:
                probes.append(
                    verify_probe(
                        f"Verify {key.label} in {reference or 'none'} needing {','.join(required)}",
                        key.secret,
                        reference,
                        required,
                        revision,
                    )
                )
    return probes


def caller_probes(
    world: World, key: KeyRef, foreign: Sequence[World], *, full: bool, demand: bool = True
) -> list[Probe]:
    """What `key` sees as a caller; only ListEnvironments when `full` is off (a key the fresh
    replica refuses: every call of it is the same refusal)."""
    revision = demanding(world, demand)
    metadata = with_demand(auth(key.secret), revision)
    probes = [
        call_probe(
            f"{key.label} ListEnvironments show_deleted={show_deleted}",
            lambda server: server.environments.ListEnvironments,
            environment_pb2.ListEnvironmentsRequest(page_size=500, show_deleted=show_deleted),
            metadata,
        )
        for show_deleted in (False, True)
    ]
    if not full:
        return probes
    envs = [*world.envs, *(other.envs[-1] for other in foreign)]
    for env in envs:
        probes.append(
            call_probe(
                f"{key.label} GetEnvironment {env.label}",
                lambda server: server.environments.GetEnvironment,
                environment_pb2.GetEnvironmentRequest(id=env.id),
                metadata,
            )
        )
        probes.append(
            call_probe(
                f"{key.label} GetEnvironment {env.label}/slug",
                lambda server: server.environments.GetEnvironment,
                environment_pb2.GetEnvironmentRequest(slug=env.slug),
                metadata,
            )
        )
    for member in world.members:
        probes.append(
            call_probe(
                f"{key.label} GetMember {member.label}",
                lambda server: server.members.GetMember,
                member_pb2.GetMemberRequest(id=member.id),
                metadata,
            )
        )
        probes.append(
            call_probe(
                f"{key.label} ListMemberEnvironments {member.label}",
                lambda server: server.members.ListMemberEnvironments,
                member_pb2.ListMemberEnvironmentsRequest(member_id=member.id, page_size=500),
                metadata,
            )
        )
    # Environment roles and OWNER rank show only in what a key may change: two writes that are
    # refused whatever the key (and rolled back, raising no revision) say how far it got.
    for env in world.envs:
        probes.append(
            call_probe(
                f"{key.label} administers {env.label}? (RemoveEnvironmentMember of no member)",
                lambda server: server.members.RemoveEnvironmentMember,
                member_pb2.RemoveEnvironmentMemberRequest(environment_id=env.id, member_id=NO_SUCH_MEMBER),
                metadata,
            )
        )
    probes.append(
        call_probe(
            f"{key.label} acts as OWNER? (UpdateMember of the first OWNER with a stale etag)",
            lambda server: server.members.UpdateMember,
            member_pb2.UpdateMemberRequest(
                member=member_pb2.Member(id=world.members[0].id, display_name="Owner", etag=STALE_ETAG),
                update_mask=mask("display_name"),
            ),
            metadata,
        )
    )
    probes.append(
        call_probe(
            f"{key.label} ListApiKeys",
            lambda server: server.api_keys.ListApiKeys,
            api_key_pb2.ListApiKeysRequest(show_revoked=True, page_size=500),
            metadata,
        )
    )
    for (kind, resource_id), env_id in sorted(world.resources.items()):
        request = resource_pb2.GetResourceRequest(kind=kind, resource_id=resource_id)
        name = f"{KIND_NAMES[kind]}:{resource_id}"
        probes.append(
            call_probe(
                f"{key.label} GetResource {name} in {env_id}",
                lambda server: server.resources.GetResource,
                request,
                with_demand(auth(key.secret, env_id), revision),
            )
        )
        probes.append(
            call_probe(
                f"{key.label} GetResource {name} in its default context",
                lambda server: server.resources.GetResource,
                request,
                metadata,
            )
        )
    return probes


async def ask_all(server: Harness, probes: Sequence[Probe]) -> dict[str, str]:
    """Every probe's answer from `server`."""
    gate = asyncio.Semaphore(PROBE_CONCURRENCY)

    async def one(ask: Callable[[Harness], Awaitable[str]]) -> str:
        async with gate:
            return await ask(server)

    answers = await asyncio.gather(*(one(ask) for _, ask in probes))
    return {label: answer for (label, _), answer in zip(probes, answers, strict=True)}


async def collect(
    run: Run, servers: dict[str, Harness], truth: str, *, demand: bool = True
) -> dict[str, dict[str, str]]:
    """Every probe about every organization of the run, answered by each of `servers`. Keys that
    `truth` refuses outright are asked only ListEnvironments as callers."""
    verify = []
    for world in run.worlds:
        verify += verify_probes(world, [other for other in run.worlds if other is not world], demand)
    first = {name: await ask_all(server, verify) for name, server in servers.items()}
    callers = []
    for world in run.worlds:
        foreign = [other for other in run.worlds if other is not world]
        for key in world.keys:
            own = first[truth][f"Verify {key.label} in none"]
            dead = any(f"denial_reason: {reason}" in own for reason in KEY_DENIALS)
            callers += caller_probes(world, key, foreign, full=not dead, demand=demand)
    second = {name: await ask_all(server, callers) for name, server in servers.items()}
    return {name: {**first[name], **second[name]} for name in servers}


@contextlib.asynccontextmanager
async def fresh_replica(backend: Backend) -> AsyncIterator[Harness]:
    """A replica started now: it loads every organization from the database on first use."""
    async with serving(backend) as running:
        yield running


def differences(
    run: Run, answers: dict[str, dict[str, str]], compared: Sequence[str], truth: str, limit: int = 12
) -> list[str]:
    """Each probe on which a replica of `compared` answered other than `truth`, readable."""
    found = []
    for label, expected in answers[truth].items():
        if any(label not in answers[name] for name in compared):
            continue
        got = {name: answers[name][label] for name in compared}
        if any(value != expected for value in got.values()):
            lines = [f"- {run.readable(label)}", f"    {truth}: {run.readable(expected)[:700]}"]
            lines += [
                f"    {name}: {run.readable(value)[:700]}" for name, value in got.items() if value != expected
            ]
            found.append("\n".join(lines))
    return found[:limit]


async def compare_with_fresh(run: Run, note: str = "") -> None:
    """Asks A and B (demanding each organization's last revision) and a replica C started now
    the same questions about every organization of the run; every answer must be identical."""
    run.note(f"-- compare A and B with a fresh replica C {note}".rstrip())
    async with fresh_replica(run.backend) as fresh:
        answers = await collect(run, {**run.servers, "C": fresh}, "C")
    found = differences(run, answers, list(run.servers), "C")
    assert not found, f"{run.story()}\nanswers differ from the fresh replica C's:\n" + "\n".join(found)


async def compare_replicas_cheaply(run: Run, writer: tuple[str, World] | None) -> None:
    """After a step: VerifyApiKey of every key in its default context and in every environment,
    on A and on B demanding the last revision, and, for the organization the step wrote, on the
    replica that wrote it (current before the write) without any demand: a replica honours its
    own change on the very next call (README "Revocation and expiry"). All must agree; a fresh
    replica is asked at the checkpoints."""

    def probes(worlds: Sequence[World], demand: bool) -> list[Probe]:
        made = []
        for world in worlds:
            for key in world.keys:
                for reference in ["", *(env.id for env in world.envs)]:
                    made.append(
                        verify_probe(
                            f"Verify {key.label} in {reference or 'none'}",
                            key.secret,
                            reference,
                            (),
                            demanding(world, demand),
                        )
                    )
        return made

    demanded = probes(run.worlds, True)
    answers = {name: await ask_all(server, demanded) for name, server in run.servers.items()}
    names = list(answers)
    found = differences(run, answers, names[1:], names[0])
    assert not found, f"{run.story()}\nreplicas {names} disagree:\n" + "\n".join(found)
    if writer is None:
        return
    name, world = writer
    undemanded = await ask_all(run.servers[name], probes([world], False))
    own = f"{name} without a demand"
    found = differences(run, {name: answers[name], own: undemanded}, [own], name)
    assert not found, f"{run.story()}\n{name} does not honour its own write on the next call:\n" + "\n".join(
        found
    )


# -- the mutating steps ----------------------------------------------------------------------


def adopt_env(run: Run, world: World, env_id: str, slug: str) -> EnvRef:
    """A new environment of `world`, labelled in the order it was made."""
    env = EnvRef(env_id, slug, f"{world.label}.e{len(world.envs)}")
    world.envs.append(env)
    run.name_of(env.id, env.label)
    return env


def adopt_member(run: Run, world: World, member_id: str, role: str) -> MemberRef:
    """A new member of `world`, labelled in the order it was made."""
    member = MemberRef(member_id, f"{world.label}.m{len(world.members)}", role)
    world.members.append(member)
    run.name_of(member.id, member.label)
    return member


def new_member_request(world: World, role: str) -> member_pb2.CreateMemberRequest:
    """A CreateMember request for a new member of `world` (its email unique to the run)."""
    number = world.next_number()
    return member_pb2.CreateMemberRequest(
        email=f"{world.label}-m{number}-{uuid.uuid4().hex[:6]}@example.com",
        display_name=f"M {number}",
        role=role,
    )


def adopt_key(run: Run, world: World, key_id: str, secret: str, owner: str) -> KeyRef:
    """A new key of `world`, labelled in the order it was made."""
    key = KeyRef(key_id, secret, f"{world.label}.k{len(world.keys)}", owner)
    world.keys.append(key)
    run.name_of(key.id, key.label)
    return key


def far_future(rng: random.Random) -> datetime:
    """An expiry days ahead: nothing expires while a test runs."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(
        days=rng.randint(2, 60), seconds=rng.randint(0, 999)
    )


def pick_caller(rng: random.Random, world: World) -> KeyRef:
    """Mostly the owner's key; now and then another key of the organization (which may be refused)."""
    if rng.random() < 0.8 or len(world.keys) == 1:
        return world.owner
    return rng.choice(world.keys[1:])


def active_envs(world: World) -> list[EnvRef]:
    return [env for env in world.envs if not env.deleted]


def live_members(world: World) -> list[MemberRef]:
    return [member for member in world.members if not member.deleted]


def changeable_keys(world: World) -> list[KeyRef]:
    return [key for key in world.keys if not key.original]


async def create_environment(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    number = world.next_number()
    slug = f"{world.label}-e{number}"
    response = await run.write(
        world,
        server,
        run.servers[server].environments.CreateEnvironment,
        environment_pb2.CreateEnvironmentRequest(
            name=f"Env {number}", slug=slug, description=rng.choice(["", "staging", "per customer"])
        ),
        world.owner,
        demand=demand,
    )
    if response is not None:
        adopt_env(run, world, response.id, response.slug)


async def update_environment(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    env = rng.choice(world.envs)
    paths = rng.choice([("name",), ("description",), ("name", "description")])
    await run.write(
        world,
        server,
        run.servers[server].environments.UpdateEnvironment,
        environment_pb2.UpdateEnvironmentRequest(
            environment=environment_pb2.Environment(
                id=env.id,
                name=f"Renamed {world.next_number()}",
                description=rng.choice(["", "changed", "again"]),
            ),
            update_mask=mask(*paths),
        ),
        pick_caller(rng, world),
        demand=demand,
    )


async def delete_environment(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    candidates = [env for env in world.envs if not env.default]
    if not candidates:
        await create_environment(run, rng, world, server, demand)
        return
    active = [env for env in candidates if not env.deleted]
    env = rng.choice(active if active and rng.random() < 0.85 else candidates)
    response = await run.write(
        world,
        server,
        run.servers[server].environments.DeleteEnvironment,
        environment_pb2.DeleteEnvironmentRequest(id=env.id),
        pick_caller(rng, world),
        demand=demand,
    )
    if response is not None:
        env.deleted = True


async def undelete_environment(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    deleted = [env for env in world.envs if env.deleted]
    env = rng.choice(deleted) if deleted else rng.choice(world.envs)
    response = await run.write(
        world,
        server,
        run.servers[server].environments.UndeleteEnvironment,
        environment_pb2.UndeleteEnvironmentRequest(id=env.id),
        pick_caller(rng, world),
        demand=demand,
    )
    if response is not None:
        env.deleted = False


async def create_member(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    role = rng.choices(ORG_ROLES, weights=(1, 4, 6))[0]
    response = await run.write(
        world,
        server,
        run.servers[server].members.CreateMember,
        new_member_request(world, role),
        world.owner,
        demand=demand,
    )
    if response is not None:
        adopt_member(run, world, response.id, role)


async def update_member(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    candidates = [member for member in live_members(world) if not member.original]
    if not candidates:
        await create_member(run, rng, world, server, demand)
        return
    member = rng.choice(candidates)
    if rng.random() < 0.15:
        request = member_pb2.UpdateMemberRequest(
            member=member_pb2.Member(id=member.id, display_name=f"Renamed {world.next_number()}"),
            update_mask=mask("display_name"),
        )
        role = member.role
    else:
        role = rng.choice([other for other in ORG_ROLES if other != member.role])
        request = member_pb2.UpdateMemberRequest(
            member=member_pb2.Member(id=member.id, role=role),
            update_mask=mask("role"),
        )
    response = await run.write(
        world,
        server,
        run.servers[server].members.UpdateMember,
        request,
        pick_caller(rng, world),
        demand=demand,
    )
    if response is not None:
        member.role = role


async def delete_member(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    candidates = [member for member in live_members(world) if not member.original]
    if not candidates:
        await create_member(run, rng, world, server, demand)
        return
    member = rng.choice(candidates)
    response = await run.write(
        world,
        server,
        run.servers[server].members.DeleteMember,
        member_pb2.DeleteMemberRequest(id=member.id),
        pick_caller(rng, world),
        demand=demand,
    )
    if response is not None:
        member.deleted = True
        for pair in [pair for pair in world.memberships if pair[0] == member.id]:
            del world.memberships[pair]


async def add_environment_member(
    run: Run, rng: random.Random, world: World, server: str, demand: bool
) -> None:
    candidates = [member for member in live_members(world) if not member.original]
    if not candidates:
        await create_member(run, rng, world, server, demand)
        return
    member = rng.choice(candidates)
    envs = active_envs(world)
    env = rng.choice(envs if envs and rng.random() < 0.9 else world.envs)
    role = rng.choice(ENV_ROLES)
    response = await run.write(
        world,
        server,
        run.servers[server].members.AddEnvironmentMember,
        member_pb2.AddEnvironmentMemberRequest(environment_id=env.id, member_id=member.id, role=role),
        pick_caller(rng, world),
        demand=demand,
    )
    if response is not None:
        world.memberships[member.id, env.id] = role


async def update_environment_member(
    run: Run, rng: random.Random, world: World, server: str, demand: bool
) -> None:
    if not world.memberships:
        await add_environment_member(run, rng, world, server, demand)
        return
    (member_id, env_id), role = rng.choice(sorted(world.memberships.items()))
    new_role = "MEMBER" if role == "ADMIN" else "ADMIN"
    response = await run.write(
        world,
        server,
        run.servers[server].members.UpdateEnvironmentMember,
        member_pb2.UpdateEnvironmentMemberRequest(
            environment_member=member_pb2.EnvironmentMember(
                environment_id=env_id,
                member_id=member_id,
                role=new_role,
            ),
            update_mask=mask("role"),
        ),
        pick_caller(rng, world),
        demand=demand,
    )
    if response is not None:
        world.memberships[member_id, env_id] = new_role


async def remove_environment_member(
    run: Run, rng: random.Random, world: World, server: str, demand: bool
) -> None:
    if not world.memberships:
        await add_environment_member(run, rng, world, server, demand)
        return
    member_id, env_id = rng.choice(sorted(world.memberships))
    response = await run.write(
        world,
        server,
        run.servers[server].members.RemoveEnvironmentMember,
        member_pb2.RemoveEnvironmentMemberRequest(environment_id=env_id, member_id=member_id),
        pick_caller(rng, world),
        demand=demand,
    )
    if response is not None:
        world.memberships.pop((member_id, env_id), None)


def some_envs(rng: random.Random, world: World) -> list[str]:
    """Empty (organization-wide) about a third of the time, else one to three environments,
    rarely a deleted one."""
    if rng.random() < 0.35:
        return []
    active = active_envs(world)
    pool = active if active and rng.random() < 0.9 else world.envs
    return [env.id for env in rng.sample(pool, k=min(len(pool), rng.randint(1, 3)))]


def some_scopes(rng: random.Random) -> list[str]:
    return sorted(rng.sample(SCOPE_POOL, k=rng.randint(1, 6)))


async def create_key(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    members = live_members(world)
    owner = rng.choice(members).id if members and rng.random() < 0.7 else ""
    request = api_key_pb2.CreateApiKeyRequest(
        name=f"key {world.next_number()}",
        scopes=some_scopes(rng),
        environment_ids=some_envs(rng, world),
        owner_member_id=owner,
        mode=rng.choice(["LIVE", "DEV"]),
    )
    if rng.random() < 0.2:
        request.expire_time.CopyFrom(stamp(far_future(rng)))
    caller = world.owner if rng.random() < 0.85 else pick_caller(rng, world)
    response = await run.write(
        world, server, run.servers[server].api_keys.CreateApiKey, request, caller, demand=demand
    )
    if response is not None:
        adopt_key(run, world, response.api_key.id, response.secret, response.api_key.owner_member_id)


async def update_key(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    candidates = changeable_keys(world)
    if not candidates:
        await create_key(run, rng, world, server, demand)
        return
    key = rng.choice(candidates)
    path = rng.choice(["scopes", "environment_ids", "environment_ids", "expire_time", "name"])
    wire = api_key_pb2.ApiKey(id=key.id)
    if path == "scopes":
        wire.scopes.extend(some_scopes(rng))
    elif path == "environment_ids":
        wire.environment_ids.extend(some_envs(rng, world))
    elif path == "expire_time":
        if rng.random() < 0.7:
            wire.expire_time.CopyFrom(stamp(far_future(rng)))
    else:
        wire.name = f"renamed {world.next_number()}"
    # Now and then the key narrows (or tries to widen) itself.
    caller = key if rng.random() < 0.3 else pick_caller(rng, world)
    await run.write(
        world,
        server,
        run.servers[server].api_keys.UpdateApiKey,
        api_key_pb2.UpdateApiKeyRequest(api_key=wire, update_mask=mask(path)),
        caller,
        demand=demand,
    )


async def revoke_key(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    candidates = changeable_keys(world)
    if not candidates:
        await create_key(run, rng, world, server, demand)
        return
    key = rng.choice(candidates)
    response = await run.write(
        world,
        server,
        run.servers[server].api_keys.RevokeApiKey,
        api_key_pb2.RevokeApiKeyRequest(id=key.id),
        pick_caller(rng, world),
        demand=demand,
    )
    if response is not None:
        key.revoked = True


async def roll_key(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    candidates = [key for key in changeable_keys(world) if not key.revoked]
    if not candidates:
        await create_key(run, rng, world, server, demand)
        return
    key = rng.choice(candidates)
    seconds = rng.choice([0, 3600])
    request = api_key_pb2.RollApiKeyRequest(
        id=key.id, previous_key_ttl=duration_pb2.Duration(seconds=seconds)
    )
    caller = key if rng.random() < 0.25 else world.owner
    response = await run.write(
        world, server, run.servers[server].api_keys.RollApiKey, request, caller, demand=demand
    )
    if response is not None:
        adopt_key(run, world, response.api_key.id, response.secret, key.owner)


async def register_resource(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    envs = active_envs(world)
    env = rng.choice(envs if envs and rng.random() < 0.9 else world.envs)
    kind = rng.choice([INBOX, MESSAGE])
    resource_id = rng.choice(RESOURCE_IDS)
    response = await run.write(
        world,
        server,
        run.servers[server].resources.RegisterResource,
        resource_pb2.RegisterResourceRequest(
            kind=kind, resource_id=resource_id, display_name=f"R {world.next_number()}"
        ),
        pick_caller(rng, world),
        environment=env.id,
        demand=demand,
    )
    if response is not None:
        world.resources[kind, resource_id] = response.environment_id


async def deregister_resource(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    if not world.resources:
        await register_resource(run, rng, world, server, demand)
        return
    (kind, resource_id), env_id = rng.choice(sorted(world.resources.items()))
    response = await run.write(
        world,
        server,
        run.servers[server].resources.DeregisterResource,
        resource_pb2.DeregisterResourceRequest(kind=kind, resource_id=resource_id),
        pick_caller(rng, world),
        environment=env_id,
        demand=demand,
    )
    if response is not None:
        world.resources.pop((kind, resource_id), None)


async def reassign_resources(run: Run, rng: random.Random, world: World, server: str, demand: bool) -> None:
    if not world.resources:
        await register_resource(run, rng, world, server, demand)
        return
    (kind, resource_id), source = rng.choice(sorted(world.resources.items()))
    targets = [env for env in active_envs(world) if env.id != source] or world.envs
    target = rng.choice(targets)
    everything = rng.random() < 0.4
    request = resource_pb2.ReassignResourcesRequest(from_environment_id=source, to_environment_id=target.id)
    if not everything:
        request.resources.add(kind=kind, resource_id=resource_id)
    response = await run.write(
        world, server, run.servers[server].resources.ReassignResources, request, world.owner, demand=demand
    )
    if response is not None:
        moved = [pair for pair, env_id in world.resources.items() if env_id == source]
        for pair in moved if everything else [(kind, resource_id)]:
            world.resources[pair] = target.id


Step = Callable[[Run, random.Random, World, str, bool], Awaitable[None]]
# One write as a scenario plans it: the stub method and its request.
Write = tuple[Callable[..., Any], Message]
STEP_WEIGHTS: tuple[tuple[Step, int], ...] = (
    (create_environment, 5),
    (update_environment, 2),
    (delete_environment, 4),
    (undelete_environment, 3),
    (create_member, 3),
    (update_member, 4),
    (delete_member, 2),
    (add_environment_member, 5),
    (update_environment_member, 2),
    (remove_environment_member, 3),
    (create_key, 6),
    (update_key, 6),
    (revoke_key, 2),
    (roll_key, 3),
    (register_resource, 3),
    (deregister_resource, 1),
    (reassign_resources, 2),
)


def draw_step(rng: random.Random) -> Step:
    steps, weights = zip(*STEP_WEIGHTS, strict=True)
    chosen: Step = rng.choices(steps, weights=weights)[0]
    return chosen


async def warm_everything(run: Run) -> None:
    """Every key verified once on every replica: what each holds can now go stale."""
    for server in run.servers.values():
        for world in run.worlds:
            for key in world.keys:
                await server.api_keys.VerifyApiKey(
                    api_key_pb2.VerifyApiKeyRequest(secret=key.secret), timeout=HANG
                )


@contextlib.asynccontextmanager
async def two_replicas(backend: Backend, name: str, slow_b: bool = False) -> AsyncIterator[Run]:
    """Replicas A and B on `backend`. With `slow_b`, B's safety-net poll is too slow to matter:
    on SQLite it then follows A only when a freshness demand makes it read the log."""
    async with serving(backend) as a, serving(backend, cache_refresh_seconds=30.0 if slow_b else 0.2) as b:
        yield Run(backend, name, {"A": a, "B": b})


# -- the random runs -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_writes_over_two_replicas_match_a_fresh_replica(backend: Backend, seed: int) -> None:
    """Seeded random sequences of every mutating RPC over two organizations, each write sent to
    A or B at random (demanding the last revision, so each sees the one before it), now and then
    a burst of several writes at once over both replicas and both organizations. After every step
    A and B must agree on every key's VerifyApiKey answer; every few steps both must answer every
    probe exactly as a replica started afterwards. Replay a failure with
    AGENTPOST_COHERENCE_SEEDS=<seed>; a burst's interleaving is up to the scheduler."""
    rng = random.Random(seed)
    async with two_replicas(backend, f"seed {seed}", slow_b=seed % 2 == 1) as run:
        for _ in range(2):
            await run.new_world(rng.choice(["A", "B"]))
        await warm_everything(run)
        for step in range(1, STEPS + 1):
            writer: tuple[str, World] | None = None
            if rng.random() < 0.15:
                size = rng.randint(2, 4)
                run.note(f"-- step {step}: a burst of {size} writes at once")
                await asyncio.gather(
                    *(
                        draw_step(rng)(run, rng, rng.choice(run.worlds), rng.choice(["A", "B"]), False)
                        for _ in range(size)
                    )
                )
            else:
                run.note(f"-- step {step}")
                server = rng.choice(["A", "B"])
                world = rng.choice(run.worlds)
                writer = (server, world)
                await draw_step(rng)(run, rng, world, server, True)
            await compare_replicas_cheaply(run, writer)
            if step % CHECK_EVERY == 0 or step == STEPS:
                await compare_with_fresh(run, f"after step {step}")


# -- fixed scenarios -------------------------------------------------------------------------

ALL_SCOPES = sorted(scopes.ALL_SCOPES)


async def made(response: Any | None, what: str, run: Run) -> Any:
    """A set-up write's response; set-up must not be refused."""
    assert response is not None, f"{run.story()}\nset-up failed: {what}"
    return response


async def make_env(run: Run, world: World, server: str = "A") -> EnvRef:
    number = world.next_number()
    response = await made(
        await run.write(
            world,
            server,
            run.servers[server].environments.CreateEnvironment,
            environment_pb2.CreateEnvironmentRequest(name=f"Env {number}", slug=f"{world.label}-e{number}"),
            world.owner,
        ),
        "CreateEnvironment",
        run,
    )
    return adopt_env(run, world, response.id, response.slug)


async def make_member(run: Run, world: World, role: str, server: str = "A") -> MemberRef:
    response = await made(
        await run.write(
            world,
            server,
            run.servers[server].members.CreateMember,
            new_member_request(world, role),
            world.owner,
        ),
        "CreateMember",
        run,
    )
    return adopt_member(run, world, response.id, role)


async def make_key(
    run: Run,
    world: World,
    key_scopes: Sequence[str],
    env_ids: Sequence[str] = (),
    owner: MemberRef | None = None,
    server: str = "A",
) -> KeyRef:
    response = await made(
        await run.write(
            world,
            server,
            run.servers[server].api_keys.CreateApiKey,
            api_key_pb2.CreateApiKeyRequest(
                name=f"key {world.next_number()}",
                scopes=list(key_scopes),
                environment_ids=list(env_ids),
                owner_member_id=owner.id if owner is not None else "",
            ),
            world.owner,
        ),
        "CreateApiKey",
        run,
    )
    return adopt_key(run, world, response.api_key.id, response.secret, response.api_key.owner_member_id)


def add_member_request(env: EnvRef, member: MemberRef, role: str) -> member_pb2.AddEnvironmentMemberRequest:
    return member_pb2.AddEnvironmentMemberRequest(
        environment_id=env.id,
        member_id=member.id,
        role=role,
    )


async def make_membership(
    run: Run, world: World, env: EnvRef, member: MemberRef, role: str, server: str = "A"
) -> None:
    """`member` added to `env` with `role`, through `server` as the owner."""
    await made(
        await run.write(
            world,
            server,
            run.servers[server].members.AddEnvironmentMember,
            add_member_request(env, member, role),
            world.owner,
        ),
        "AddEnvironmentMember",
        run,
    )
    world.memberships[member.id, env.id] = role


def role_request(member: MemberRef, role: str) -> member_pb2.UpdateMemberRequest:
    return member_pb2.UpdateMemberRequest(
        member=member_pb2.Member(id=member.id, role=role),
        update_mask=mask("role"),
    )


def key_envs_request(key: KeyRef, env_ids: Sequence[str]) -> api_key_pb2.UpdateApiKeyRequest:
    return api_key_pb2.UpdateApiKeyRequest(
        api_key=api_key_pb2.ApiKey(id=key.id, environment_ids=list(env_ids)),
        update_mask=mask("environment_ids"),
    )


def roll_request(key: KeyRef, seconds: int) -> api_key_pb2.RollApiKeyRequest:
    return api_key_pb2.RollApiKeyRequest(id=key.id, previous_key_ttl=duration_pb2.Duration(seconds=seconds))


async def furnish(run: Run, world: World, server: str = "A") -> None:
    """Three more environments, an ADMIN and a MEMBER (environment ADMIN of the first, MEMBER of
    the second), and keys of every shape: the MEMBER's over two environments, the ADMIN's
    organization-wide, one no member owns scoped to one environment, and the MEMBER's
    organization-wide one."""
    envs = [await make_env(run, world, server) for _ in range(3)]
    admin = await make_member(run, world, "ADMIN", server)
    member = await make_member(run, world, "MEMBER", server)
    for env, role in ((envs[0], "ADMIN"), (envs[1], "MEMBER")):
        await make_membership(run, world, env, member, role, server)
    await make_key(run, world, ALL_SCOPES, [envs[0].id, envs[1].id], member, server)
    await make_key(run, world, ALL_SCOPES, [], admin, server)
    await make_key(run, world, ["inboxes:read", "inboxes:write"], [envs[2].id], None, server)
    await make_key(run, world, ["environments:read", "members:read", "inboxes:read"], [], member, server)


async def test_concurrent_writes_to_one_organization_from_both_replicas(backend: Backend) -> None:
    """Rounds of eight writes to one organization at once, half through A and half through B,
    none demanding a revision (so each replica writes from whatever view it has): environment
    deletes and undeletes, role changes, memberships, key updates and rolls, registrations. After
    each round A and B, asked for the last revision, answer as a fresh replica."""
    rng = random.Random(31)
    async with two_replicas(backend, "concurrent writes to one organization", slow_b=True) as run:
        world = await run.new_world()
        await furnish(run, world)
        await warm_everything(run)
        plan: tuple[tuple[Step, str], ...] = (
            (delete_environment, "A"),
            (undelete_environment, "B"),
            (update_member, "A"),
            (add_environment_member, "B"),
            (update_key, "A"),
            (update_key, "B"),
            (remove_environment_member, "A"),
            (roll_key, "B"),
            (create_environment, "A"),
            (register_resource, "B"),
        )
        for round_ in range(5):
            run.note(f"-- round {round_}: {len(plan)} writes at once")
            await asyncio.gather(*(step(run, rng, world, server, False) for step, server in plan))
            await compare_with_fresh(run, f"after round {round_}")


async def test_environment_deleted_and_undeleted_while_a_member_key_is_narrowed(backend: Backend) -> None:
    """A MEMBER administering three environments owns a key over all three. While A deletes and
    undeletes the middle environment, the key narrows itself on B (to two environments, then to
    the middle one) and is verified there on both replicas; then the owner widens it back on A.
    After each round A and B answer as a fresh replica."""
    async with two_replicas(backend, "delete/undelete while a member key narrows", slow_b=True) as run:
        world = await run.new_world()
        e1, e2, e3 = [await make_env(run, world) for _ in range(3)]
        member = await make_member(run, world, "MEMBER")
        for env in (e1, e2, e3):
            await make_membership(run, world, env, member, "ADMIN")
        key = await make_key(
            run,
            world,
            ["api_keys:read", "api_keys:write", "environments:read", "inboxes:read"],
            [e1.id, e2.id, e3.id],
            member,
        )
        await warm_everything(run)
        a, b = run.servers["A"], run.servers["B"]

        async def flip() -> None:
            order = ("Undelete", "Delete") if e2.deleted else ("Delete", "Undelete")
            writes: dict[str, Write] = {
                "Delete": (
                    a.environments.DeleteEnvironment,
                    environment_pb2.DeleteEnvironmentRequest(id=e2.id),
                ),
                "Undelete": (
                    a.environments.UndeleteEnvironment,
                    environment_pb2.UndeleteEnvironmentRequest(id=e2.id),
                ),
            }
            for action in order:
                done = await run.write(world, "A", *writes[action], world.owner, demand=False)
                if done is not None:
                    e2.deleted = action == "Delete"

        async def narrow() -> None:
            await run.write(
                world, "B", b.api_keys.UpdateApiKey, key_envs_request(key, [e1.id, e2.id]), key, demand=False
            )
            await run.write(
                world, "B", b.api_keys.UpdateApiKey, key_envs_request(key, [e2.id]), key, demand=False
            )

        async def use() -> None:
            for _ in range(6):
                for server in (a, b):
                    await server.api_keys.VerifyApiKey(
                        api_key_pb2.VerifyApiKeyRequest(secret=key.secret, environment=e2.slug), timeout=HANG
                    )
                await asyncio.sleep(0)

        for round_ in range(4):
            run.note(f"-- round {round_}: delete/undelete {e2.label} on A while {key.label} narrows on B")
            await asyncio.gather(flip(), narrow(), use())
            await compare_with_fresh(run, f"after round {round_}")
            await run.write(
                world, "A", a.api_keys.UpdateApiKey, key_envs_request(key, [e1.id, e2.id, e3.id]), world.owner
            )
            await compare_with_fresh(run, f"after widening in round {round_}")


async def test_member_demoted_from_admin_and_added_back_to_environments(backend: Backend) -> None:
    """An ADMIN that owns an organization-wide key and a key over two environments (and was
    already a MEMBER of the first) is demoted to MEMBER on A, given the second environment on B,
    removed from and re-added to the first, promoted and demoted again, while the first is
    deleted and undeleted. First with every write demanding the last revision and a fresh
    replica compared after each; then the same writes without demands, compared at the end."""
    async with two_replicas(backend, "demoted ADMIN re-added to environments", slow_b=True) as run:
        world = await run.new_world()
        e1, e2 = await make_env(run, world), await make_env(run, world)
        member = await make_member(run, world, "ADMIN")
        await make_membership(run, world, e1, member, "MEMBER")
        await make_key(run, world, ALL_SCOPES, [], member)
        await make_key(
            run, world, ["environments:read", "members:read", "inboxes:read"], [e1.id, e2.id], member
        )
        await warm_everything(run)
        a, b = run.servers["A"], run.servers["B"]
        plan: list[tuple[str, Callable[..., Any], Message]] = [
            ("A", a.members.UpdateMember, role_request(member, "MEMBER")),
            ("B", b.members.AddEnvironmentMember, add_member_request(e2, member, "ADMIN")),
            (
                "A",
                a.members.RemoveEnvironmentMember,
                member_pb2.RemoveEnvironmentMemberRequest(environment_id=e1.id, member_id=member.id),
            ),
            ("B", b.members.AddEnvironmentMember, add_member_request(e1, member, "MEMBER")),
            ("A", a.members.UpdateMember, role_request(member, "ADMIN")),
            ("B", b.members.UpdateMember, role_request(member, "MEMBER")),
            ("A", a.environments.DeleteEnvironment, environment_pb2.DeleteEnvironmentRequest(id=e1.id)),
            (
                "B",
                b.members.RemoveEnvironmentMember,
                member_pb2.RemoveEnvironmentMemberRequest(environment_id=e2.id, member_id=member.id),
            ),
            ("A", a.members.AddEnvironmentMember, add_member_request(e2, member, "MEMBER")),
            ("B", b.environments.UndeleteEnvironment, environment_pb2.UndeleteEnvironmentRequest(id=e1.id)),
            ("A", a.members.UpdateMember, role_request(member, "ADMIN")),
            ("B", b.members.UpdateMember, role_request(member, "MEMBER")),
        ]
        for index, (server, method, request) in enumerate(plan):
            await run.write(world, server, method, request, world.owner)
            await compare_with_fresh(run, f"after write {index}")
        run.note("-- the same writes again, none demanding a revision")
        for server, method, request in plan:
            await run.write(world, server, method, request, world.owner, demand=False)
        await compare_with_fresh(run, "after the writes without demands")


async def test_a_key_rolled_twice_with_overlap(backend: Backend) -> None:
    """A member-owned environment key warm on both replicas is rolled on A with an hour of
    overlap, its successor rolled on B, the first key rolled again inside its overlap, the
    second successor narrowed on B, the first successor revoked on A and the last one rolled
    with no overlap; after each write A and B answer for every key as a fresh replica. The
    successor is also rolled by itself on B without a demand, right after A's roll."""
    async with two_replicas(backend, "a key rolled twice with overlap", slow_b=True) as run:
        world = await run.new_world()
        e1 = await make_env(run, world)
        member = await make_member(run, world, "MEMBER")
        await make_membership(run, world, e1, member, "ADMIN")
        first = await make_key(run, world, ALL_SCOPES, [e1.id], member)
        await warm_everything(run)
        a, b = run.servers["A"], run.servers["B"]

        async def roll(
            server: str, key: KeyRef, seconds: int, caller: KeyRef, demand: bool = True
        ) -> KeyRef | None:
            response = await run.write(
                world,
                server,
                run.servers[server].api_keys.RollApiKey,
                roll_request(key, seconds),
                caller,
                demand=demand,
            )
            if response is None:
                return None
            return adopt_key(run, world, response.api_key.id, response.secret, key.owner)

        second = await roll("A", first, 3600, world.owner)
        await compare_with_fresh(run, "after the first roll")
        assert second is not None
        third = await roll("B", second, 3600, world.owner)
        await compare_with_fresh(run, "after rolling the successor")
        again = await roll("A", first, 600, world.owner)
        await compare_with_fresh(run, "after rolling the first key inside its overlap")
        if third is not None:
            await run.write(
                world,
                "B",
                b.api_keys.UpdateApiKey,
                api_key_pb2.UpdateApiKeyRequest(
                    api_key=api_key_pb2.ApiKey(id=third.id, scopes=["environments:read", "inboxes:read"]),
                    update_mask=mask("scopes"),
                ),
                world.owner,
            )
            await compare_with_fresh(run, "after narrowing the second successor")
        await run.write(
            world, "A", a.api_keys.RevokeApiKey, api_key_pb2.RevokeApiKeyRequest(id=second.id), world.owner
        )
        await compare_with_fresh(run, "after revoking the first successor")
        if again is not None:
            await roll("B", again, 0, world.owner)
            await compare_with_fresh(run, "after rolling with no overlap")
        # A roll on A, then the successor rolls itself on B, which has not applied the roll.
        fourth = await roll("A", first if again is None else again, 3600, world.owner)
        if fourth is not None:
            await roll("B", fourth, 3600, fourth, demand=False)
        await compare_with_fresh(run, "after a successor rolled itself on the other replica")


async def test_two_organizations_written_in_interleaved_order(backend: Backend) -> None:
    """Two organizations of the same shape, their writes interleaved over both replicas: in each
    round four writes at once, each organization written through A and through B. A and B must
    keep them apart and answer for both as a fresh replica."""
    rng = random.Random(77)
    async with two_replicas(backend, "two organizations interleaved", slow_b=True) as run:
        first = await run.new_world("A")
        second = await run.new_world("B")
        await furnish(run, first, "A")
        await furnish(run, second, "B")
        await warm_everything(run)
        for round_ in range(6):
            run.note(f"-- round {round_}: both organizations written through both replicas at once")
            plan = ((first, "A"), (second, "B"), (second, "A"), (first, "B"))
            await asyncio.gather(*(draw_step(rng)(run, rng, world, server, False) for world, server in plan))
            if round_ % 2 == 1:
                await compare_with_fresh(run, f"after round {round_}")


# The README ("Running in production", Revocation bound): with notifications lost, a replica
# follows another's writes within its poll interval plus one read of the log. Allowed for the
# read here, generously: it only decides when polling starts.
ONE_READ_SECONDS = 1.0


async def test_other_replica_converges_without_a_freshness_demand(backend: Backend) -> None:
    """Replica B (the documented default poll for its database) holds everything of an
    organization warm. A then revokes, narrows, rolls and expires keys, deletes, renames and
    creates environments, demotes and deletes members and changes memberships. Once the
    revocation bound has passed, B, asked WITHOUT any freshness demand, must answer every probe
    as a fresh replica (polled until it does, within a generous hang limit, then checked stable)."""
    async with (
        serving(backend) as a,
        serving(backend, cache_refresh_seconds=None) as b,
    ):
        run = Run(backend, "B converges without a freshness demand", {"A": a, "B": b})
        world = await run.new_world("A")
        await furnish(run, world)
        e1, e2, e3 = world.envs[1:4]
        admin, member = world.members[1:3]
        member_key, _, env_key, wide_member_key = world.keys[1:5]
        await warm_everything(run)
        # B answers every probe once: everything it holds is warm, and then stale.
        await collect(run, {"B": b}, "B", demand=False)
        for method, request in (
            (a.api_keys.RevokeApiKey, api_key_pb2.RevokeApiKeyRequest(id=env_key.id)),
            (a.api_keys.UpdateApiKey, key_envs_request(member_key, [e1.id])),
            (a.api_keys.RollApiKey, roll_request(wide_member_key, 0)),
            (a.environments.DeleteEnvironment, environment_pb2.DeleteEnvironmentRequest(id=e2.id)),
            (
                a.environments.UpdateEnvironment,
                environment_pb2.UpdateEnvironmentRequest(
                    environment=environment_pb2.Environment(id=e3.id, name="Renamed"),
                    update_mask=mask("name"),
                ),
            ),
            (a.members.UpdateMember, role_request(admin, "MEMBER")),
            (a.members.AddEnvironmentMember, add_member_request(e3, admin, "ADMIN")),
            (
                a.members.RemoveEnvironmentMember,
                member_pb2.RemoveEnvironmentMemberRequest(environment_id=e1.id, member_id=member.id),
            ),
            (a.members.AddEnvironmentMember, add_member_request(e2, member, "ADMIN")),
        ):
            response = await run.write(world, "A", method, request, world.owner)
            if isinstance(response, api_key_pb2.RollApiKeyResponse):
                adopt_key(run, world, response.api_key.id, response.secret, response.api_key.owner_member_id)
        await make_env(run, world)
        await run.write(
            world, "A", a.members.DeleteMember, member_pb2.DeleteMemberRequest(id=member.id), world.owner
        )
        written = time.monotonic()
        bound = b.app.access.refresh_interval + ONE_READ_SECONDS
        run.note(f"-- B asked without a demand once {bound:.2f} s have passed")
        await asyncio.sleep(max(0.0, written + bound - time.monotonic()))
        async with fresh_replica(backend) as fresh:
            found: list[str] = []
            matches = 0
            while matches < 3:
                answers = await collect(run, {"B": b, "C": fresh}, "C", demand=False)
                found = differences(run, answers, ["B"], "C")
                if found:
                    assert matches == 0, f"{run.story()}\nB went back to other answers:\n" + "\n".join(found)
                    assert time.monotonic() - written < HANG, (
                        f"{run.story()}\nB, asked without a demand, still differs from a fresh replica "
                        f"{HANG:.0f} s after the writes:\n" + "\n".join(found)
                    )
                    await asyncio.sleep(0.1)
                    continue
                matches += 1
            print(
                f"\n[{backend.name}] B matched a fresh replica without a demand "
                f"{time.monotonic() - written:.2f} s after the last write (bound {bound:.2f} s)"
            )


async def test_a_replicas_own_change_is_not_undone_by_an_older_read_of_the_log(backend: Backend) -> None:
    """README: a change is honoured by the replica that made it on the very next call. Round
    after round, A changes a record (flips a MEMBER's role in an environment, renames an ADMIN,
    renames an environment) while B, at the same moment, removes that membership, deletes that
    ADMIN (whose organization-wide key must then be OWNER_REMOVED) or deletes that environment.
    Once B's write has answered OK, every later call to B, without any freshness demand, must
    reflect it: a read of the log that B began before its own commit (to apply A's change) must
    not put back, even for a moment, what B's write took away. (On SQLite a read of the log does
    not yield to other calls, so only PostgreSQL can show it; the test runs on both.)"""
    async with two_replicas(backend, "own changes honoured on the next call") as run:
        world = await run.new_world()
        a, b = run.servers["A"], run.servers["B"]
        regressions: list[str] = []

        async def watch(secret: str, environment: str, expected: str, what: str) -> None:
            """Verifies on B, back to back for a while, without a demand; every answer must be
            `expected` (a denial reason)."""
            started = time.monotonic()
            wrong: list[str] = []
            for attempt in range(30):
                answer = await b.api_keys.VerifyApiKey(
                    api_key_pb2.VerifyApiKeyRequest(secret=secret, environment=environment), timeout=HANG
                )
                reason = (
                    "VALID"
                    if answer.valid
                    else api_key_pb2.VerifyApiKeyResponse.DenialReason.Name(answer.denial_reason)
                )
                if reason != expected:
                    wrong.append(f"call {attempt} at {1000 * (time.monotonic() - started):.1f} ms: {reason}")
                await asyncio.sleep(0.001)
            if wrong:
                line = f"{what}: B then answered, instead of {expected}: {'; '.join(wrong)}"
                regressions.append(line)
                run.note(f"!! {line}")

        async def race(
            a_write: Write,
            b_write: Write,
            delay: float,
            check: tuple[str, str, str],
            what: str,
        ) -> None:
            """A's write and, `delay` seconds later, B's; once B's answers OK, `watch`."""

            async def on_b() -> None:
                await asyncio.sleep(delay)
                if await run.write(world, "B", *b_write, world.owner, demand=False) is not None:
                    await watch(*check, what)

            await asyncio.gather(run.write(world, "A", *a_write, world.owner, demand=False), on_b())

        for round_ in range(16):
            run.note(f"-- round {round_}")
            env = await make_env(run, world)
            member = await make_member(run, world, "MEMBER")
            await make_membership(run, world, env, member, "ADMIN")
            member_key = await make_key(run, world, ["inboxes:read"], [env.id], member)
            env_key = await make_key(run, world, ["inboxes:read"], [env.id])
            boss = await make_member(run, world, "ADMIN")
            boss_key = await make_key(run, world, ["inboxes:read"], [], boss)
            for server in (a, b):
                for key in (member_key, env_key, boss_key):
                    await server.api_keys.VerifyApiKey(
                        api_key_pb2.VerifyApiKeyRequest(secret=key.secret, min_revision=world.revision),
                        timeout=HANG,
                    )

            delay = 0.001 * (round_ % 4)
            # A's write, B's write at about the same moment, and what B must then answer for which key.
            races: list[tuple[Write, Write, str, str, str]] = [
                (
                    (
                        a.members.UpdateEnvironmentMember,
                        member_pb2.UpdateEnvironmentMemberRequest(
                            environment_member=member_pb2.EnvironmentMember(
                                environment_id=env.id,
                                member_id=member.id,
                                role="MEMBER",
                            ),
                            update_mask=mask("role"),
                        ),
                    ),
                    (
                        b.members.RemoveEnvironmentMember,
                        member_pb2.RemoveEnvironmentMemberRequest(environment_id=env.id, member_id=member.id),
                    ),
                    member_key.secret,
                    "ENVIRONMENT_NOT_ALLOWED",
                    "membership removed on B",
                ),
                (
                    (
                        a.members.UpdateMember,
                        member_pb2.UpdateMemberRequest(
                            member=member_pb2.Member(id=boss.id, display_name=f"Renamed {round_}"),
                            update_mask=mask("display_name"),
                        ),
                    ),
                    (b.members.DeleteMember, member_pb2.DeleteMemberRequest(id=boss.id)),
                    boss_key.secret,
                    "OWNER_REMOVED",
                    "member deleted on B",
                ),
                (
                    (
                        a.environments.UpdateEnvironment,
                        environment_pb2.UpdateEnvironmentRequest(
                            environment=environment_pb2.Environment(id=env.id, name=f"Renamed {round_}"),
                            update_mask=mask("name"),
                        ),
                    ),
                    (b.environments.DeleteEnvironment, environment_pb2.DeleteEnvironmentRequest(id=env.id)),
                    env_key.secret,
                    "ENVIRONMENT_DELETED",
                    "environment deleted on B",
                ),
            ]
            for a_write, b_write, secret, expected, what in races:
                await race(a_write, b_write, delay, (secret, env.id, expected), f"round {round_}: {what}")
        assert not regressions, f"{run.story()}\nB's own writes were undone on later calls:\n" + "\n".join(
            regressions
        )
        await compare_with_fresh(run, "at the end")
