"""Every public function and method in `dml` and `pipeline` has a docstring, and the docstring of
one whose own body raises an exception names that exception (the house rule: public
docstrings give shapes, units and what is raised).

Public: a module-level function or a method of a module-level class, neither name starting
with ``_`` (dunder methods and nn.Module's ``extra_repr`` excepted: their contract is Python's or
torch's), in a module whose name does
not start with ``_`` (``__init__`` counts as public). Raised: ``raise Name(...)`` or
``raise Name`` in the function's own body (not in nested functions), unless a surrounding
``try`` in that body catches it; re-raises (bare ``raise``, ``raise exc``) and
``NotImplementedError`` are not counted.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dml", "pipeline")
NOT_COUNTED = {"NotImplementedError"}
EXEMPT_METHODS = {"extra_repr"}  # nn.Module's repr hook: formats the constructor arguments, nothing more
CATCH_ALL = {"Exception", "BaseException"}

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef
TRY_NODES = (ast.Try, getattr(ast, "TryStar", ast.Try))  # try/except* is Python 3.11+


def source_files() -> list[Path]:
    """The modules of the packages, public ones only (``__init__`` included)."""
    files = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            public = all(part == "__init__" or not part.startswith("_") for part in parts)
            if public:
                files.append(path)
    return files


def public_functions(tree: ast.Module) -> Iterator[tuple[str, FunctionNode]]:
    """(qualified name, node) of each public module-level function and public method."""
    for node in tree.body:
        if isinstance(node, FunctionNode) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, FunctionNode) and not item.name.startswith("_") and item.name not in EXEMPT_METHODS:
                    yield f"{node.name}.{item.name}", item


def _exception_name(raised: ast.expr | None) -> str | None:
    """``Name`` of ``raise Name(...)`` / ``raise mod.Name``; None for a re-raise of a variable."""
    if isinstance(raised, ast.Call):
        raised = raised.func
    if isinstance(raised, ast.Attribute):
        return raised.attr
    if isinstance(raised, ast.Name) and raised.id[:1].isupper():
        return raised.id
    return None


def _caught(handlers: list[ast.ExceptHandler]) -> set[str]:
    names: set[str] = set()
    for handler in handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        for kind in kinds:
            names.add("Exception" if kind is None else (_exception_name(kind) or ""))
    return names


def raised_names(function: FunctionNode) -> set[str]:
    """Exceptions the function's own body raises and does not catch itself."""
    found: set[str] = set()

    def visit(node: ast.AST, caught: frozenset[str]) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            return  # a nested definition raises when it is called, not here
        if isinstance(node, ast.Raise):
            name = _exception_name(node.exc)
            if name and name not in NOT_COUNTED and name not in caught and not caught & CATCH_ALL:
                found.add(name)
        if isinstance(node, TRY_NODES):
            inner = caught | _caught(node.handlers)
            for child in node.body:
                visit(child, frozenset(inner))
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, caught)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, caught)

    for statement in function.body:
        visit(statement, frozenset())
    return found


def audit() -> tuple[list[str], list[str]]:
    """(functions without a docstring, functions whose docstring misses a raised exception)."""
    undocumented, unmentioned = [], []
    for path in source_files():
        where = path.relative_to(ROOT)
        for name, node in public_functions(ast.parse(path.read_text(), str(path))):
            doc = ast.get_docstring(node)
            if not doc:
                undocumented.append(f"{where}:{node.lineno} {name}")
                continue
            missing = sorted(e for e in raised_names(node) if not re.search(rf"\b{re.escape(e)}\b", doc))
            if missing:
                unmentioned.append(f"{where}:{node.lineno} {name} raises {', '.join(missing)}")
    return undocumented, unmentioned


def test_every_public_function_has_a_docstring():
    undocumented, _ = audit()
    assert not undocumented, "public functions without a docstring:\n" + "\n".join(undocumented)


def test_docstrings_name_what_their_function_raises():
    _, unmentioned = audit()
    assert not unmentioned, "docstrings that do not name an exception the body raises:\n" + "\n".join(unmentioned)


SAMPLE = '''
def documented(x):
    """Double x. Raises ValueError for a negative x."""
    if x < 0:
        raise ValueError(x)
    return 2 * x

def silent(x):
    """Double x."""
    if x < 0:
        raise errors.DataError(f"bad {x}")
    try:
        int(x)
    except TypeError:
        raise
    return 2 * x

def handled(x):
    """Parse x."""
    try:
        raise KeyError(x)
    except KeyError:
        return None

def nested(x):
    """Build a checker."""
    def check():
        raise RuntimeError(x)
    return check

def bare(x):
    return x

def _private(x):
    raise OSError(x)

class Thing:
    def method(self):
        raise TypeError("no")

    def __len__(self):
        return 0

class _Hidden:
    def method(self):
        return 1
'''


@pytest.mark.parametrize(
    "name, raised",
    [
        ("documented", {"ValueError"}),
        ("silent", {"DataError"}),
        ("handled", set()),
        ("nested", set()),
        ("Thing.method", {"TypeError"}),
    ],
)
def test_the_audit_finds_what_a_body_raises(name, raised):
    functions = dict(public_functions(ast.parse(SAMPLE)))
    assert raised_names(functions[name]) == raised


def test_the_audit_sees_only_public_functions_and_methods():
    assert [name for name, _ in public_functions(ast.parse(SAMPLE))] == [
        "documented",
        "silent",
        "handled",
        "nested",
        "bare",
        "Thing.method",
    ]
