"""The dependency rule (docs/architecture.md): imports point down the layers, never sideways or up, and never
in a cycle. Function-level imports count: one that dodges a cycle is a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lorakit"

# Bottom layer: anyone may import these; they import only each other.
BOTTOM = ("lorakit", "lorakit.errors", "lorakit.console", "lorakit.atomic", "lorakit.paths", "lorakit.compat",
          "lorakit.faults", "lorakit.versions", "lorakit.text", "lorakit.publish", "lorakit.runlock",
          "lorakit.cpus")
# Units with the same rank may not import each other (no sideways imports).
RANKS = {
    "config": 1,
    "models": 2, "data": 2,
    "adapters": 3,
    "distributed": 4,
    "checkpoint": 5,
    "training": 6,
    "merge": 5,  # training merges at the end of a run (output.save: merged)
    "memory": 7, "tools": 7, "export": 7,
    "cli": 8, "testing": 8,
    "__main__": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every lorakit module `name` imports, at module or function level."""
    found = set()
    tree = ast.parse(MODULES[name].read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for n in ast.walk(block)}  # annotations only: not an import at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lorakit"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lorakit":
            for alias in node.names:  # `from lorakit.adapters import bottleneck` imports the submodule
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name}


def unit(name: str) -> str | None:
    """The layer unit of a module: its subpackage, or its own name at the top level; None for the bottom."""
    if name in BOTTOM:
        return None
    return name.split(".")[1]


def rank(name: str) -> int:
    u = unit(name)
    return 0 if u is None else RANKS[u]


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if unit(m) is not None and unit(m) not in RANKS)
    assert not missing, f"add these to RANKS (and docs/architecture.md): {missing}"


def test_imports_point_down_the_layers():
    bad = []
    for name in sorted(MODULES):
        for target in sorted(imports_of(name)):
            same_unit = unit(name) is not None and unit(name) == unit(target)
            if not same_unit and rank(target) >= rank(name) and not (rank(name) == rank(target) == 0):
                bad.append(f"{name} -> {target}")
    assert not bad, "imports that go up or sideways across the layers:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: imports_of(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_packages_say_what_they_own():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init.parent.name}/__init__.py: say what it owns and what it may import"


def test_every_module_is_under_500_lines():
    """Issue 17: a module past 500 lines holds more than one concept; split it where the concepts part."""
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) >= 500}
    assert not long, f"modules of 500 lines or more: {long}"
