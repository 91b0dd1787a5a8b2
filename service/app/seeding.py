"""`agentpost-environments seed`: fills a database with organizations, environments and keys, to
measure the service at scale (`make bench-large`).

Each organization is created by the CreateOrganization use case (default environment, OWNER
member, owner key, events); its further environments and keys are bulk-loaded in batches
(see service/storage/bulk.py), which keeps a million keys to minutes. Seeded keys are LIVE keys
that no member owns, each scoped to one of its organization's environments in turn, holding
`environments:read`, `inboxes:read` and `inboxes:write`. Run it before the servers start: running
servers do not hear of bulk-loaded rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.app.server import Application
from service.domain import keys
from service.domain.clock import utcnow
from service.domain.models import ApiKey, Environment, KeyMode
from service.storage import bulk

SEEDED_KEY_SCOPES = ("environments:read", "inboxes:read", "inboxes:write")


@dataclass(frozen=True)
class SeedPlan:
    """How much to seed: per organization, environments and keys besides the ones it is created
    with; `sample` secrets of the first organization's seeded keys are kept for the report."""

    organizations: int
    environments: int
    keys: int
    sample: int = 1000
    batch: int = 5000


@dataclass
class _Pending:
    """Rows waiting for the next batch; environments are written before the keys naming them."""

    environments: list[Environment] = field(default_factory=list)
    keys: list[tuple[ApiKey, str]] = field(default_factory=list)


async def seed(app: Application, plan: SeedPlan, progress: Callable[[str], None]) -> dict[str, Any]:
    """Seeds the plan through `app` (migrated, not serving) and returns what a benchmark needs:
    the organizations' ids and owner secrets, and the first one's sample of key secrets and slugs."""
    started = time.perf_counter()
    engine = app.database.engine
    pending = _Pending()
    organizations: list[dict[str, str]] = []
    sample: list[str] = []
    keys_written = 0

    async def flush(everything: bool) -> None:
        nonlocal keys_written
        if pending.environments and (everything or pending.keys or len(pending.environments) >= plan.batch):
            await bulk.insert_environments(engine, pending.environments)
            pending.environments.clear()
        if pending.keys and (everything or len(pending.keys) >= plan.batch):
            await bulk.insert_api_keys(engine, pending.keys)
            keys_written += len(pending.keys)
            pending.keys.clear()
            progress(f"{keys_written:,} keys written ({time.perf_counter() - started:.0f} s)")

    for index in range(plan.organizations):
        created = await app.organizations.create(
            f"Seeded {index}", f"owner-{index}@seed.example", "Owner", request_id=""
        )
        organization_id = created.organization.id
        organizations.append({"id": organization_id, "owner_secret": created.owner_api_key_secret})
        now = utcnow()
        targets = [created.default_environment]
        for number in range(plan.environments):
            env = Environment.new(organization_id, f"Environment {number}", f"env-{number}", "", now)
            targets.append(env)
            pending.environments.append(env)
            if len(pending.environments) >= plan.batch:
                await flush(everything=False)
        for number in range(plan.keys):
            secret = keys.generate(KeyMode.LIVE)
            target = targets[number % len(targets)]
            key = ApiKey.new(
                organization_id,
                f"Seeded key {number}",
                SEEDED_KEY_SCOPES,
                (target.id,),
                None,
                KeyMode.LIVE,
                secret.prefix,
                now,
            )
            pending.keys.append((key, app.hasher.digest(secret.secret)))
            if index == 0 and len(sample) < plan.sample:
                sample.append(secret.secret)
            if len(pending.keys) >= plan.batch:
                await flush(everything=True)
        if (index + 1) % 1000 == 0:
            progress(f"{index + 1:,} organizations created ({time.perf_counter() - started:.0f} s)")
    await flush(everything=True)
    first_slugs = [f"env-{number}" for number in range(min(plan.environments, plan.sample))]
    return {
        "organizations": organizations,
        "environments_per_organization": plan.environments + 1,
        "keys_per_organization": plan.keys + 1,
        "key_secrets": sample,
        "environment_slugs": first_slugs,
        "seconds": round(time.perf_counter() - started, 1),
    }
