"""Atomic, resumable, world-size independent checkpoints; only resumable ones are kept.

A checkpoint is a folder ``<run>/checkpoints/step-NNNNNNNN/`` written as ``*.tmp`` and renamed
when complete, so a crash never leaves a half checkpoint under a final name. Every rank
writes its own rows of the partial-FC head (centres and their optimizer state) into
``head/`` in parallel (`dml.train.row_shards`: nothing is gathered, and a resume on any world
size reads only the rows each rank needs). ``state.pt`` is the commit record, written by
rank 0 last, after every rank has finished: it holds which global rows each head file holds,
the model, schedule, step, epoch, data position, the identity of the data and every rank's
RNG state. Checkpoints of the earlier gathered format (the full matrix inside ``state.pt``)
still load. The engine's state (the backbone optimizer) goes in ``optimizer-rank*.pt``, one
file per rank whose `Engine.state_dict` is not None (rank 0 only under DDP, whose state is
replicated; every rank's ZeRO partition under DeepSpeed), and is handed back to
`Engine.load_state_dict` as the list of those parts. Checkpoints written before that kept
the DDP state in ``state.pt`` under ``engine``; they resume as a one-part list. The last
``keep_last`` checkpoints are kept.

Only a checkpoint that can be resumed is written or read back:

- before writing, every tensor (model, head, optimizer state, SWA average) is checked to be
  finite on every rank; a non-finite state is not written (`NonFiniteState`);
- a write that fails (a full disk, say) removes the partial folder on every rank together and
  says where and that the previous checkpoint is intact (`CheckpointError`);
- `read_checkpoint` turns an unreadable, truncated, foreign or non-finite ``state.pt`` into a
  one-line `CheckpointError`; `newest_resumable` falls back past such folders with a warning;
- a checkpoint written just before a non-finite loss holds the weights that produced it, so
  `set_aside_diverged` renames it ``step-N.nonfinite`` (kept, never resumed from).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dml.distributed import barrier, gather_objects, get_rank, get_world_size
from dml.errors import DMLError, first_line
from dml.losses.shard_state import RowShardedState
from dml.train.row_shards import RowShardReader, check_index, write_row_shard

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
STATE = "state.pt"
HEAD_DIR = "head"
ENGINE_PART = "optimizer-rank{rank:05d}.pt"
DIVERGED_SUFFIX = ".nonfinite"
UNREADABLE_SUFFIX = ".unreadable"
_STEP_DIR = re.compile(r"step-\d{8}")
_REQUIRED = ("model", "train_state", "objective", "rng")


class CheckpointError(DMLError):
    """A checkpoint that cannot be written or resumed from; the message names it and why."""


class NonFiniteState(CheckpointError):
    """The state to checkpoint holds NaN or inf: it is not written, the run stops."""


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint of optimizer step ``step``: ``step-NNNNNNNN`` (8 digits)."""
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only``)."""
    numpy_state = np.random.get_state()
    assert isinstance(numpy_state, tuple)  # the legacy MT19937 tuple, numpy's default
    kind, keys, pos, has_gauss, cached = numpy_state
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore this process's Python, numpy, torch (and CUDA, where both sides have it) RNG
    states from an `rng_state` dict."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (``step-NNNNNNNN`` holding ``state.pt``), oldest first.

    Partial (``*.tmp``) and set-aside (``*.nonfinite``, ``*.unreadable``) folders are not listed.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / STATE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of ``run_dir`` (`list_checkpoints`), or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def first_non_finite(tree: Any, where: str = "") -> str | None:
    """Dotted path of the first floating tensor in ``tree`` (dicts, lists) holding NaN or inf."""
    if isinstance(tree, torch.Tensor):
        if (tree.is_floating_point() or tree.is_complex()) and not bool(torch.isfinite(tree).all()):
            return where or "tensor"
        return None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = first_non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def _first_problem(problem: str | None) -> str | None:
    """The first rank's problem (or None when no rank has one); collective."""
    return next((p for p in gather_objects(problem) if p), None)


def _no_space(exc: BaseException) -> bool:
    """True when ``exc`` or an exception it was raised from is ENOSPC / EDQUOT (torch wraps the
    OSError of a Python file object in an ``unexpected pos`` RuntimeError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _write(obj: Any, path: Path) -> None:
    """torch.save through a Python file (so a full disk surfaces as ENOSPC), then fsync."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _attempt(action, root: Path) -> str | None:
    """Run ``action``; None on success, else a one-line reason."""
    try:
        action()
        return None
    except Exception as exc:  # noqa: BLE001 - every failure becomes one agreed line on every rank
        if _no_space(exc):
            return f"the disk holding {root} is full (no space left on device)"
        return f"{type(exc).__name__}: {first_line(exc)}"


