"""Atomic, resumable, world-size independent checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step-NNNNNNNN/`` written as ``*.tmp`` and renamed
when complete, so a crash never leaves a half checkpoint under a final name. ``state.pt``
holds the model, the full partial-FC matrix with its optimizer state, the backbone optimizer
(replicated under DDP), schedule, step, epoch, data position and every rank's RNG state.
DeepSpeed's ZeRO optimizer partitions go in ``optimizer-rank*.pt`` (same world size only).
The last ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dml.distributed import barrier, get_rank, get_world_size

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
STATE = "state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / STATE).exists())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _gather_objects(obj: Any) -> list[Any]:
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(run_dir: str | Path, step: int, payload: dict[str, Any], objective, engine,
                    keep_last: int) -> Path:
    """Write a checkpoint (collective: every rank calls it). Returns the final folder."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    rank = get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    objective_state = objective.full_state()  # collective; full matrix on rank 0
    rng_states = _gather_objects(rng_state())
    if engine.per_rank_optimizer_state:
        torch.save(engine.optimizer_state(), tmp / f"optimizer-rank{rank:05d}.pt")
    if rank == 0:
        state = {**payload, "objective": objective_state, "rng": rng_states, "world_size": get_world_size(),
                 "engine": None if engine.per_rank_optimizer_state else engine.optimizer_state()}
        torch.save(state, tmp / (STATE + ".tmp"))
        os.replace(tmp / (STATE + ".tmp"), tmp / STATE)
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: step %d -> %s", step, final)
    barrier()
    return final


def load_checkpoint(path: Path, objective, engine) -> dict[str, Any]:
    """Restore objective, optimizer and this rank's RNG from ``path``; return the payload.

    Works on any world size: the head is re-sliced from the full matrix; RNG states of ranks
    that did not exist when saving are left as seeded.
    """
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    objective.load_full_state(state["objective"])
    rank = get_rank()
    if engine.per_rank_optimizer_state:
        parts = sorted(path.glob("optimizer-rank*.pt"))
        engine.load_optimizer_state([torch.load(p, map_location="cpu", weights_only=False) for p in parts])
    elif state.get("engine") is not None:
        engine.load_optimizer_state(state["engine"])
    if rank < len(state["rng"]):
        set_rng_state(state["rng"][rank])
    return state
