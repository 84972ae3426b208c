"""The layering of `dml` and `pipeline`, read statically from the source (ast, nothing imported):
the module import graph has no cycle, `dml` never imports `pipeline` (nor `prefect`), and the
names `pipeline` keeps torch-free equal the library's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dml", "pipeline")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name ``path`` imports when it runs, at any depth (functions too), relative
    ones resolved; imports under ``if TYPE_CHECKING:`` never run and are left out.
    ``from a.b import c`` counts as ``a.b.c`` and ``a.b``: the graph keeps the ones that exist."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node.test)
        for statement in node.body
        for inner in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (edges to modules that exist)."""
    files = {module_name(path, root): path for package in packages for path in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_names(path, name):
            # `import a.b.c` also runs a and a.b: the nearest existing module is the edge
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert len(graph) > 100 and "pipeline.cli" in graph and "dml.cli" in graph
    assert "dml.config" in graph["pipeline.stage_paths"]  # a real edge is seen


def test_dml_and_pipeline_import_without_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dml_never_imports_pipeline_or_prefect():
    offenders = []
    for path in (ROOT / "dml").rglob("*.py"):
        name = module_name(path)
        for imported in imported_names(path, name):
            if imported.split(".")[0] in ("pipeline", "prefect"):
                offenders.append(f"{name} imports {imported}")
    assert not offenders, "; ".join(sorted(set(offenders)))


@pytest.mark.parametrize(
    "modules, cycle",
    [
        ({"a": "import pkg.b", "b": "from pkg import c", "c": "from . import a"}, ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]),
        ({"a": "import pkg.b", "b": "import pkg.c", "c": "import json"}, None),
        ({"a": "from .b import thing", "b": "import pkg.a"}, ["pkg.a", "pkg.b", "pkg.a"]),
        ({"a": "import pkg.b", "b": "def f():\n    from pkg import a"}, ["pkg.a", "pkg.b", "pkg.a"]),  # lazy counts
        (
            {"a": "import pkg.b", "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X"},
            None,
        ),
    ],
)
def test_the_cycle_check_finds_cycles_it_is_given(tmp_path, modules, cycle):
    """The checks above cannot pass vacuously: a made-up package with a cycle is caught."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    for name, code in modules.items():
        (tmp_path / "pkg" / f"{name}.py").write_text(code + "\n")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) == cycle


def test_pipeline_names_its_torch_free_copies_after_the_library():
    """`pipeline` stays torch-free, so it names the model and report files itself."""
    from dml.eval.report import REPORT_JSON
    from dml.models.model_file import MODEL_FILE
    from pipeline import stage_paths

    assert (stage_paths.MODEL_FILE, stage_paths.REPORT_FILE) == (MODEL_FILE, REPORT_JSON)
