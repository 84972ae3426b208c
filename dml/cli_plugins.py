"""Commands other packages add to `dml`: entry points of the group ``dml.commands``.

An entry point ``name = "module:function"`` adds ``dml <name>``: the function receives the
`dml` subparsers and ``add_config_args(parser, required)`` and adds its parser there (the
`pipeline` package adds ``dml pipeline`` this way, so `dml` needs no import of it). Entry
points come from the installed package metadata and, in a source checkout, from the
``pyproject.toml`` beside the `dml` package, so a checkout run with ``PYTHONPATH`` (or not
re-installed since an entry point was added) has the same commands as an install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from dml.errors import ConfigError

GROUP = "dml.commands"
AddConfigArgs = Callable[[argparse.ArgumentParser, bool], None]


def _checkout_entry_points(pyproject: Path) -> list[EntryPoint]:
    """The ``[project.entry-points."dml.commands"]`` table of a source checkout's pyproject.toml."""
    if not pyproject.is_file() or sys.version_info < (3, 11):
        return []
    import tomllib  # type: ignore[import-not-found,unused-ignore]  # 3.11+ only: the line above returns on 3.10

    try:
        table = tomllib.loads(pyproject.read_text())["project"]["entry-points"][GROUP]
    except (KeyError, tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
        return []
    return [EntryPoint(name, value, GROUP) for name, value in table.items()]


def command_entry_points(pyproject: Path | None = None) -> dict[str, EntryPoint]:
    """Name -> entry point of every plugin command; the source checkout's declaration wins
    over an older install's metadata."""
    found = {point.name: point for point in entry_points(group=GROUP)}
    checkout = pyproject or Path(__file__).resolve().parents[1] / "pyproject.toml"
    found.update({point.name: point for point in _checkout_entry_points(checkout)})
    return dict(sorted(found.items()))


def _unavailable(name: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        raise ConfigError(f"the `dml {name}` command cannot be loaded: {reason}")

    return handler


def add_plugin_commands(
    subparsers: Any, add_config_args: AddConfigArgs, points: dict[str, EntryPoint] | None = None
) -> None:
    """Add every plugin command to the `dml` parser. A plugin that fails to import still
    gets its name, whose handler fails in one line saying why (other commands keep working)."""
    for name, point in (command_entry_points() if points is None else points).items():
        try:
            register = point.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break `dml train`
            reason = f"{point.value}: {type(exc).__name__}: {exc}"
            stub = subparsers.add_parser(name, help=f"(unavailable: {reason})")
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(handler=_unavailable(name, reason))
            continue
        register(subparsers, add_config_args)
