"""What a resume keeps, what it lets change, and which checkpoint it starts from.

Kept from the checkpoint; a config that now says otherwise is refused in one line naming the
keys (start a new ``train.run_dir`` instead):

- the model (``model.*``; for `dml distill` also ``distill.*``), the loss and its head
  (``loss.*`` except ``loss.head_lr``), ``seed``, ``optimizer.name`` and ``optimizer.momentum``
  (they shape the saved optimizer state), ``swa.*``, and how
  batches are made (``data.*`` except ``data.shard_dir``, ``data.num_workers`` and the
  bad-sample policy ``data.bad_samples``),
  ``train.backend``, ``train.grad_accum``, ``train.precision``;
- the data itself, identified by the sha256 of its ``manifest.json``: other shards are
  refused unless ``allow_new_data`` (``dml train --resume --allow-new-data``) asks for a
  deliberate fine-tune. Then the run continues its step count, schedule and backbone
  optimizer on the new data from the start of an epoch; the head's class centres are kept when
  the class list is the same and re-initialised (with a warning) when it is not.

Everything else may change and takes effect: ``optimizer.lr``, ``optimizer.weight_decay``,
``optimizer.grad_clip``, ``loss.head_lr``, ``schedule.*`` (the schedule is evaluated
at the saved step with the new settings), the length (``train.epochs``, ``train.max_steps``),
and logging, evaluation and checkpoint cadence. Sections that are not training
(``prepare``, ``evaluate``, ``export``, ``pipeline``) are not compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dml.config import DMLConfig
from dml.data.manifest import manifest_digest
from dml.distributed import broadcast_object, gather_objects, get_rank
from dml.errors import DMLError
from dml.train.checkpoint import (
    CHECKPOINTS,
    list_checkpoints,
    newest_resumable,
    read_checkpoint,
)

log = logging.getLogger(__name__)

FIXED = (
    "seed",
    "model.",
    "loss.",
    "data.",
    "optimizer.name",
    "optimizer.momentum",
    "swa.",
    "train.backend",
    "train.grad_accum",
    "train.precision",
)
CHANGEABLE = ("loss.head_lr", "data.shard_dir", "data.num_workers", "data.bad_samples")
NOT_TRAINING = ("prepare.", "evaluate.", "export.", "pipeline.")


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, its state, and what to take from it."""

    path: Path
    state: dict[str, Any]
    keep_head: bool = True
    new_data: bool = False


def data_identity(shard_dir: str | Path, manifest: dict) -> dict[str, Any]:
    """What identifies the training data: the manifest's sha256 and its class list's."""
    classes = json.dumps(manifest["classes"]).encode()
    return {
        "manifest_sha256": manifest_digest(shard_dir),
        "classes_sha256": hashlib.sha256(classes).hexdigest(),
        "num_classes": len(manifest["classes"]),
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def fixed_changes(saved: dict[str, Any], config: DMLConfig, model_section: str = "model") -> list[str]:
    """``key (old -> new)`` for every key that a resume may not change; [] when none changed."""
    fixed = FIXED + (("distill.",) if model_section != "model" else ())
    changeable = (*CHANGEABLE, "distill.run_dir")
    now, before = _flatten(config.model_dump(mode="json")), _flatten(saved)
    changed = []
    for key in sorted(now.keys() & before.keys()):
        if now[key] == before[key] or key in changeable or key.startswith(NOT_TRAINING):
            continue
        if any(key == name or (name.endswith(".") and key.startswith(name)) for name in fixed):
            changed.append(f"{key} ({before[key]!r} -> {now[key]!r})")
    return changed


def check_config(point: ResumePoint, config: DMLConfig, model_section: str) -> None:
    """Refuse (one line, every key named) a resume whose config changes what a run keeps.

    Raises DMLError naming every changed key.
    """
    changed = fixed_changes(point.state.get("config") or {}, config, model_section)
    if changed:
        raise DMLError(
            f"--resume from {point.path}: {', '.join(changed)} cannot change when resuming (the model, "
            f"head, loss and data of a run are kept; lr, schedule, length and cadence may change): "
            f"undo the change or start a new train.run_dir"
        )


def check_data(point: ResumePoint, identity: dict[str, Any], shard_dir: str, allow_new_data: bool) -> None:
    """Refuse other data than the checkpoint's, unless ``allow_new_data``; then decide the head.

    Raises DMLError for other data without ``allow_new_data``.
    """
    saved = point.state.get("data_identity")
    if saved is None:
        log.warning("resume: %s does not record its data; the data cannot be checked", point.path)
        return
    if saved["manifest_sha256"] == identity["manifest_sha256"]:
        return
    what = (
        f"{shard_dir}/manifest.json is not the data {point.path} was trained on "
        f"({saved['num_classes']} classes then, {identity['num_classes']} now)"
    )
    if not allow_new_data:
        raise DMLError(
            f"--resume: {what}: resume on the original shards, or pass --allow-new-data to fine-tune on these"
        )
    point.new_data = True
    point.keep_head = saved["classes_sha256"] == identity["classes_sha256"]
    log.warning(
        "resume --allow-new-data: %s; continuing at step %s from the start of an epoch; %s",
        what,
        point.state["train_state"].get("step"),
        "same class list: the head's class centres are kept"
        if point.keep_head
        else "the class list differs: the head's class centres are re-initialised",
    )
    position = point.state["train_state"]
    for key in ("batch_in_epoch", "samples_in_epoch"):  # the old data's position means nothing here
        if key in position:
            position[key] = 0


def _choose(run_dir: Path, resume: bool, restarted: bool) -> tuple[ResumePoint | None, str | None]:
    """Rank 0's choice: (where to resume or None, refusal or None)."""
    if not list_checkpoints(run_dir):
        if resume and not restarted and not (run_dir / "config.yaml").is_file():
            return None, (
                f"--resume: there is no run at {run_dir} (no {CHECKPOINTS}/, no config.yaml): check "
                f"train.run_dir, or drop --resume to start a new run"
            )
        if resume or restarted:
            log.warning("resume: %s holds no checkpoint yet: training starts at step 0", run_dir)
        return None, None
    if not (resume or restarted):
        return None, f"{run_dir} already holds checkpoints: pass --resume to continue, or choose a new train.run_dir"
    try:
        found = newest_resumable(run_dir)
    except DMLError as exc:
        return None, f"--resume: {exc}"
    return (ResumePoint(*found) if found else None), None


def find_resume_point(run_dir: Path, resume: bool) -> ResumePoint | None:
    """The checkpoint to continue from (every rank agrees; collective), or None to start fresh.

    With ``resume`` (or after a torchrun restart) that is the newest checkpoint that reads back
    whole and finite; bad ones are skipped with a warning. Raises `DMLError` on every rank for
    a ``--resume`` with no run at ``run_dir``, for checkpoints without ``--resume``, and when
    no checkpoint can be resumed.
    """
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    point, refusal = _choose(run_dir, resume, restarted) if get_rank() == 0 else (None, None)
    path, refusal = broadcast_object((str(point.path) if point else None, refusal))
    if refusal:
        raise DMLError(refusal)
    problem = None
    if point is None and path is not None:  # ranks other than 0 read what rank 0 chose
        try:
            point = ResumePoint(Path(path), read_checkpoint(Path(path)))
        except DMLError as exc:
            problem = f"rank {get_rank()}: {exc}"
    problem = next((p for p in gather_objects(problem) if p), None)
    if problem:  # every rank stops together, none waits for the others at the next collective
        raise DMLError(f"--resume: {problem}")
    return point
