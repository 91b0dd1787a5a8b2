"""Who may call what: one table from every RPC to its rule, and one function that applies it.

A method with no entry is refused (fail closed); a test checks that every method of every
service descriptor has an entry. Rules are checked before the handler looks anything up, so
permission is always decided before existence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from service.domain.models import ResourceKind
from service.domain.principal import Principal


class Level(enum.Enum):
    """What kind of caller a method needs."""

    PUBLIC = "public"  # no credentials: health, reflection
    VERIFIER = "verifier"  # VerifyApiKey: a verifier token when the server has some, else anyone
    OPERATOR = "operator"  # the operator token from the server's configuration
    AUTHENTICATED = "authenticated"  # any usable key of the organization
    ORGANIZATION = "organization"  # an organization-wide key with an OWNER/ADMIN owner, if owned
    ENVIRONMENT = "environment"  # a key; the handler checks the environment named in the request
    CONTEXT = "context"  # a key acting in the x-agentpost-environment context, resolved up front


@dataclass(frozen=True)
class Rule:
    """A method's level and the scope it needs: fixed, or, for a ResourceService method, the
    `:read` or `:write` scope of the resource kind the request names."""

    level: Level
    scope: str | None = None
    resource_access: str | None = None

    def required_scope(self, kind: ResourceKind | None) -> str | None:
        """The scope a request needs. For a resource method naming no kind that is None: the
        use case then limits itself to the kinds the key may read, or refuses the request."""
        if self.resource_access is not None:
            return None if kind is None else f"{kind.scope_area}:{self.resource_access}"
        return self.scope


_ORG = "/agentpost.environments.v1.OrganizationService/"
_ENV = "/agentpost.environments.v1.EnvironmentService/"
_MEM = "/agentpost.environments.v1.MembershipService/"
_KEY = "/agentpost.environments.v1.ApiKeyService/"
_RES = "/agentpost.environments.v1.ResourceService/"
_EVT = "/agentpost.environments.v1.EventService/"

POLICY: Final[dict[str, Rule]] = {
    "/grpc.health.v1.Health/Check": Rule(Level.PUBLIC),
    "/grpc.health.v1.Health/Watch": Rule(Level.PUBLIC),
    "/grpc.health.v1.Health/List": Rule(Level.PUBLIC),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Rule(Level.PUBLIC),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Rule(Level.PUBLIC),
    _ORG + "CreateOrganization": Rule(Level.OPERATOR),
    _ORG + "GetOrganization": Rule(Level.AUTHENTICATED),
    _ENV + "CreateEnvironment": Rule(Level.ORGANIZATION, "environments:write"),
    _ENV + "GetEnvironment": Rule(Level.ENVIRONMENT, "environments:read"),
    _ENV + "ListEnvironments": Rule(Level.ENVIRONMENT, "environments:read"),
    _ENV + "UpdateEnvironment": Rule(Level.ENVIRONMENT, "environments:write"),
    _ENV + "DeleteEnvironment": Rule(Level.ORGANIZATION, "environments:write"),
    _ENV + "UndeleteEnvironment": Rule(Level.ORGANIZATION, "environments:write"),
    _MEM + "CreateMember": Rule(Level.ORGANIZATION, "members:write"),
    _MEM + "GetMember": Rule(Level.ENVIRONMENT, "members:read"),
    _MEM + "ListMembers": Rule(Level.ORGANIZATION, "members:read"),
    _MEM + "UpdateMember": Rule(Level.ORGANIZATION, "members:write"),
    _MEM + "DeleteMember": Rule(Level.ORGANIZATION, "members:write"),
    _MEM + "AddEnvironmentMember": Rule(Level.ENVIRONMENT, "members:write"),
    _MEM + "ListEnvironmentMembers": Rule(Level.ENVIRONMENT, "members:read"),
    _MEM + "UpdateEnvironmentMember": Rule(Level.ENVIRONMENT, "members:write"),
    _MEM + "RemoveEnvironmentMember": Rule(Level.ENVIRONMENT, "members:write"),
    _MEM + "ListMemberEnvironments": Rule(Level.ENVIRONMENT, "members:read"),
    _KEY + "CreateApiKey": Rule(Level.ENVIRONMENT, "api_keys:write"),
    _KEY + "GetApiKey": Rule(Level.ENVIRONMENT, "api_keys:read"),
    _KEY + "ListApiKeys": Rule(Level.ENVIRONMENT, "api_keys:read"),
    _KEY + "UpdateApiKey": Rule(Level.ENVIRONMENT, "api_keys:write"),
    _KEY + "RevokeApiKey": Rule(Level.ENVIRONMENT, "api_keys:write"),
    _KEY + "RollApiKey": Rule(Level.ENVIRONMENT, "api_keys:write"),
    _KEY + "VerifyApiKey": Rule(Level.VERIFIER),
    _RES + "RegisterResource": Rule(Level.CONTEXT, resource_access="write"),
    _RES + "GetResource": Rule(Level.CONTEXT, resource_access="read"),
    _RES + "ListResources": Rule(Level.CONTEXT, resource_access="read"),
    _RES + "DeregisterResource": Rule(Level.CONTEXT, resource_access="write"),
    _RES + "ListOrphanedResources": Rule(Level.ORGANIZATION, "environments:read"),
    _RES + "ReassignResources": Rule(Level.ORGANIZATION, "environments:write"),
    # Any key holding the scope; each event is then shown only if the caller could read its
    # resource (service.domain.visibility), and an environment filter must be within reach.
    _EVT + "ListEvents": Rule(Level.ENVIRONMENT, "events:read"),
    _EVT + "WatchEvents": Rule(Level.AUTHENTICATED, "events:read"),
}


def authorize(rule: Rule, principal: Principal, kind: ResourceKind | None = None) -> None:
    """Raises Denied unless the principal satisfies the rule for a request naming `kind`."""
    if rule.level is Level.ORGANIZATION:
        principal.require_organization_level()
    scope = rule.required_scope(kind)
    if scope is not None:
        principal.require_scope(scope)
