"""Who may do what (SPEC §4), as a table: one row per caller and RPC, with the expected outcome.

The caller is an organization-wide key with every scope, owned by a member whose organization role
and role in the target environment the row names. Its reach is therefore every environment for
an OWNER or ADMIN, and only the environments it was added to for a MEMBER. What the table checks:

- organization-level calls (Create/DeleteEnvironment, CreateMember, ListMembers) need an OWNER or
  ADMIN owner: an org MEMBER gets PERMISSION_DENIED ORGANIZATION_KEY_REQUIRED;
- environment-level calls on an environment outside the caller's reach are NOT_FOUND, exactly as
  for an environment that does not exist;
- changing an environment's members or keys needs an org OWNER/ADMIN or the environment's ADMIN:
  an org MEMBER who is only an env MEMBER gets PERMISSION_DENIED ENVIRONMENT_ADMIN_REQUIRED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from agentpost.environments.v1 import api_key_pb2 as key_pb
from agentpost.environments.v1 import environment_pb2 as env_pb
from agentpost.environments.v1 import member_pb2 as pb

from service.domain import scopes
from tests.harness import Harness, Org, auth, fails, mask

Code = grpc.StatusCode
OK = None
ORG_LEVEL_REQUIRED = (Code.PERMISSION_DENIED, "ORGANIZATION_KEY_REQUIRED")
ENV_ADMIN_REQUIRED = (Code.PERMISSION_DENIED, "ENVIRONMENT_ADMIN_REQUIRED")
NOT_FOUND = (Code.NOT_FOUND, "ENVIRONMENT_NOT_FOUND")

# fmt: off
MATRIX: list[tuple[str, str, tuple[grpc.StatusCode, str] | None]] = [
    ("org OWNER, env ADMIN",   "CreateEnvironment",       OK),
    ("org OWNER, env ADMIN",   "GetEnvironment",          OK),
    ("org OWNER, env ADMIN",   "UpdateEnvironment",       OK),
    ("org OWNER, env ADMIN",   "DeleteEnvironment",       OK),
    ("org OWNER, env ADMIN",   "CreateMember",            OK),
    ("org OWNER, env ADMIN",   "ListMembers",             OK),
    ("org OWNER, env ADMIN",   "AddEnvironmentMember",    OK),
    ("org OWNER, env ADMIN",   "RemoveEnvironmentMember", OK),
    ("org OWNER, env ADMIN",   "ListEnvironmentMembers",  OK),
    ("org OWNER, env ADMIN",   "CreateApiKey",            OK),
    ("org OWNER, env ADMIN",   "ListApiKeys",             OK),

    ("org OWNER, env MEMBER",  "CreateEnvironment",       OK),
    ("org OWNER, env MEMBER",  "GetEnvironment",          OK),
    ("org OWNER, env MEMBER",  "UpdateEnvironment",       OK),
    ("org OWNER, env MEMBER",  "DeleteEnvironment",       OK),
    ("org OWNER, env MEMBER",  "CreateMember",            OK),
    ("org OWNER, env MEMBER",  "ListMembers",             OK),
    ("org OWNER, env MEMBER",  "AddEnvironmentMember",    OK),
    ("org OWNER, env MEMBER",  "RemoveEnvironmentMember", OK),
    ("org OWNER, env MEMBER",  "ListEnvironmentMembers",  OK),
    ("org OWNER, env MEMBER",  "CreateApiKey",            OK),
    ("org OWNER, env MEMBER",  "ListApiKeys",             OK),

    ("org OWNER, env none",    "CreateEnvironment",       OK),
    ("org OWNER, env none",    "GetEnvironment",          OK),
    ("org OWNER, env none",    "UpdateEnvironment",       OK),
    ("org OWNER, env none",    "DeleteEnvironment",       OK),
    ("org OWNER, env none",    "CreateMember",            OK),
    ("org OWNER, env none",    "ListMembers",             OK),
    ("org OWNER, env none",    "AddEnvironmentMember",    OK),
    ("org OWNER, env none",    "RemoveEnvironmentMember", OK),
    ("org OWNER, env none",    "ListEnvironmentMembers",  OK),
    ("org OWNER, env none",    "CreateApiKey",            OK),
    ("org OWNER, env none",    "ListApiKeys",             OK),

    ("org ADMIN, env ADMIN",   "CreateEnvironment",       OK),
    ("org ADMIN, env ADMIN",   "GetEnvironment",          OK),
    ("org ADMIN, env ADMIN",   "UpdateEnvironment",       OK),
    ("org ADMIN, env ADMIN",   "DeleteEnvironment",       OK),
    ("org ADMIN, env ADMIN",   "CreateMember",            OK),
    ("org ADMIN, env ADMIN",   "ListMembers",             OK),
    ("org ADMIN, env ADMIN",   "AddEnvironmentMember",    OK),
    ("org ADMIN, env ADMIN",   "RemoveEnvironmentMember", OK),
    ("org ADMIN, env ADMIN",   "ListEnvironmentMembers",  OK),
    ("org ADMIN, env ADMIN",   "CreateApiKey",            OK),
    ("org ADMIN, env ADMIN",   "ListApiKeys",             OK),

    ("org ADMIN, env MEMBER",  "CreateEnvironment",       OK),
    ("org ADMIN, env MEMBER",  "GetEnvironment",          OK),
    ("org ADMIN, env MEMBER",  "UpdateEnvironment",       OK),
    ("org ADMIN, env MEMBER",  "DeleteEnvironment",       OK),
    ("org ADMIN, env MEMBER",  "CreateMember",            OK),
    ("org ADMIN, env MEMBER",  "ListMembers",             OK),
    ("org ADMIN, env MEMBER",  "AddEnvironmentMember",    OK),
    ("org ADMIN, env MEMBER",  "RemoveEnvironmentMember", OK),
    ("org ADMIN, env MEMBER",  "ListEnvironmentMembers",  OK),
    ("org ADMIN, env MEMBER",  "CreateApiKey",            OK),
    ("org ADMIN, env MEMBER",  "ListApiKeys",             OK),

    ("org ADMIN, env none",    "CreateEnvironment",       OK),
    ("org ADMIN, env none",    "GetEnvironment",          OK),
    ("org ADMIN, env none",    "UpdateEnvironment",       OK),
    ("org ADMIN, env none",    "DeleteEnvironment",       OK),
    ("org ADMIN, env none",    "CreateMember",            OK),
    ("org ADMIN, env none",    "ListMembers",             OK),
    ("org ADMIN, env none",    "AddEnvironmentMember",    OK),
    ("org ADMIN, env none",    "RemoveEnvironmentMember", OK),
    ("org ADMIN, env none",    "ListEnvironmentMembers",  OK),
    ("org ADMIN, env none",    "CreateApiKey",            OK),
    ("org ADMIN, env none",    "ListApiKeys",             OK),

    ("org MEMBER, env ADMIN",  "CreateEnvironment",       ORG_LEVEL_REQUIRED),
    ("org MEMBER, env ADMIN",  "GetEnvironment",          OK),
    ("org MEMBER, env ADMIN",  "UpdateEnvironment",       OK),
    ("org MEMBER, env ADMIN",  "DeleteEnvironment",       ORG_LEVEL_REQUIRED),
    ("org MEMBER, env ADMIN",  "CreateMember",            ORG_LEVEL_REQUIRED),
    ("org MEMBER, env ADMIN",  "ListMembers",             ORG_LEVEL_REQUIRED),
    ("org MEMBER, env ADMIN",  "AddEnvironmentMember",    OK),
    ("org MEMBER, env ADMIN",  "RemoveEnvironmentMember", OK),
    ("org MEMBER, env ADMIN",  "ListEnvironmentMembers",  OK),
    ("org MEMBER, env ADMIN",  "CreateApiKey",            OK),
    ("org MEMBER, env ADMIN",  "ListApiKeys",             OK),

    ("org MEMBER, env MEMBER", "CreateEnvironment",       ORG_LEVEL_REQUIRED),
    ("org MEMBER, env MEMBER", "GetEnvironment",          OK),
    ("org MEMBER, env MEMBER", "UpdateEnvironment",       OK),
    ("org MEMBER, env MEMBER", "DeleteEnvironment",       ORG_LEVEL_REQUIRED),
    ("org MEMBER, env MEMBER", "CreateMember",            ORG_LEVEL_REQUIRED),
    ("org MEMBER, env MEMBER", "ListMembers",             ORG_LEVEL_REQUIRED),
    ("org MEMBER, env MEMBER", "AddEnvironmentMember",    ENV_ADMIN_REQUIRED),
    ("org MEMBER, env MEMBER", "RemoveEnvironmentMember", ENV_ADMIN_REQUIRED),
    ("org MEMBER, env MEMBER", "ListEnvironmentMembers",  OK),
    ("org MEMBER, env MEMBER", "CreateApiKey",            ENV_ADMIN_REQUIRED),
    ("org MEMBER, env MEMBER", "ListApiKeys",             OK),

    ("org MEMBER, env none",   "CreateEnvironment",       ORG_LEVEL_REQUIRED),
    ("org MEMBER, env none",   "GetEnvironment",          NOT_FOUND),
    ("org MEMBER, env none",   "UpdateEnvironment",       NOT_FOUND),
    ("org MEMBER, env none",   "DeleteEnvironment",       ORG_LEVEL_REQUIRED),
    ("org MEMBER, env none",   "CreateMember",            ORG_LEVEL_REQUIRED),
    ("org MEMBER, env none",   "ListMembers",             ORG_LEVEL_REQUIRED),
    ("org MEMBER, env none",   "AddEnvironmentMember",    NOT_FOUND),
    ("org MEMBER, env none",   "RemoveEnvironmentMember", NOT_FOUND),
    ("org MEMBER, env none",   "ListEnvironmentMembers",  NOT_FOUND),
    ("org MEMBER, env none",   "CreateApiKey",            NOT_FOUND),
    ("org MEMBER, env none",   "ListApiKeys",             NOT_FOUND),
]
# fmt: on


@dataclass(frozen=True)
class Scene:
    """One organization set up for a caller: its key, the target environment (and a second one to
    delete, with the same roles), and two bystander members: `leaving` in the target, and
    `newcomer` in no environment at all, so no caller below organization level can see it: an
    environment's ADMIN still adds it by id."""

    harness: Harness
    org: Org
    caller: str
    target: str
    doomed: str
    newcomer: str
    leaving: str


