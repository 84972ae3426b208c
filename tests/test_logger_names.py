"""One logger convention in `dml` and `pipeline`: a module logs through ``log =
logging.getLogger(__name__)``, so every record is named after the module it comes from and
the ``dml`` / ``pipeline`` parents' levels and handlers apply to it.

A module that also runs as ``python -m pkg.mod`` (it has an ``if __name__ == "__main__"``
block) spells its dotted name instead, since ``__name__`` is ``"__main__"`` there. Nothing
logs through the root logger (``logging.info(...)``). Other ``getLogger`` calls (to set a
library's level, or to attach a handler to a parent) are not module loggers and are free.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dml", "pipeline")
ROOT_LOGGER_CALLS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runs_as_main(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def _is_get_logger(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "getLogger"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "logging"
    )


def logger_problems(path: Path, source: str) -> list[str]:
    """What in ``source`` (the module at ``path``) breaks the convention, one line each."""
    tree = ast.parse(source)
    module = _module_name(path)
    wanted = repr(module) if _runs_as_main(tree) else "__name__"
    problems = []
    for node in tree.body:  # module-level loggers
        if isinstance(node, ast.Assign) and _is_get_logger(node.value):
            assert isinstance(node.value, ast.Call)
            names = [target.id for target in node.targets if isinstance(target, ast.Name)]
            argument = ast.unparse(node.value.args[0]) if node.value.args else "(root)"
            if names != ["log"] or argument.replace('"', "'") != wanted:
                problems.append(
                    f"{path.relative_to(ROOT)}:{node.lineno}: `{ast.unparse(node)}`; "
                    f"the convention is `log = logging.getLogger({wanted})`"
                )
    for call in ast.walk(tree):  # records through the root logger skip the package's name
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Name)
            and call.func.value.id == "logging"
            and call.func.attr in ROOT_LOGGER_CALLS
        ):
            problems.append(
                f"{path.relative_to(ROOT)}:{call.lineno}: logging.{call.func.attr}() logs through the "
                "root logger; use the module's `log`"
            )
    return problems


def test_every_module_logger_is_named_after_its_module():
    problems = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            problems += logger_problems(path, path.read_text())
    assert not problems, "\n".join(problems)


def test_the_check_refuses_other_names_and_root_logging():
    path = ROOT / "dml" / "data" / "example.py"
    assert logger_problems(path, "import logging\nlog = logging.getLogger(__name__)\n") == []
    assert len(logger_problems(path, "import logging\nlogger = logging.getLogger(__name__)\n")) == 1
    assert len(logger_problems(path, "import logging\nlog = logging.getLogger('dml')\n")) == 1
    assert len(logger_problems(path, "import logging\ndef f():\n    logging.info('x')\n")) == 1
    main = "import logging\nlog = logging.getLogger({})\nif __name__ == '__main__':\n    pass\n"
    assert logger_problems(path, main.format("'dml.data.example'")) == []
    assert len(logger_problems(path, main.format("__name__"))) == 1
