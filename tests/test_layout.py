"""The package layout shows the design (issue 12): no import cycles, small modules,
private modules visibly private.

The import graph is read from the source (``ast``), counting only imports that run
when a module is imported: ``if TYPE_CHECKING:`` blocks and imports inside functions
are left out, as Python leaves them out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "sessionforge"
#: The one module allowed past the size limit, and why.
LARGE = {"drivers/sqlite.py": "a whole DBAPI driver: connection, cursor, thread, errors"}
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = ["sessionforge", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                test = node.test
                if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                    visit(node.orelse)
                else:
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _top_level_imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(name, is_package, node.level, node.module)
                # `from package import module` depends on the module; `from module
                # import name` on the module
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                    for alias in node.names
                ]
            for target in targets:
                # a package's __init__ runs before its submodules anyway: not an edge
                if target in MODULES and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return [*stack[stack.index(child) :], child]
            if child not in state:
                cycle = visit(child)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles() -> None:
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_comfortably_small(name: str) -> None:
    path = MODULES[name]
    relative = path.relative_to(PACKAGE).as_posix()
    lines = len(path.read_text().splitlines())
    if relative in LARGE:
        return
    assert lines <= MAX_LINES, f"{relative}: {lines} lines (split it by concept)"


def test_private_modules_are_visibly_private() -> None:
    """Modules users may import are named plainly; everything else sits under ``_``."""
    public = {
        "sessionforge",
        "sessionforge.__main__",
        "sessionforge.alembic",
        "sessionforge.telemetry",
        "sessionforge.asgi",
        "sessionforge.cli",
        "sessionforge.config",
        "sessionforge.dialects",
        "sessionforge.drivers",
        "sessionforge.drivers.sqlite",
        "sessionforge.errors",
        "sessionforge.factory",
        "sessionforge.hooks",
        "sessionforge.pytest_plugin",
        "sessionforge.sync",
        "sessionforge.testing",
    }
    for name in MODULES:
        if name in public:
            continue
        leaf_parts = name.split(".")[1:]
        assert any(part.startswith("_") for part in leaf_parts) or name.startswith(
            ("sessionforge.dialects.", "sessionforge.cli.")
        ), f"{name} is neither public nor under a private name"
