"""The package's one direction of dependency, read from the imports of every module with `ast`.

transport -> application -> storage -> domain, plus application -> domain and transport -> domain;
`app` wires everything and nothing imports it. The domain is pure: no I/O libraries, no gRPC, no
SQLAlchemy. No use case touches SQLAlchemy: it gets repositories from a unit of work.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service"

# Which layers each layer may import (its own always included).
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "storage": {"domain"},
    "application": {"storage", "domain"},
    "transport": {"application", "domain"},
    "app": {"transport", "application", "storage", "domain"},
}

# Third-party packages a layer must never import.
FORBIDDEN_PACKAGES: dict[str, set[str]] = {
    "domain": {"sqlalchemy", "alembic", "asyncpg", "aiosqlite", "grpc", "grpc_status", "google", "agentpost"},
    "storage": {"grpc", "grpc_status", "agentpost"},
    "application": {"sqlalchemy", "alembic", "asyncpg", "aiosqlite", "grpc", "grpc_status", "agentpost"},
    "transport": {"sqlalchemy", "alembic", "asyncpg", "aiosqlite"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _layer(path: Path) -> str | None:
    parts = path.relative_to(SERVICE).parts
    return parts[0] if len(parts) > 1 and parts[0] in ALLOWED else None


MODULES = sorted(path for path in SERVICE.rglob("*.py") if _layer(path) is not None)


def test_every_layer_has_modules() -> None:
    assert {_layer(path) for path in MODULES} == set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(SERVICE)))
def test_imports_run_one_way(path: Path) -> None:
    layer = _layer(path)
    assert layer is not None
    wrong: list[str] = []
    for line, module in _imports(path):
        parts = module.split(".")
        if parts[0] == "service" and len(parts) > 1:
            target = parts[1]
            if target != layer and target not in ALLOWED[layer]:
                wrong.append(f"line {line}: {layer} imports {module}")
        elif parts[0] in FORBIDDEN_PACKAGES.get(layer, set()):
            wrong.append(f"line {line}: {layer} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_arrow(tmp_path: Path) -> None:
    """The check itself can fail: a storage module importing transport is reported."""
    module = tmp_path / "bad.py"
    module.write_text("from service.transport.errors import to_status\nimport grpc\n")
    found = [name for _, name in _imports(module)]
    assert found == ["service.transport.errors", "grpc"]
    assert "transport" not in ALLOWED["storage"]
    assert "grpc" in FORBIDDEN_PACKAGES["storage"]