def _prepare_tmp(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step-*.tmp"):  # left by a crash; never a final checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()


def _previous(run_dir: str | Path) -> str:
    last = latest_checkpoint(run_dir)
    return f"the previous checkpoint {last} is intact" if last else "there is no earlier checkpoint"


def _write_rank_files(
    tmp: Path, rank: int, head: RowShardedState | None, engine_state: dict[str, Any] | None
) -> dict[str, Any] | None:
    """This rank's own files: its head rows (index record returned) and its engine part."""
    if engine_state is not None:
        _write(engine_state, tmp / ENGINE_PART.format(rank=rank))
    if head is None:
        return None
    (tmp / HEAD_DIR).mkdir(exist_ok=True)
    return write_row_shard(tmp / HEAD_DIR, rank, head.start, head.end, head.tensors)


def _write_all(
    root: Path,
    tmp: Path,
    state: dict[str, Any] | None,
    head: RowShardedState | None,
    engine_state: dict[str, Any] | None,
) -> str | None:
    """Every rank writes its files in parallel; then rank 0 writes ``state.pt`` (with every
    rank's row index) as the commit record, only once every rank has finished. Collective;
    returns the first rank's problem or None."""
    rank = get_rank()
    problem = _first_problem(_attempt(lambda: _prepare_tmp(root, tmp), root) if rank == 0 else None)
    if problem is not None:
        return problem
    record: list[Any] = [None]

    def write_own() -> None:
        record[0] = _write_rank_files(tmp, rank, head, engine_state)

    outcomes = gather_objects((_attempt(write_own, root), record[0]))
    problem = next((p for p, _ in outcomes if p), None)
    if problem is None and rank == 0:
        assert state is not None  # rank 0 builds the state
        if head is not None:
            state["objective"]["head"] = {**head.meta, "index": [r for _, r in outcomes]}
        problem = _attempt(lambda: _write(state, tmp / STATE), root)
    return _first_problem(problem)


def save_checkpoint(run_dir: str | Path, step: int, payload: dict[str, Any], objective, engine, keep_last: int) -> Path:
    """Write a checkpoint (collective: every rank calls it). Returns the final folder.

    The head's rows are written by the rank that holds them (nothing is gathered); the rest
    goes in rank 0's ``state.pt``, written last. Raises `NonFiniteState` (nothing written)
    when any tensor to save is NaN/inf on any rank, and `CheckpointError` on every rank when
    any rank's write fails (the partial folder is removed; earlier checkpoints are untouched).
    """
    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / step_dir_name(step), root / (step_dir_name(step) + ".tmp")
    rank, started = get_rank(), time.perf_counter()
    head = objective.head_shard_state()  # this rank's rows, or None
    objective_state = objective.full_state(include_head=False)  # collective
    rng_states = gather_objects(rng_state())
    engine_state = engine.state_dict()  # this rank's part, or None
    state = None
    if rank == 0:
        state = {**payload, "objective": objective_state, "rng": rng_states, "world_size": get_world_size()}
    bad = (
        first_non_finite(state)
        or first_non_finite(engine_state, "engine")
        or (first_non_finite(head.tensors, "objective.head") if head is not None else None)
    )
    bad = _first_problem(f"{bad} (rank {rank})" if bad else None)
    if bad:
        raise NonFiniteState(f"checkpoint for step {step} not written: {bad} holds NaN or inf; {_previous(run_dir)}")
    problem = _write_all(root, tmp, state, head, engine_state)
    if problem is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise CheckpointError(
            f"checkpoint for step {step} not written: {problem}; partial files removed; {_previous(run_dir)}"
        )
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: step %d -> %s (%.1f s)", step, final, time.perf_counter() - started)
    barrier()
    return final


def sharded_head(state: dict[str, Any]) -> dict[str, Any] | None:
    """The head entry of a checkpoint written with row shards (None: gathered or no head)."""
    head = (state.get("objective") or {}).get("head")
    return head if isinstance(head, dict) and "index" in head else None


def read_head_rows(path: Path, name: str = "weight", start: int = 0, end: int | None = None) -> torch.Tensor:
    """Rows ``[start, end)`` (default: all) of head tensor ``name`` (``weight``, or
    ``optimizer.<key>``) of the checkpoint folder ``path``, in either format, as a CPU tensor.
    For inspection and export of small heads; training resumes read only their own rows."""
    state = torch.load(Path(path) / STATE, map_location="cpu", weights_only=True, mmap=True)
    head = state["objective"]["head"]
    end = head["num_classes"] if end is None else end
    if sharded_head(state) is not None:
        return RowShardReader(Path(path) / HEAD_DIR, head["index"]).read(name, start, end)
    tensor = head["weight"] if name == "weight" else head["optimizer"]["state"][name.removeprefix("optimizer.")]
    return tensor[start:end].clone()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``path/state.pt`` as a dict, checked to be a complete, finite dml checkpoint.

    Loaded with ``weights_only=True`` (no arbitrary unpickling). Raises `CheckpointError`
    naming the file and the reason (unreadable/truncated/empty, not a dml checkpoint, NaN/inf).
    """
    file = Path(path) / STATE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise CheckpointError(
            f"{file} cannot be read (truncated, empty or not a torch file: {first_line(exc)})"
        ) from None
    if not isinstance(state, dict) or any(key not in state for key in _REQUIRED):
        raise CheckpointError(f"{file} is not a dml training checkpoint")
    bad = first_non_finite({key: state.get(key) for key in ("model", "objective", "engine", "swa")})
    if bad:
        raise CheckpointError(f"{file}: {bad} holds NaN or inf")
    head = sharded_head(state)
    problem = check_index(Path(path) / HEAD_DIR, head["index"], head["num_classes"]) if head else None
    if problem:
        raise CheckpointError(f"{path}: the head's row shards are not whole: {problem}")
    return state


def newest_resumable(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that `read_checkpoint` accepts, with its state; older ones are
    tried in turn with a warning naming each bad one, and once a good one is found the bad
    newer ones are renamed ``step-N.unreadable`` (kept, never listed). Rank 0 only. None when
    the run has no checkpoint.

    Raises `CheckpointError` when there are checkpoints but none can be resumed.
    """
    found = list_checkpoints(run_dir)
    problems, skipped = [], []
    for path in reversed(found):
        try:
            state = read_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            skipped.append(path)
            log.warning("resume: skipping %s: %s; trying the one before", path.name, exc)
            continue
        # Damaged newer checkpoints are set aside: left in the listing they would count towards
        # keep_last, and pruning would delete this good one before them.
        for bad in skipped:
            aside = bad.with_name(bad.name + UNREADABLE_SUFFIX)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
            log.warning("resume: set %s aside as %s", bad.name, aside.name)
        return path, state
    if problems:
        raise CheckpointError(f"no resumable checkpoint in {Path(run_dir) / CHECKPOINTS}: " + "; ".join(problems))
    return None


def restore_checkpoint(path: Path, state: dict[str, Any], objective, engine, with_head: bool = True) -> dict[str, Any]:
    """Install ``state`` (read from ``path``) into objective, optimizer and this rank's RNG.

    Works on any world size: the head is re-sliced from the full matrix; RNG states of ranks
    that did not exist when saving are left as seeded. ``with_head=False`` leaves the head
    (and centre loss) as freshly initialised. Returns ``state``.
    """
    head, started = sharded_head(state), time.perf_counter()
    if with_head and head is None:
        objective.load_full_state(state["objective"])
    elif with_head and head is not None:
        objective.load_full_state({**state["objective"], "head": None})
        objective.load_head_shard_state(head, RowShardReader(Path(path) / HEAD_DIR, head["index"]).read)
    engine.load_state_dict(engine_parts(path, state, weights_only=not engine.state_holds_objects))
    rank = get_rank()
    if rank < len(state["rng"]):
        set_rng_state(state["rng"][rank])
    if rank == 0:
        log.info("checkpoint: loaded %s in %.1f s", path, time.perf_counter() - started)
    return state


def engine_parts(path: Path, state: dict[str, Any], weights_only: bool = True) -> list[dict[str, Any]]:
    """The engine state parts of checkpoint ``path`` in rank order (``state`` is its state.pt).

    ``weights_only=False`` is for engines whose state holds objects (DeepSpeed's ZeRO state):
    those files are unpickled without restriction, so only resume from checkpoints you trust.
    """
    if state.get("engine") is not None:  # written before the engine state moved to its own files
        return [state["engine"]]
    files = sorted(Path(path).glob(ENGINE_PART.replace("{rank:05d}", "*")))
    return [torch.load(file, map_location="cpu", weights_only=weights_only) for file in files]


def load_checkpoint(path: Path, objective, engine) -> dict[str, Any]:
    """`read_checkpoint` then `restore_checkpoint`; returns the payload."""
    return restore_checkpoint(path, read_checkpoint(path), objective, engine)


def set_aside_diverged(run_dir: str | Path, last_step: int) -> str:
    """After a non-finite loss in the step that follows ``last_step``: set the checkpoint of
    ``last_step`` aside (it holds the weights that produced the loss) and say what is left.

    Every rank calls it (the listing is taken before rank 0 renames). Returns one clause:
    where the suspect went, and the last good checkpoint to resume from.
    """
    found = list_checkpoints(run_dir)
    barrier()
    suspect = found[-1] if found and found[-1].name == step_dir_name(last_step) else None
    good = found[-2] if suspect and len(found) > 1 else (None if suspect else (found[-1] if found else None))
    clause = ""
    if suspect is not None:
        aside = suspect.with_name(suspect.name + DIVERGED_SUFFIX)
        if get_rank() == 0:
            shutil.rmtree(aside, ignore_errors=True)  # an older set-aside copy of the same step
            os.replace(suspect, aside)
        clause = f"{suspect.name} holds the weights that produced it and was set aside as {aside}; "
    if good is None:
        return clause + "last good checkpoint: none (start again, without --resume, with a lower optimizer.lr)"
    return clause + f"last good checkpoint: {good} (continue from it with --resume and a lower optimizer.lr)"
