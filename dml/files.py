"""Whole-file operations every stage shares: the sha256 of a file, replacing a file
atomically, and writing JSON atomically (readers never see half a file, no ``.tmp`` is left)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dml.errors import at_path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks. Raises `OSError` when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield ``<path>.tmp`` to write; when the block succeeds it replaces ``path``.

    On any error (disk full, interrupt) the temporary file is removed, so no ``.tmp`` is left
    behind, and an `OSError` that names no file is re-raised naming ``path``.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise at_path(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, payload: Any, sort_keys: bool = True, allow_nan: bool = True) -> Path:
    """Write ``payload`` as indented JSON to ``path`` via `atomic_path`; returns the path.

    Raises `OSError` naming ``path`` (disk full, missing folder) and `ValueError` for NaN/inf
    when ``allow_nan`` is False (strict JSON); nothing is written then.
    """
    path = Path(path)
    text = json.dumps(payload, indent=1, sort_keys=sort_keys, allow_nan=allow_nan)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