async def build_scene(harness: Harness, who: str) -> Scene:
    """An organization where the caller's member has the roles `who` names."""
    org_part, env_part = (part.split()[1] for part in who.split(", "))
    org = await harness.new_org()
    target = await harness.new_environment(org, "Target")
    doomed = await harness.new_environment(org, "Doomed")
    side = await harness.new_environment(org, "Side")
    member = await harness.new_member(org, org_part)
    newcomer = await harness.new_member(org, "MEMBER")
    leaving = await harness.new_member(org, "MEMBER")
    grants = [(target.id, leaving.id, "MEMBER")]
    if env_part != "none":
        grants += [(env_id, member.id, env_part) for env_id in (target.id, doomed.id, side.id)]
    for env_id, member_id, role in grants:
        await harness.add_environment_member(org.owner_secret, env_id, member_id, role)
    _, caller = await harness.new_key(org, list(scopes.ALL_SCOPES), owner_member_id=member.id)
    return Scene(harness, org, caller, target.id, doomed.id, newcomer.id, leaving.id)


def call(scene: Scene, rpc: str) -> Awaitable[Any]:
    """The row's RPC, made by the scene's caller against the target environment."""
    h, metadata = scene.harness, auth(scene.caller)
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "CreateEnvironment": lambda: h.environments.CreateEnvironment(
            env_pb.CreateEnvironmentRequest(name="Brand New"), metadata=metadata
        ),
        "GetEnvironment": lambda: h.environments.GetEnvironment(
            env_pb.GetEnvironmentRequest(id=scene.target), metadata=metadata
        ),
        "UpdateEnvironment": lambda: h.environments.UpdateEnvironment(
            env_pb.UpdateEnvironmentRequest(
                environment=env_pb.Environment(id=scene.target, name="Renamed"),
                update_mask=mask("name"),
            ),
            metadata=metadata,
        ),
        "DeleteEnvironment": lambda: h.environments.DeleteEnvironment(
            env_pb.DeleteEnvironmentRequest(id=scene.doomed), metadata=metadata
        ),
        "CreateMember": lambda: h.members.CreateMember(
            pb.CreateMemberRequest(email="new@example.com", role=pb.Member.MEMBER), metadata=metadata
        ),
        "ListMembers": lambda: h.members.ListMembers(pb.ListMembersRequest(), metadata=metadata),
        "AddEnvironmentMember": lambda: h.members.AddEnvironmentMember(
            pb.AddEnvironmentMemberRequest(
                environment_id=scene.target, member_id=scene.newcomer, role=pb.EnvironmentMember.MEMBER
            ),
            metadata=metadata,
        ),
        "RemoveEnvironmentMember": lambda: h.members.RemoveEnvironmentMember(
            pb.RemoveEnvironmentMemberRequest(environment_id=scene.target, member_id=scene.leaving),
            metadata=metadata,
        ),
        "ListEnvironmentMembers": lambda: h.members.ListEnvironmentMembers(
            pb.ListEnvironmentMembersRequest(environment_id=scene.target), metadata=metadata
        ),
        "CreateApiKey": lambda: h.api_keys.CreateApiKey(
            key_pb.CreateApiKeyRequest(
                name="made in the matrix", scopes=["environments:read"], environment_ids=[scene.target]
            ),
            metadata=metadata,
        ),
        "ListApiKeys": lambda: h.api_keys.ListApiKeys(
            key_pb.ListApiKeysRequest(environment_id=scene.target), metadata=metadata
        ),
    }
    return calls[rpc]()


