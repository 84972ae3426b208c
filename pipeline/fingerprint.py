"""Content fingerprints that decide whether a stage must run again.

A stage's cache key is the sha256 of a small JSON document of its inputs: the config sections
it reads, the data manifest's sha256, and the sha256 of upstream files (the teacher's
``model.pt``, ...). Any change in one of them gives a new key, so the stage and everything
downstream of it (whose keys include the new upstream file hashes) run again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dml.files import sha256_file


def canonical_digest(payload: Any) -> str:
    """sha256 of ``payload`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sections_digest(config: BaseModel, sections: list[str]) -> str:
    """sha256 of the named top-level config sections (scalars such as ``seed`` included).

    Raises ValueError naming the sections the config lacks.
    """
    dumped = config.model_dump(mode="json")
    missing = [name for name in sections if name not in dumped]
    if missing:
        raise ValueError(f"config has no section(s) {', '.join(missing)}")
    return canonical_digest({name: dumped[name] for name in sections})


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes; a missing file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cannot fingerprint {path}: no such file")
    return sha256_file(path)


def source_fingerprint(path: str | Path) -> str:
    """A cheap fingerprint of raw input data: names, sizes and modification times of every
    file under ``path`` (or of ``path`` itself), not their bytes, so it costs one ``stat`` per
    file. Touching or replacing a raw file changes it; a missing path is a ValueError. A
    file that cannot be stat'ed (a broken link) counts by its link or its name, never raises."""
    root = Path(path)
    if root.is_file():
        stat = root.stat()
        return canonical_digest([[root.name, stat.st_size, stat.st_mtime_ns]])
    if not root.is_dir():
        raise ValueError(f"prepare.source.path {root} does not exist")
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            full = Path(folder) / name
            try:
                stat = full.stat()
            except OSError:  # a broken link, or a file gone mid-walk: prepare decides what it is
                try:
                    stat = full.lstat()
                except OSError:
                    entries.append([str(full.relative_to(root)), -1, -1])
                    continue
            entries.append([str(full.relative_to(root)), stat.st_size, stat.st_mtime_ns])
    return canonical_digest(entries)
