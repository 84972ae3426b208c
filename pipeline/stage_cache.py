"""Stage stamps: a small JSON file next to a stage's outputs saying which inputs made them.

``pipeline_stage.json`` in a stage's output folder holds the stage name, its cache key, its
inputs, a status (``running`` while the stage works, ``done`` after) and, when done, the
stage's result. Before a stage runs, `claim_output_dir` compares it with the new key:

- same key, done, and the stage's proof file present: cached, nothing runs;
- same key, not done (an earlier attempt failed or was killed): resume in place, so
  training continues from its last checkpoint;
- a superseded sibling (below) made by the same key and done: the current folder is set
  aside and that one is renamed back, so returning to earlier inputs costs nothing;
- anything else (other key, no stamp, unknown files): the folder is renamed to
  ``<name>.superseded-<UTC time>`` and the stage starts fresh. Nothing is ever deleted.

The stamp lives with the outputs, so it moves with them, and a deleted output invalidates it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from dml.clock import utc_now, utc_stamp
from dml.files import write_json_atomic

log = logging.getLogger(__name__)
STAMP_NAME = "pipeline_stage.json"
Decision = Literal["cached", "resume", "fresh"]


def read_stamp(output_dir: str | Path) -> dict[str, Any] | None:
    """The stamp in ``output_dir``, or None when there is none or it is unreadable."""
    path = Path(output_dir) / STAMP_NAME
    try:
        stamp = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return stamp if isinstance(stamp, dict) else None


def write_stamp(
    output_dir: str | Path,
    stage: str,
    key: str,
    status: str,
    inputs: dict[str, Any],
    result: dict[str, Any] | None = None,
) -> Path:
    """Write (atomically) the stamp for ``stage`` in ``output_dir``."""
    path = Path(output_dir) / STAMP_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        path,
        {
            "stage": stage,
            "key": key,
            "status": status,
            "inputs": inputs,
            "result": result or {},
            "updated_at": utc_now(),
        },
    )
    return path


def supersede(output_dir: Path) -> Path:
    """Rename ``output_dir`` to a free ``<name>.superseded-<UTC time>[-n]`` beside it."""
    stamp = utc_stamp()
    target = output_dir.with_name(f"{output_dir.name}.superseded-{stamp}")
    counter = 1
    while target.exists():
        target = output_dir.with_name(f"{output_dir.name}.superseded-{stamp}-{counter}")
        counter += 1
    output_dir.rename(target)
    return target


def _finished_sibling(output_dir: Path, stage: str, key: str, done_file: str) -> Path | None:
    """The newest ``<name>.superseded-*`` folder holding finished outputs of ``key``."""
    if not output_dir.parent.is_dir():
        return None
    for candidate in sorted(output_dir.parent.glob(f"{output_dir.name}.superseded-*"), reverse=True):
        stamp = read_stamp(candidate)
        if (
            stamp is not None
            and stamp.get("stage") == stage
            and stamp.get("key") == key
            and stamp.get("status") == "done"
            and (candidate / done_file).exists()
        ):
            return candidate
    return None


def claim_output_dir(output_dir: str | Path, stage: str, key: str, done_file: str) -> tuple[Decision, dict | None]:
    """Decide cached / resume / fresh for a stage about to write ``output_dir`` (see module
    docstring); returns the decision and the existing stamp (None when fresh)."""
    output_dir = Path(output_dir)
    stamp = read_stamp(output_dir)
    if stamp is not None and stamp.get("stage") == stage and stamp.get("key") == key:
        if stamp.get("status") == "done" and (output_dir / done_file).exists():
            return "cached", stamp
        return "resume", stamp
    earlier = _finished_sibling(output_dir, stage, key, done_file)
    if earlier is not None:
        if output_dir.exists():
            supersede(output_dir)
        earlier.rename(output_dir)
        log.info("%s: restored the outputs of the same inputs from %s", stage, earlier)
        return "cached", read_stamp(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        moved = supersede(output_dir)
        reason = "inputs changed" if stamp is not None else "no stamp from an earlier pipeline run"
        log.info("%s: %s; kept the old outputs at %s", stage, reason, moved)
    return "fresh", None
