"""The package layout (docs/layout.md): no import circles in src/, and imports only run downward
through the pipeline's stages. Every import counts — module level, inside functions and under
``TYPE_CHECKING`` — because a lazy import hides a circle rather than removing it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "entrolora"

#: The stages, lowest first: a module may import its own unit and units of lower stages only.
#: A unit is the first name below ``entrolora`` (a package or a top-level module).
STAGES: tuple[frozenset[str], ...] = tuple(
    frozenset(s.split())
    for s in (
        "_version files progress targets",  # cross-cutting helpers
        "guards",  # the guards of docs/refusals.md
        "data",  # input files: tables, user files, data sets
        "stats",
        "plans",
        "planners",
        "adapters",
        "distributed probing",
        "flex",
        "export",
        "report",
        "integrations",
        "job",
        "cli train",
    )
)
#: Units that may import the public facade (``import entrolora as el``): the application layer.
FACADE_USERS = frozenset({"integrations", "job", "cli", "train"})


def module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of the same top package it imports}`` for every ``.py`` under ``root``
    (``from pkg import name`` counts as importing ``pkg.name`` when that is a module)."""
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in paths.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in paths else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = {d for d in deps if d in paths and d != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, …, a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def upward_imports(graph: dict[str, set[str]], top: str) -> list[str]:
    """``"a -> b"`` for every import that leaves its unit for one of the same or a higher stage."""
    rank = {unit: i for i, stage in enumerate(STAGES) for unit in stage}
    bad = []
    for mod, deps in sorted(graph.items()):
        unit = mod.split(".")[1] if "." in mod else None
        for d in sorted(deps):
            if unit is None:  # the facade itself imports lazily from anywhere
                continue
            if d == top:
                if unit not in FACADE_USERS:
                    bad.append(f"{mod} -> {d} (the public facade)")
                continue
            target = d.split(".")[1]
            if target == unit:
                continue
            if unit not in rank or target not in rank:
                bad.append(f"{mod} -> {d} (a unit missing from STAGES)")
            elif rank[target] >= rank[unit]:
                bad.append(f"{mod} -> {d}")
    return bad


def test_no_import_circles():
    assert find_cycle(import_graph(SRC)) is None, " -> ".join(find_cycle(import_graph(SRC)))


def test_imports_run_down_the_stages():
    assert upward_imports(import_graph(SRC), SRC.name) == []


def test_every_unit_has_a_stage():
    units = {p.name.removesuffix(".py") for p in SRC.iterdir()} - {"__init__", "__pycache__"}
    assert units == set().union(*STAGES)


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "entrolora"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("lazy", [False, True])
def test_the_checks_catch_a_planted_circle(tmp_path, lazy):
    back = "def f():\n    from ..plans import X\n" if lazy else "from ..plans import X\n"
    root = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "plans.py": "from .stats.module import Y\nX = 1\n",
            "stats/__init__.py": "",
            "stats/module.py": back + "Y = 2\n",
        },
    )
    assert find_cycle(import_graph(root)) == [
        "entrolora.plans",
        "entrolora.stats.module",
        "entrolora.plans",
    ]


def test_the_checks_catch_an_upward_import(tmp_path):
    root = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "planners/__init__.py": "",
            "planners/basic.py": "from ..adapters import flex\n",
            "adapters/__init__.py": "",
            "adapters/flex.py": "import entrolora\n",
        },
    )
    graph = import_graph(root)
    assert find_cycle(graph) is None
    assert upward_imports(graph, "entrolora") == [
        "entrolora.adapters.flex -> entrolora (the public facade)",
        "entrolora.planners.basic -> entrolora.adapters.flex",
    ]
