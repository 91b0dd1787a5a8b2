"""The REST mapping: every RPC carries a `google.api.http` rule that a gRPC-JSON transcoder can
serve, with the paths of the product contract, and no two rules can match the same request."""

from __future__ import annotations

import importlib
import itertools
import pkgutil
import re
from dataclasses import dataclass

import agentpost.environments.v1 as contract
import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor

VERBS = ("get", "put", "post", "delete", "patch")
_VARIABLE = re.compile(r"^\{([a-z_][a-z0-9_.]*)(?:=([^}]*))?\}$")


def _contract_methods() -> list[MethodDescriptor]:
    """Every method of every service in the generated contract package, whatever file it is in."""
    methods = []
    for module_info in pkgutil.iter_modules(contract.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{contract.__name__}.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.extend(service.methods)
    return methods


@dataclass(frozen=True)
class Binding:
    """One HTTP binding of a method: the rule itself or one of its additional bindings."""

    method: str
    verb: str
    path: str
    body: str

    @property
    def segments(self) -> list[str]:
        """The path's segments, the custom verb cut off the last one."""
        head, _, last = self.path.rpartition("/")
        return [*head.strip("/").split("/"), last.split(":", 1)[0] if self.custom_verb else last]

    @property
    def custom_verb(self) -> str:
        """The `:verb` suffix of the path (`/things/{id}:undelete`), or ''."""
        last = self.path.rpartition("/")[2]
        return last.rsplit(":", 1)[1] if ":" in last and not last.endswith("}") else ""


def _bindings(method: MethodDescriptor) -> list[Binding]:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
    rules = [rule, *rule.additional_bindings]
    found = []
    for each in rules:
        verb = each.WhichOneof("pattern")
        assert verb in VERBS, f"{method.full_name}: pattern {verb!r} is not one of {VERBS}"
        found.append(Binding(method.full_name, verb, getattr(each, verb), each.body))
    return found


def _field_path(message: Descriptor, dotted: str) -> FieldDescriptor | None:
    """The field a dotted path names in `message`, or None."""
    field: FieldDescriptor | None = None
    for part in dotted.split("."):
        if field is not None:
            if field.message_type is None:
                return None
            message = field.message_type
        field = message.fields_by_name.get(part)
        if field is None:
            return None
    return field


def _variable(segment: str) -> str | None:
    match = _VARIABLE.match(segment)
    return match.group(1) if match else None


def could_match_the_same_request(a: Binding, b: Binding) -> bool:
    """True when some request URL with the same HTTP verb would match both bindings: same verb,
    same custom verb, as many segments, and at each position equal literals or a variable on
    either side. Stricter than a transcoder (which prefers literals), so no route depends on
    precedence rules."""
    if a.verb != b.verb or a.custom_verb != b.custom_verb:
        return False
    if len(a.segments) != len(b.segments):
        return False
    return all(
        x == y or _variable(x) is not None or _variable(y) is not None
        for x, y in zip(a.segments, b.segments, strict=True)
    )


ALL_METHODS = _contract_methods()
ALL_BINDINGS = [binding for method in ALL_METHODS for binding in _bindings(method)]


def test_the_contract_has_methods_to_check() -> None:
    # Guards the tests below against an import that silently found no service.
    assert len(ALL_METHODS) >= 31


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.full_name)
def test_every_rpc_has_a_well_formed_rule(method: MethodDescriptor) -> None:
    bindings = _bindings(method)
    assert bindings, f"{method.full_name} has no google.api.http rule"
    for binding in bindings:
        assert binding.path.startswith("/api/v1/"), binding
        for segment in binding.segments:
            name = _variable(segment)
            if name is None:
                assert "{" not in segment and "}" not in segment, binding
                continue
            field = _field_path(method.input_type, name)
            assert field is not None, f"{binding}: path variable {name} is not a request field"
            assert not field.is_repeated, binding
            assert field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_ENUM), binding
        if binding.verb in ("get", "delete"):
            assert binding.body == "", f"{binding}: {binding.verb.upper()} carries no body"
        elif binding.body != "*":
            assert binding.body in method.input_type.fields_by_name, binding


def test_no_two_rules_can_match_the_same_request() -> None:
    clashes = [
        (a.method, a.verb, a.path, b.method, b.path)
        for a, b in itertools.combinations(ALL_BINDINGS, 2)
        if could_match_the_same_request(a, b)
    ]
    assert clashes == []


def test_the_collision_check_itself_tells_routes_apart() -> None:
    def binding(verb: str, path: str) -> Binding:
        return Binding("m", verb, path, "")

    assert could_match_the_same_request(
        binding("get", "/v1/things/{id}"), binding("get", "/v1/things/lookup")
    )
    assert could_match_the_same_request(binding("get", "/v1/a/{x}/b"), binding("get", "/v1/a/c/{y}"))
    assert not could_match_the_same_request(
        binding("get", "/v1/things/{id}"), binding("delete", "/v1/things/{id}")
    )
    assert not could_match_the_same_request(
        binding("post", "/v1/things/{id}:undelete"), binding("post", "/v1/things/{id}")
    )
    assert not could_match_the_same_request(
        binding("post", "/v1/things:verify"), binding("post", "/v1/things")
    )
    assert not could_match_the_same_request(binding("get", "/v1/things"), binding("get", "/v1/things/{id}"))


@pytest.mark.parametrize(
    ("verb", "path", "method"),
    [
        # The examples of the product contract.
        ("post", "/api/v1/environments", "EnvironmentService.CreateEnvironment"),
        ("get", "/api/v1/environments/{id}", "EnvironmentService.GetEnvironment"),
        ("post", "/api/v1/environments/{environment_id}/members", "MembershipService.AddEnvironmentMember"),
        ("post", "/api/v1/api-keys", "ApiKeyService.CreateApiKey"),
        ("post", "/api/v1/api-keys:verify", "ApiKeyService.VerifyApiKey"),
    ],
)
def test_the_product_paths_are_served(verb: str, path: str, method: str) -> None:
    matching = [b.method for b in ALL_BINDINGS if b.verb == verb and b.path == path]
    assert matching == [f"agentpost.environments.v1.{method}"]
