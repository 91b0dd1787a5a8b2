"""`agentpost-environments seed` loads organizations, environments and keys that a server then
serves like any others."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from agentpost.environments.v1 import environment_pb2

from tests.harness import auth
from tests.own_database import own_database
from tests.servers import PROJECT_ROOT, Backend, serving


async def test_seeded_keys_verify_and_seeded_environments_list(backend: Backend, tmp_path: Path) -> None:
    database = own_database(backend, tmp_path)
    output = tmp_path / "seeded.json"
    command = [sys.executable, "-m", "service", "seed", "--database-url", database.url]
    command += ["--organizations", "2", "--environments", "4", "--keys", "6", "--sample", "3"]
    command += ["--output", str(output)]
    if database.schema is not None:
        command += ["--database-schema", database.schema]
    process = await asyncio.create_subprocess_exec(*command, cwd=PROJECT_ROOT, stderr=asyncio.subprocess.PIPE)
    _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert output.stat().st_mode & 0o077 == 0, "the file holds owner secrets"
    seeded = json.loads(output.read_text())
    assert len(seeded["organizations"]) == 2 and len(seeded["key_secrets"]) == 3

    async with serving(database) as harness:
        for organization in seeded["organizations"]:
            listed = await harness.environments.ListEnvironments(
                environment_pb2.ListEnvironmentsRequest(), metadata=auth(organization["owner_secret"])
            )
            slugs = sorted(env.slug for env in listed.environments)
            assert slugs == ["default", "env-0", "env-1", "env-2", "env-3"]
        first = seeded["organizations"][0]["id"]
        for secret in seeded["key_secrets"]:
            answer = await harness.verify(secret, "", "inboxes:read")
            assert answer.valid and answer.principal.organization_id == first
            assert not answer.principal.organization_wide
            assert len(answer.principal.allowed_environment_ids) == 1
