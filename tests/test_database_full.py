"""The database's disk fills up under SQLite: a real file system of a few megabytes (a tmpfs,
mounted for the test) that the writes fill.

A write that finds no space is RESOURCE_EXHAUSTED DATABASE_FULL (gRPC's own meaning of the code:
"the entire file system is out of space"), never UNKNOWN, INTERNAL or a misleading
"unreachable"; nothing of it is written; reads and verifications go on from the same server; once
space is freed, writes go through again by themselves, every acknowledged write is still there
and the event log has no gap. PostgreSQL's disk_full (SQLSTATE 53100) maps the same way
(tests/test_outage.py lists it with the other driver errors).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentpost.environments.v1 import environment_pb2, event_pb2_grpc, resource_pb2

from tests.harness import Failure, Harness, auth, every_event, failure_of
from tests.servers import Backend, serving

INBOX = resource_pb2.ScopedResource.Kind.INBOX
SMALL = "4m"
ROOMY = "64m"
MOST_WRITES = 5_000


def _mount(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *arguments], capture_output=True, text=True, check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A file system of a few megabytes, grown to `ROOMY` by `_free_space`; unmounted afterwards."""
    directory = tmp_path / "small"
    directory.mkdir()
    try:
        mounted = _mount("-t", "tmpfs", "-o", f"size={SMALL}", "tmpfs", str(directory))
    except FileNotFoundError:
        pytest.skip("filling a disk needs `mount`, which this machine lacks")
    if mounted.returncode != 0:
        pytest.skip(f"filling a disk needs a tmpfs mount, refused here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


def _free_space(directory: Path) -> None:
    resized = _mount("-o", f"remount,size={ROOMY}", str(directory))
    assert resized.returncode == 0, resized.stderr


async def _register_large(
    harness: Harness, owner: tuple[tuple[str, str], ...], resource_id: str
) -> Failure | None:
    """Registers an inbox with a long display name; the refusal, if refused."""
    try:
        await harness.resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(kind=INBOX, resource_id=resource_id, display_name="y" * 200),
            metadata=owner,
        )
    except grpc.aio.AioRpcError as error:
        return failure_of(error)
    return None


async def _registered_inboxes(harness: Harness, owner: tuple[tuple[str, str], ...]) -> set[str]:
    """Every registered inbox's id, page by page."""
    registered: set[str] = set()
    token = ""
    while True:
        page = await harness.resources.ListResources(
            resource_pb2.ListResourcesRequest(kind=INBOX, page_size=500, page_token=token), metadata=owner
        )
        registered.update(resource.resource_id for resource in page.resources)
        token = page.next_page_token
        if not token:
            return registered


async def test_a_full_disk_refuses_writes_as_database_full_and_loses_nothing(small_disk: Path) -> None:
    backend = Backend("sqlite", f"sqlite+aiosqlite:///{small_disk / 'agentpost.db'}", None)
    async with serving(backend) as harness:
        org = await harness.new_org()
        owner = auth(org.owner_secret)
        acknowledged: list[str] = []
        refusal = None
        for index in range(MOST_WRITES):
            resource_id = f"inbox-{index}-{'x' * 100}"
            refusal = await _register_large(harness, owner, resource_id)
            if refusal is not None:
                break
            acknowledged.append(resource_id)
        assert refusal is not None, f"{MOST_WRITES} writes did not fill {SMALL}"
        assert (refusal.code, refusal.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DATABASE_FULL"), (
            refusal
        )
        assert "no space left" in refusal.message
        assert acknowledged, "the very first write found the disk full"

        # While it is full: other writes are refused the same way (a smaller one may still fit
        # in pages the database file already holds, and then it is stored), reads and
        # verifications go on.
        created: list[str] = []
        for index in range(MOST_WRITES):
            try:
                await harness.environments.CreateEnvironment(
                    environment_pb2.CreateEnvironmentRequest(name=f"While full {index}"), metadata=owner
                )
            except grpc.aio.AioRpcError as error:
                failure = failure_of(error)
                assert (failure.code, failure.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DATABASE_FULL")
                refused_slug = f"while-full-{index}"
                break
            created.append(f"while-full-{index}")
        else:
            raise AssertionError(f"{MOST_WRITES} small writes still fitted on the full disk")
        assert (await harness.verify(org.owner_secret)).valid
        last = await harness.resources.GetResource(
            resource_pb2.GetResourceRequest(kind=INBOX, resource_id=acknowledged[-1]), metadata=owner
        )
        assert last.resource_id == acknowledged[-1]
        listed = await harness.environments.ListEnvironments(
            environment_pb2.ListEnvironmentsRequest(page_size=500), metadata=owner
        )
        slugs = {environment.slug for environment in listed.environments}
        assert refused_slug not in slugs
        assert set(created) <= slugs

        _free_space(small_disk)
        call = harness.resources.RegisterResource(
            resource_pb2.RegisterResourceRequest(kind=INBOX, resource_id="after-space-was-freed"),
            metadata=owner,
        )
        await call
        revision = int(dict(await call.trailing_metadata())["x-agentpost-revision"])

        # Nothing acknowledged is lost, and no refused write left a revision behind.
        registered = await _registered_inboxes(harness, owner)
        assert registered == {*acknowledged, "after-space-was-freed"}
        events = await every_event(event_pb2_grpc.EventServiceStub(harness.channel), owner)
        assert sorted({event.revision for event in events}) == list(range(1, revision + 1))


async def test_writers_sharing_commits_on_a_full_disk_are_refused_whole(small_disk: Path) -> None:
    """The same with sixteen writers at a time, who share commits (tests/test_group_commit.py):
    a commit that finds no space refuses every writer of it as DATABASE_FULL, none of them is
    stored, and every acknowledged write is."""
    backend = Backend("sqlite", f"sqlite+aiosqlite:///{small_disk / 'agentpost.db'}", None)
    async with serving(backend) as harness:
        org = await harness.new_org()
        owner = auth(org.owner_secret)

        async def register(resource_id: str) -> str:
            refusal = await _register_large(harness, owner, resource_id)
            return "OK" if refusal is None else f"{refusal.code.name} {refusal.reason}"

        answers: dict[str, str] = {}
        for batch in range(MOST_WRITES // 16):
            names = [f"inbox-{batch}-{index}-{'x' * 100}" for index in range(16)]
            answers.update(zip(names, await asyncio.gather(*(register(name) for name in names)), strict=True))
            if set(answers.values()) != {"OK"}:
                break
        refused = {name for name, code in answers.items() if code != "OK"}
        assert refused, f"{len(answers)} writes did not fill {SMALL}"
        assert {answers[name] for name in refused} == {"RESOURCE_EXHAUSTED DATABASE_FULL"}
        acknowledged = set(answers) - refused

        _free_space(small_disk)
        assert await register("after-space-was-freed") == "OK"
        registered = await _registered_inboxes(harness, owner)
        assert registered == {*acknowledged, "after-space-was-freed"}
        events = await every_event(event_pb2_grpc.EventServiceStub(harness.channel), owner)
        revisions = sorted({event.revision for event in events})
        assert revisions == list(range(1, revisions[-1] + 1))