_scenes: dict[tuple[int, str], Scene] = {}


async def scene_for(harness: Harness, who: str) -> Scene:
    """One scene per caller and server, shared by that caller's rows: each row's RPC touches its
    own objects (a new environment, `doomed`, `newcomer`, `leaving`, a new key), so no row's
    outcome depends on another's having run."""
    key = (id(harness), who)
    if key not in _scenes:
        _scenes[key] = await build_scene(harness, who)
    return _scenes[key]


@pytest.mark.parametrize(("who", "rpc", "expected"), MATRIX, ids=[f"{who} | {rpc}" for who, rpc, _ in MATRIX])
async def test_access_matrix(
    harness: Harness, who: str, rpc: str, expected: tuple[grpc.StatusCode, str] | None
) -> None:
    scene = await scene_for(harness, who)
    if expected is OK:
        await call(scene, rpc)
    else:
        code, reason = expected
        await fails(call(scene, rpc), code, reason)


async def test_matrix_covers_every_role_and_rpc() -> None:
    callers = {who for who, _, _ in MATRIX}
    rpcs = {rpc for _, rpc, _ in MATRIX}
    assert len(callers) == 9 and len(rpcs) == 11
    assert len(MATRIX) == len({(who, rpc) for who, rpc, _ in MATRIX}) == 9 * 11


async def test_out_of_reach_looks_like_nonexistent(harness: Harness) -> None:
    scene = await build_scene(harness, "org MEMBER, env none")
    random_env = "env_01J0000000000000000000000A"
    for environment_id in (scene.target, random_env):
        failure = await fails(
            scene.harness.members.ListEnvironmentMembers(
                pb.ListEnvironmentMembersRequest(environment_id=environment_id), metadata=auth(scene.caller)
            ),
            *NOT_FOUND,
        )
        assert failure.message == f"environment {environment_id!r} not found"
