"""User-facing errors: anything raised as `DMLError` is printed by the CLI as one line, and so
is an `OSError` (disk full, name too long, not a folder...), through `os_error_line`."""

from __future__ import annotations

import os
from pathlib import Path


class DMLError(Exception):
    """A problem with the user's input (config, paths, data) that deserves a one-line message."""


class ConfigError(DMLError, ValueError):
    """A config file or override that does not fit the typed config."""


class DataError(DMLError):
    """A data source or shard directory that cannot be used as asked."""


def printable(text: str) -> str:
    """``text`` with line breaks and other control characters escaped, so a message stays one
    line even when it quotes a file name holding them."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def os_error_line(exc: OSError) -> str:
    """One line for an `OSError`: ``PATH: reason`` (``PATH -> PATH2`` for renames)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return reason
    where = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {reason}"


def at_path(exc: OSError, path: str | Path) -> OSError:
    """``exc`` naming ``path`` when it names no file (a failed ``write`` on an open file
    raises ``[Errno 28] No space left on device`` without saying which file)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror, str(path))  # picks the errno's subclass


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (its type name when empty), at most ``limit`` chars:
    for one-line messages that quote a library's multi-line error."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
