"""A stateful property test of isolation: random sequences of every mutating RPC over real gRPC,
checked after every step against a model of who may see what.

The model holds two organizations with their environments, members, keys and registered
resources. After each step, every key asks for the resources of every environment of both
organizations (and of its default context), and every organization's owner lists the orphans of
each of its environments; the answers must be exactly what the model predicts: the resources of
that environment the key may read, or the exact refusal. Nothing of another environment or
organization may ever appear. The model also keeps the event log every step must have written,
and every key lists the events it may see (ListEvents): exactly those of resources it may read
now, with a reassignment shown only from the side the key reaches.

Hypothesis is synchronous and the server runs on the test's event loop, so the machine runs in a
worker thread with a blocking channel. AGENTPOST_ISOLATION_EXAMPLES and AGENTPOST_ISOLATION_STEPS
size the run (make test-deep runs 400 x 30).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from agentpost.environments.v1 import (
    api_key_pb2,
    api_key_pb2_grpc,
    environment_pb2,
    environment_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    member_pb2,
    member_pb2_grpc,
    organization_pb2,
    organization_pb2_grpc,
    resource_pb2,
    resource_pb2_grpc,
)
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.harness import OPERATOR_TOKEN, Harness, auth

EXAMPLES = int(os.environ.get("AGENTPOST_ISOLATION_EXAMPLES", "10"))
STEPS = int(os.environ.get("AGENTPOST_ISOLATION_STEPS", "25"))

INBOX, MESSAGE = resource_pb2.ScopedResource.INBOX, resource_pb2.ScopedResource.MESSAGE
KINDS = {INBOX: "inboxes", MESSAGE: "messages"}
RESOURCE_SCOPES = sorted(f"{area}:{access}" for area in KINDS.values() for access in ("read", "write"))
# Scopes that decide which events a key may list (drawn alongside the resource scopes).
EVENT_SCOPES = ["events:read", "environments:read", "members:read", "api_keys:read"]
RESOURCE_IDS = ["r1", "r2", "r3", "r4"]
SLUGS = ["alpha", "beta", "gamma", "default-2"]
MAX_KEYS = 6  # per organization, dead ones included
MAX_MEMBERS = 3

Outcome = tuple[str, Any]  # ("ok", response) or (status code name, ErrorInfo reason)
Ref = tuple[resource_pb2.ScopedResource.Kind, str]


def call(method: Callable[..., Any], request: Any, metadata: Any) -> Outcome:
    """The response, or the refusal's code and reason."""
    try:
        return "ok", method(request, metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        return error_outcome(error)


def error_outcome(error: Any) -> Outcome:
    """The code name and ErrorInfo reason of a failed call."""
    reason = ""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
    return error.code().name, reason


def resolved(future: Any) -> Outcome:
    """The outcome of a call started with `.future()`."""
    try:
        return "ok", future.result()
    except grpc.RpcError as error:
        return error_outcome(error)


@dataclass(frozen=True)
class LoggedEvent:
    """An event the model expects in the log: what a step changed, and where."""

    action: str
    resource_type: str
    resource_id: str
    environment_id: str = ""
    previous_environment_id: str = ""  # REASSIGNED: the environment the resource left
    kind: int = 0  # SCOPED_RESOURCE
    key_env_ids: frozenset[str] = frozenset()  # API_KEY: the key's environments after the change


def resource_event(action: str, ref: Ref, env_id: str, previous: str = "") -> LoggedEvent:
    """The event of a registered resource."""
    kind, resource_id = ref
    name = resource_pb2.ScopedResource.Kind.Name(kind)
    return LoggedEvent(action, "SCOPED_RESOURCE", f"{name}:{resource_id}", env_id, previous, kind)


def key_event(action: str, key_id: str, env_ids: frozenset[str]) -> LoggedEvent:
    """The event of an API key (it names its environment only when it has exactly one)."""
    only = next(iter(env_ids)) if len(env_ids) == 1 else ""
    return LoggedEvent(action, "API_KEY", key_id, only, key_env_ids=env_ids)


EventSummary = tuple[str, str, str, str, str]


@dataclass
class Env:
    id: str
    slug: str
    default: bool = False
    deleted: bool = False


@dataclass
class Key:
    id: str
    secret: str
    scopes: frozenset[str]
    env_ids: frozenset[str]  # empty: organization-wide
    owner: str | None  # a MEMBER/ADMIN member; None for unowned keys and the OWNER's own key
    revoked: bool = False
    expired: bool = False
    is_owner_key: bool = False


@dataclass
class Member:
    id: str
    admin: bool = False
    env_ids: set[str] = field(default_factory=set)


@dataclass
class OrgModel:
    id: str
    owner_secret: str
    envs: dict[str, Env]
    keys: list[Key]
    members: dict[str, Member] = field(default_factory=dict)
    removed_members: set[str] = field(default_factory=set)
    resources: dict[Ref, str] = field(default_factory=dict)  # -> environment id
    log: list[LoggedEvent] = field(default_factory=list)

    def find(self, reference: str) -> Env | None:
        """An environment by id or slug, as the server resolves the context header."""
        return self.envs.get(reference) or next((e for e in self.envs.values() if e.slug == reference), None)

    def denial(self, key: Key) -> str | None:
        """Why the key cannot authenticate, as an ErrorInfo reason."""
        if key.revoked:
            return "API_KEY_REVOKED"
        if key.expired:
            return "API_KEY_EXPIRED"
        if key.owner is not None and key.owner not in self.members:
            return "API_KEY_OWNER_REMOVED"
        return None

    def reach(self, key: Key) -> set[str]:
        """The key's environments (all when organization-wide) within its owner's, deleted included."""
        reach = set(self.envs) if not key.env_ids else set(key.env_ids)
        if key.owner is not None:
            owner = self.members[key.owner]
            if not owner.admin:
                reach &= owner.env_ids
        return reach

    def context(self, key: Key, reference: str | None) -> Env | Outcome:
        """The environment a call acts in, or the refusal."""
        reach = self.reach(key)
        if reference is not None:
            env = self.find(reference)
            if env is None:
                return "NOT_FOUND", "ENVIRONMENT_NOT_FOUND"
        elif len(key.env_ids) == 1:
            env = self.envs[next(iter(key.env_ids))]
        else:
            env = next(e for e in self.envs.values() if e.default)
            if env.id not in reach or env.deleted:
                return "FAILED_PRECONDITION", "ENVIRONMENT_REQUIRED"
        if env.id not in reach:
            return "NOT_FOUND", "ENVIRONMENT_NOT_FOUND"
        if env.deleted:
            return "FAILED_PRECONDITION", "ENVIRONMENT_DELETED"
        return env

    def expected_list(self, key: Key, reference: str | None) -> Outcome:
        """What ListResources (every kind) must answer."""
        denial = self.denial(key)
        if denial is not None:
            return "UNAUTHENTICATED", denial
        env = self.context(key, reference)
        if not isinstance(env, Env):
            return env
        readable = [kind for kind, area in KINDS.items() if f"{area}:read" in key.scopes]
        if not readable:
            return "PERMISSION_DENIED", "SCOPE_MISSING"
        found = [ref for ref, env_id in self.resources.items() if env_id == env.id and ref[0] in readable]
        return "ok", sorted(found, key=lambda ref: (resource_pb2.ScopedResource.Kind.Name(ref[0]), ref[1]))

    def organization_level(self, key: Key) -> bool:
        """An organization-wide key whose owner, if any, is an ADMIN (or no member owns it)."""
        return not key.env_ids and (key.owner is None or self.members[key.owner].admin)

    def reads_resources_of(self, key: Key, env_id: str) -> bool:
        """Whether the key may read the environment's registered resources now: an active
        environment within reach; a deleted one only as an organization-level key with
        environments:read (the orphans' reader). Deleting an environment hides its resources."""
        env = self.envs.get(env_id)
        if env is None or env_id not in self.reach(key):
            return False
        if not env.deleted:
            return True
        return self.organization_level(key) and "environments:read" in key.scopes

    def shown(self, key: Key, event: LoggedEvent) -> EventSummary | None:
        """The event as the key may see it now: (action, type, resource id, environment, the
        registered resource's environment), or None."""
        reach = self.reach(key)
        level = self.organization_level(key)
        kind = event.resource_type
        as_is = (event.action, kind, event.resource_id, event.environment_id, "")
        if kind == "ORGANIZATION":
            return as_is if level else None
        if kind == "MEMBER":
            return as_is if level and "members:read" in key.scopes else None
        if kind == "ENVIRONMENT":
            return as_is if "environments:read" in key.scopes and event.environment_id in reach else None
        if kind == "ENVIRONMENT_MEMBER":
            return as_is if "members:read" in key.scopes and event.environment_id in reach else None
        if kind == "API_KEY":
            within = level or (bool(event.key_env_ids) and event.key_env_ids <= reach)
            return as_is if "api_keys:read" in key.scopes and within else None
        if f"{KINDS[cast(Any, event.kind)]}:read" not in key.scopes:
            return None
        if self.reads_resources_of(key, event.environment_id):
            return (*as_is[:4], event.environment_id)
        if self.reads_resources_of(key, event.previous_environment_id):
            return (event.action, kind, event.resource_id, event.previous_environment_id, "")
        return None

    def expected_events(self, key: Key) -> Outcome:
        """What ListEvents must answer the key: the events it may see (compared sorted), or the
        refusal."""
        denial = self.denial(key)
        if denial is not None:
            return "UNAUTHENTICATED", denial
        if "events:read" not in key.scopes:
            return "PERMISSION_DENIED", "SCOPE_MISSING"
        shown = [self.shown(key, event) for event in self.log]
        return "ok", sorted(event for event in shown if event is not None)

    def expected_single(
        self, key: Key, reference: str | None, kind: resource_pb2.ScopedResource.Kind, access: str
    ) -> Env | Outcome:
        """The context of a call on one resource of `kind`, or its refusal (scope before context)."""
        denial = self.denial(key)
        if denial is not None:
            return "UNAUTHENTICATED", denial
        if f"{KINDS[kind]}:{access}" not in key.scopes:
            return "PERMISSION_DENIED", "SCOPE_MISSING"
        return self.context(key, reference)


def event_summary(outcome: Outcome) -> Outcome:
    """A ListEvents answer as the model's summaries, sorted; or the refusal."""
    if outcome[0] != "ok":
        return outcome
    assert not outcome[1].next_page_token, "the model's logs fit one page"
    return "ok", sorted(
        (
            event_pb2.Event.Action.Name(event.action),
            event_pb2.Event.ResourceType.Name(event.resource_type),
            event.resource_id,
            event.environment_id,
            event.scoped_resource.environment_id,
        )
        for event in outcome[1].events
    )


def summary(outcome: Outcome) -> Outcome:
    """What matters of an outcome: a ListResources page as (kind, resource_id) pairs in the
    order returned, a resource as (organization, environment), or the refusal."""
    if outcome[0] != "ok":
        return outcome
    response = outcome[1]
    if isinstance(response, resource_pb2.ListResourcesResponse):
        return "ok", [(item.kind, item.resource_id) for item in response.resources]
    return "ok", (response.organization_id, response.environment_id)


class IsolationMachine(RuleBasedStateMachine):
    """Random mutations of two organizations; after each, every key sees exactly the model."""

    address = ""
    steps_run = 0

    def __init__(self) -> None:
        super().__init__()
        channel = grpc.insecure_channel(self.address)
        self.channel = channel
        self.orgs_stub = organization_pb2_grpc.OrganizationServiceStub(channel)
        self.envs_stub = environment_pb2_grpc.EnvironmentServiceStub(channel)
        self.members_stub = member_pb2_grpc.MembershipServiceStub(channel)
        self.keys_stub = api_key_pb2_grpc.ApiKeyServiceStub(channel)
        self.resources_stub = resource_pb2_grpc.ResourceServiceStub(channel)
        self.events_stub = event_pb2_grpc.EventServiceStub(channel)
        self.orgs: list[OrgModel] = []

    def teardown(self) -> None:
        self.channel.close()

    def _step(self) -> None:
        type(self).steps_run += 1

    # -- setup ------------------------------------------------------------------------------

    @initialize()
    def two_organizations(self) -> None:
        for index in range(2):
            response = self.orgs_stub.CreateOrganization(
                organization_pb2.CreateOrganizationRequest(
                    name=f"Org {index}", owner_email=f"owner-{uuid.uuid4().hex[:10]}@example.com"
                ),
                metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),),
            )
            default = response.default_environment
            owner_key = Key(
                id=response.owner_api_key.id,
                secret=response.owner_api_key_secret,
                scopes=frozenset(response.owner_api_key.scopes),
                env_ids=frozenset(),
                owner=None,
                is_owner_key=True,
            )
            second = self.envs_stub.CreateEnvironment(
                environment_pb2.CreateEnvironmentRequest(name="First", slug="first"),
                metadata=auth(response.owner_api_key_secret),
            )
            # Both organizations start with the same resource ids, in both of their environments.
            seeded: dict[Ref, str] = {(INBOX, "r1"): default.id, (MESSAGE, "r2"): second.id}
            for (kind, resource_id), env_id in seeded.items():
                self.resources_stub.RegisterResource(
                    resource_pb2.RegisterResourceRequest(kind=kind, resource_id=resource_id),
                    metadata=auth(response.owner_api_key_secret, env_id),
                )
            log = [
                LoggedEvent("CREATED", "ORGANIZATION", response.organization.id),
                LoggedEvent("CREATED", "ENVIRONMENT", default.id, default.id),
                LoggedEvent("CREATED", "MEMBER", response.owner.id),
                key_event("CREATED", owner_key.id, frozenset()),
                LoggedEvent("CREATED", "ENVIRONMENT", second.id, second.id),
                *(resource_event("REGISTERED", ref, env_id) for ref, env_id in seeded.items()),
            ]
            self.orgs.append(
                OrgModel(
                    id=response.organization.id,
                    owner_secret=response.owner_api_key_secret,
                    envs={
                        default.id: Env(default.id, default.slug, default=True),
                        second.id: Env(second.id, "first"),
                    },
                    keys=[owner_key],
                    resources=dict(seeded),
                    log=log,
                )
            )

    # -- environments -----------------------------------------------------------------------

    @rule(data=st.data(), slug=st.sampled_from(SLUGS))
    def create_environment(self, data: st.DataObject, slug: str) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        outcome = call(
            self.envs_stub.CreateEnvironment,
            environment_pb2.CreateEnvironmentRequest(name=slug.title(), slug=slug),
            auth(org.owner_secret),
        )
        if any(env.slug == slug for env in org.envs.values()):
            assert outcome == ("ALREADY_EXISTS", "SLUG_TAKEN"), outcome
            return
        assert outcome[0] == "ok", outcome
        org.envs[outcome[1].id] = Env(outcome[1].id, slug)
        org.log.append(LoggedEvent("CREATED", "ENVIRONMENT", outcome[1].id, outcome[1].id))

    @rule(data=st.data())
    def delete_environment(self, data: st.DataObject) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        env = data.draw(st.sampled_from(sorted(org.envs.values(), key=lambda e: e.id)))
        outcome = call(
            self.envs_stub.DeleteEnvironment,
            environment_pb2.DeleteEnvironmentRequest(id=env.id),
            auth(org.owner_secret),
        )
        if env.default:
            assert outcome == ("FAILED_PRECONDITION", "DEFAULT_ENVIRONMENT_PROTECTED"), outcome
            return
        assert outcome[0] == "ok" and outcome[1].state == environment_pb2.Environment.DELETED, outcome
        if not env.deleted:  # deleting a deleted environment changes nothing
            org.log.append(LoggedEvent("DELETED", "ENVIRONMENT", env.id, env.id))
        env.deleted = True

    @rule(data=st.data())
    def undelete_environment(self, data: st.DataObject) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        env = data.draw(st.sampled_from(sorted(org.envs.values(), key=lambda e: e.id)))
        outcome = call(
            self.envs_stub.UndeleteEnvironment,
            environment_pb2.UndeleteEnvironmentRequest(id=env.id),
            auth(org.owner_secret),
        )
        if not env.deleted:
            assert outcome[0] == "ALREADY_EXISTS", outcome
            return
        assert outcome[0] == "ok", outcome
        env.deleted = False
        org.log.append(LoggedEvent("UNDELETED", "ENVIRONMENT", env.id, env.id))

    # -- members ----------------------------------------------------------------------------

    @rule(data=st.data())
    def create_member(self, data: st.DataObject) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        if len(org.members) >= MAX_MEMBERS:
            return
        outcome = call(
            self.members_stub.CreateMember,
            member_pb2.CreateMemberRequest(
                email=f"m-{uuid.uuid4().hex[:10]}@example.com", role=member_pb2.Member.MEMBER
            ),
            auth(org.owner_secret),
        )
        assert outcome[0] == "ok", outcome
        org.members[outcome[1].id] = Member(outcome[1].id)
        org.log.append(LoggedEvent("CREATED", "MEMBER", outcome[1].id))

    @rule(data=st.data(), admin=st.booleans())
    def change_member_role(self, data: st.DataObject, admin: bool) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        if not org.members:
            return
        member = org.members[data.draw(st.sampled_from(sorted(org.members)))]
        outcome = call(
            self.members_stub.UpdateMember,
            member_pb2.UpdateMemberRequest(
                member=member_pb2.Member(
                    id=member.id, role=member_pb2.Member.ADMIN if admin else member_pb2.Member.MEMBER
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            ),
            auth(org.owner_secret),
        )
        assert outcome[0] == "ok", outcome
        if member.admin != admin:  # the role it already has changes nothing and logs nothing
            org.log.append(LoggedEvent("UPDATED", "MEMBER", member.id))
        member.admin = admin

    @rule(data=st.data())
    def delete_member(self, data: st.DataObject) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        if not org.members:
            return
        member_id = data.draw(st.sampled_from(sorted(org.members)))
        outcome = call(
            self.members_stub.DeleteMember,
            member_pb2.DeleteMemberRequest(id=member_id),
            auth(org.owner_secret),
        )
        assert outcome[0] == "ok", outcome
        for env_id in org.members[member_id].env_ids:
            org.log.append(LoggedEvent("REMOVED", "ENVIRONMENT_MEMBER", f"{env_id}/{member_id}", env_id))
        org.log.append(LoggedEvent("DELETED", "MEMBER", member_id))
        del org.members[member_id]
        org.removed_members.add(member_id)

    @rule(data=st.data())
    def add_environment_member(self, data: st.DataObject) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        active = sorted(env.id for env in org.envs.values() if not env.deleted)
        if not org.members:
            return
        member = org.members[data.draw(st.sampled_from(sorted(org.members)))]
        env_id = data.draw(st.sampled_from(active))
        outcome = call(
            self.members_stub.AddEnvironmentMember,
            member_pb2.AddEnvironmentMemberRequest(
                environment_id=env_id, member_id=member.id, role=member_pb2.EnvironmentMember.MEMBER
            ),
            auth(org.owner_secret),
        )
        if env_id in member.env_ids:
            assert outcome == ("ALREADY_EXISTS", "ENVIRONMENT_MEMBER_EXISTS"), outcome
            return
        assert outcome[0] == "ok", outcome
        member.env_ids.add(env_id)
        org.log.append(LoggedEvent("ADDED", "ENVIRONMENT_MEMBER", f"{env_id}/{member.id}", env_id))

    @rule(data=st.data())
    def remove_environment_member(self, data: st.DataObject) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        pairs = sorted(
            (member.id, env_id)
            for member in org.members.values()
            for env_id in member.env_ids
            if not org.envs[env_id].deleted
        )
        if not pairs:
            return
        member_id, env_id = data.draw(st.sampled_from(pairs))
        outcome = call(
            self.members_stub.RemoveEnvironmentMember,
            member_pb2.RemoveEnvironmentMemberRequest(environment_id=env_id, member_id=member_id),
            auth(org.owner_secret),
        )
        assert outcome[0] == "ok", outcome
        org.members[member_id].env_ids.discard(env_id)
        org.log.append(LoggedEvent("REMOVED", "ENVIRONMENT_MEMBER", f"{env_id}/{member_id}", env_id))

    # -- keys -------------------------------------------------------------------------------

    def _draw_access(self, data: st.DataObject, org: OrgModel) -> tuple[list[str], list[str]]:
        active = sorted(env.id for env in org.envs.values() if not env.deleted)
        scopes = data.draw(st.lists(st.sampled_from(RESOURCE_SCOPES), min_size=1, max_size=4, unique=True))
        scopes += data.draw(st.lists(st.sampled_from(EVENT_SCOPES), max_size=4, unique=True))
        env_ids = data.draw(st.lists(st.sampled_from(active), max_size=2, unique=True))
        return scopes, env_ids

    @rule(data=st.data(), member_owned=st.booleans())
    def create_key(self, data: st.DataObject, member_owned: bool) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        if len(org.keys) >= MAX_KEYS:
            return
        scopes, env_ids = self._draw_access(data, org)
        owner = data.draw(st.sampled_from(sorted(org.members))) if member_owned and org.members else None
        outcome = call(
            self.keys_stub.CreateApiKey,
            api_key_pb2.CreateApiKeyRequest(
                name="k", scopes=scopes, environment_ids=env_ids, owner_member_id=owner or ""
            ),
            auth(org.owner_secret),
        )
        assert outcome[0] == "ok", outcome
        org.keys.append(
            Key(outcome[1].api_key.id, outcome[1].secret, frozenset(scopes), frozenset(env_ids), owner)
        )
        org.log.append(key_event("CREATED", outcome[1].api_key.id, frozenset(env_ids)))

    def _draw_other_key(self, data: st.DataObject, org: OrgModel) -> Key | None:
        keys = [key for key in org.keys if not key.is_owner_key and org.denial(key) is None]
        return data.draw(st.sampled_from(keys)) if keys else None

    @rule(data=st.data())
    def update_key_access(self, data: st.DataObject) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        key = self._draw_other_key(data, org)
        if key is None:
            return
        scopes, env_ids = self._draw_access(data, org)
        outcome = call(
            self.keys_stub.UpdateApiKey,
            api_key_pb2.UpdateApiKeyRequest(
                api_key=api_key_pb2.ApiKey(id=key.id, scopes=scopes, environment_ids=env_ids),
                update_mask=field_mask_pb2.FieldMask(paths=["scopes", "environment_ids"]),
            ),
            auth(org.owner_secret),
        )
        assert outcome[0] == "ok", outcome
        # The access it already has (in any order) changes nothing and logs nothing.
        if (frozenset(scopes), frozenset(env_ids)) != (key.scopes, key.env_ids):
            key.scopes, key.env_ids = frozenset(scopes), frozenset(env_ids)
            org.log.append(key_event("UPDATED", key.id, key.env_ids))

    @rule(data=st.data())
    def revoke_key(self, data: st.DataObject) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        key = self._draw_other_key(data, org)
        if key is None:
            return
        outcome = call(
            self.keys_stub.RevokeApiKey, api_key_pb2.RevokeApiKeyRequest(id=key.id), auth(org.owner_secret)
        )
        assert outcome[0] == "ok", outcome
        key.revoked = True
        org.log.append(key_event("REVOKED", key.id, key.env_ids))

    @rule(data=st.data())
    def roll_key(self, data: st.DataObject) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        key = self._draw_other_key(data, org)
        if key is None or len(org.keys) >= MAX_KEYS:
            return
        outcome = call(
            self.keys_stub.RollApiKey,
            api_key_pb2.RollApiKeyRequest(id=key.id, previous_key_ttl=duration_pb2.Duration(seconds=0)),
            auth(org.owner_secret),
        )
        assert outcome[0] == "ok", outcome
        key.expired = True
        org.keys.append(Key(outcome[1].api_key.id, outcome[1].secret, key.scopes, key.env_ids, key.owner))
        org.log += [
            key_event("ROLLED", key.id, key.env_ids),
            key_event("CREATED", outcome[1].api_key.id, key.env_ids),
        ]

    # -- resources --------------------------------------------------------------------------

    def _draw_reference(self, data: st.DataObject) -> str | None:
        """An environment reference from either organization (id or slug), or none."""
        envs = [env for org in self.orgs for env in sorted(org.envs.values(), key=lambda e: e.id)]
        env = data.draw(st.none() | st.sampled_from(envs))
        if env is None:
            return None
        return env.slug if data.draw(st.booleans()) else env.id

    def _draw_acting(
        self, data: st.DataObject
    ) -> tuple[OrgModel, Key, str | None, resource_pb2.ScopedResource.Kind, str]:
        org = data.draw(st.sampled_from(self.orgs))
        key = data.draw(st.sampled_from(org.keys))
        kind = data.draw(st.sampled_from(sorted(KINDS)))
        resource_id = data.draw(st.sampled_from(RESOURCE_IDS))
        return org, key, self._draw_reference(data), kind, resource_id

    @rule(data=st.data())
    def register_resource(self, data: st.DataObject) -> None:
        self._step()
        org, key, reference, kind, resource_id = self._draw_acting(data)
        expected = org.expected_single(key, reference, kind, "write")
        outcome = call(
            self.resources_stub.RegisterResource,
            resource_pb2.RegisterResourceRequest(kind=kind, resource_id=resource_id),
            auth(key.secret, reference),
        )
        if not isinstance(expected, Env):
            assert outcome == expected, (outcome, expected)
        elif (kind, resource_id) in org.resources:
            assert outcome == ("ALREADY_EXISTS", "RESOURCE_EXISTS"), outcome
        else:
            assert outcome[0] == "ok" and outcome[1].environment_id == expected.id, outcome
            assert outcome[1].organization_id == org.id
            org.resources[(kind, resource_id)] = expected.id
            org.log.append(resource_event("REGISTERED", (kind, resource_id), expected.id))

    @rule(data=st.data())
    def register_as_owner(self, data: st.DataObject) -> None:
        """Registration by the owner into one of its organization's environments, so that most
        runs hold resources in several environments at once."""
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        env = data.draw(st.sampled_from(sorted(org.envs.values(), key=lambda e: e.id)))
        kind = data.draw(st.sampled_from(sorted(KINDS)))
        resource_id = data.draw(st.sampled_from(RESOURCE_IDS))
        outcome = call(
            self.resources_stub.RegisterResource,
            resource_pb2.RegisterResourceRequest(kind=kind, resource_id=resource_id),
            auth(org.owner_secret, env.id),
        )
        if env.deleted:
            assert outcome == ("FAILED_PRECONDITION", "ENVIRONMENT_DELETED"), outcome
        elif (kind, resource_id) in org.resources:
            assert outcome == ("ALREADY_EXISTS", "RESOURCE_EXISTS"), outcome
        else:
            assert outcome[0] == "ok" and outcome[1].environment_id == env.id, outcome
            org.resources[(kind, resource_id)] = env.id
            org.log.append(resource_event("REGISTERED", (kind, resource_id), env.id))

    @rule(data=st.data())
    def deregister_resource(self, data: st.DataObject) -> None:
        self._step()
        org, key, reference, kind, resource_id = self._draw_acting(data)
        expected = org.expected_single(key, reference, kind, "write")
        outcome = call(
            self.resources_stub.DeregisterResource,
            resource_pb2.DeregisterResourceRequest(kind=kind, resource_id=resource_id),
            auth(key.secret, reference),
        )
        if not isinstance(expected, Env):
            assert outcome == expected, (outcome, expected)
        elif org.resources.get((kind, resource_id)) != expected.id:
            assert outcome == ("NOT_FOUND", "RESOURCE_NOT_FOUND"), outcome
        else:
            assert outcome[0] == "ok", outcome
            del org.resources[(kind, resource_id)]
            org.log.append(resource_event("DEREGISTERED", (kind, resource_id), expected.id))

    @rule(data=st.data())
    def get_resource(self, data: st.DataObject) -> None:
        self._step()
        org, key, reference, kind, resource_id = self._draw_acting(data)
        expected = org.expected_single(key, reference, kind, "read")
        outcome = call(
            self.resources_stub.GetResource,
            resource_pb2.GetResourceRequest(kind=kind, resource_id=resource_id),
            auth(key.secret, reference),
        )
        if not isinstance(expected, Env):
            assert outcome == expected, (outcome, expected)
        elif org.resources.get((kind, resource_id)) != expected.id:
            assert outcome == ("NOT_FOUND", "RESOURCE_NOT_FOUND"), outcome
        else:
            assert outcome[0] == "ok", outcome
            assert (outcome[1].organization_id, outcome[1].environment_id) == (org.id, expected.id)

    @rule(data=st.data(), move_all=st.booleans())
    def reassign_resources(self, data: st.DataObject, move_all: bool) -> None:
        self._step()
        org = data.draw(st.sampled_from(self.orgs))
        envs = sorted(org.envs)
        source = data.draw(st.sampled_from(envs))
        target = data.draw(st.sampled_from(envs))
        listed_refs: list[Ref] = []
        if not move_all:
            pool = [*sorted(org.resources), (INBOX, "never")]
            listed_refs = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
        outcome = call(
            self.resources_stub.ReassignResources,
            resource_pb2.ReassignResourcesRequest(
                from_environment_id=source,
                to_environment_id=target,
                resources=[resource_pb2.ResourceRef(kind=kind, resource_id=rid) for kind, rid in listed_refs],
            ),
            auth(org.owner_secret),
        )
        if source == target:
            assert outcome[0] == "INVALID_ARGUMENT", outcome
            return
        if org.envs[target].deleted:
            assert outcome == ("FAILED_PRECONDITION", "ENVIRONMENT_DELETED"), outcome
            return
        if any(org.resources.get(ref) != source for ref in listed_refs):
            assert outcome == ("NOT_FOUND", "RESOURCE_NOT_FOUND"), outcome
            return
        moving = listed_refs or [ref for ref, env_id in org.resources.items() if env_id == source]
        assert outcome[0] == "ok" and outcome[1].moved_count == len(moving), (outcome, moving)
        for ref in moving:
            org.resources[ref] = target
            org.log.append(resource_event("REASSIGNED", ref, target, previous=source))

    def _get_checks(self, org: OrgModel, key: Key) -> list[tuple[Outcome, Any, str]]:
        """GetResource, in each environment the key may use, of one readable resource inside it
        (found) and one outside it (NOT_FOUND)."""
        checks: list[tuple[Outcome, Any, str]] = []
        readable = {kind for kind, area in KINDS.items() if f"{area}:read" in key.scopes}
        for env in sorted(org.envs.values(), key=lambda e: e.id):
            if not isinstance(org.context(key, env.id), Env):
                continue
            candidates = sorted(ref for ref in org.resources if ref[0] in readable)
            inside = next((ref for ref in candidates if org.resources[ref] == env.id), None)
            outside = next((ref for ref in candidates if org.resources[ref] != env.id), None)
            for ref, expected in (
                (inside, ("ok", (org.id, env.id))),
                (outside, ("NOT_FOUND", "RESOURCE_NOT_FOUND")),
            ):
                if ref is None:
                    continue
                future = self.resources_stub.GetResource.future(
                    resource_pb2.GetResourceRequest(kind=ref[0], resource_id=ref[1]),
                    metadata=auth(key.secret, env.id),
                )
                checks.append((expected, future, f"{key.id} gets {ref} in {env.id}"))
        return checks

    # -- the property -----------------------------------------------------------------------

    @invariant()
    def every_key_sees_exactly_the_model(self) -> None:
        if not self.orgs:
            return
        checks: list[tuple[Outcome, Any, str]] = []
        for org in self.orgs:
            for key in org.keys:
                references: list[str | None] = [None]
                if org.denial(key) is None:
                    references += [env.id for other in self.orgs for env in other.envs.values()]
                for reference in references:
                    future = self.resources_stub.ListResources.future(
                        resource_pb2.ListResourcesRequest(page_size=500), metadata=auth(key.secret, reference)
                    )
                    checks.append((org.expected_list(key, reference), future, f"{key.id} in {reference}"))
        for org in self.orgs:
            for key in org.keys:
                if org.denial(key) is None:
                    checks += self._get_checks(org, key)
        results = [(expected, summary(resolved(future)), what) for expected, future, what in checks]
        event_checks = [
            (
                org.expected_events(key),
                self.events_stub.ListEvents.future(
                    event_pb2.ListEventsRequest(page_size=500), metadata=auth(key.secret)
                ),
                f"events of {key.id}",
            )
            for org in self.orgs
            for key in org.keys
        ]
        results += [
            (expected, event_summary(resolved(future)), what) for expected, future, what in event_checks
        ]
        for org in self.orgs:
            for env in org.envs.values():
                outcome = call(
                    self.resources_stub.ListOrphanedResources,
                    resource_pb2.ListOrphanedResourcesRequest(environment_id=env.id, page_size=500),
                    auth(org.owner_secret),
                )
                if env.deleted:
                    orphans = sorted(ref for ref, env_id in org.resources.items() if env_id == env.id)
                    listed = (
                        sorted((item.kind, item.resource_id) for item in outcome[1].resources)
                        if outcome[0] == "ok"
                        else outcome
                    )
                    assert listed == orphans, (env.id, listed, orphans)
                else:
                    assert outcome == ("FAILED_PRECONDITION", "ENVIRONMENT_NOT_DELETED"), outcome
        for expected, got, what in results:
            assert got == expected, (what, got, expected)


def run_machine(address: str) -> tuple[int, float]:
    """Runs the state machine against the server at `address`; returns steps run and seconds."""
    machine = cast(
        "type[IsolationMachine]",
        type("IsolationMachineRun", (IsolationMachine,), {"address": address, "steps_run": 0}),
    )
    started = time.monotonic()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    return machine.steps_run, time.monotonic() - started


async def test_every_key_sees_exactly_what_the_model_allows(harness: Harness) -> None:
    steps, seconds = await asyncio.to_thread(run_machine, harness.address)
    print(
        f"\nisolation state machine on {harness.backend}: {EXAMPLES} examples, {steps} steps, {seconds:.1f}s"
    )
    assert steps > 0
