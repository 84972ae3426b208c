"""Checkpoints whose partial-FC head is written row-sharded by every rank and read back on any
world size; the earlier gathered format still loads; a process killed mid-save leaves the
previous checkpoint as the newest.

Real pieces: the real model, DDP engine, objective and head optimizer, real gloo process
groups of 3 (save) and 1, 2, 4 (load), and a real SIGKILL of a saving process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dml.config import DMLConfig
from dml.models.model_file import build_model
from dml.train.checkpoint import (
    HEAD_DIR,
    STATE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from dml.train.engine import DDPEngine
from dml.train.objective import Objective
from dml.train.optimizers import OptimizersContainer
from dml.train.row_shards import RowShardReader, write_row_shard
from local_group import spawn_local_group
from train_fixtures import tiny_train_config

CLASSES = 11  # 3 ranks hold 4, 4, 3 rows; 2 ranks 6, 5; 4 ranks 3, 3, 3, 2: every boundary moves
ROOT = Path(__file__).resolve().parents[1]


def build_parts(run_dir: Path, head_optimizer: str = "sgd", sample_rate: float = 0.5):
    config = DMLConfig.model_validate(
        tiny_train_config(
            run_dir / "no-shards",
            run_dir,
            loss={
                "kind": "arcface",
                "scale": 16.0,
                "margin": 0.2,
                "sample_rate": sample_rate,
                "head_optimizer": head_optimizer,
            },
        )
    )
    torch.manual_seed(0)
    engine = DDPEngine(build_model(config), config, torch.device("cpu"))
    return config, engine, Objective(config, CLASSES, torch.device("cpu"))


def train_steps(engine, objective, steps: int, rank: int = 0) -> None:
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 * step + rank)
        images = torch.randn(4, 3, 32, 32, generator=generator)
        labels = torch.randint(0, CLASSES, (4,), generator=generator)
        optimizers = OptimizersContainer(engine, objective.optimizers, grad_accum=1)
        loss, _ = objective(engine.forward(images), labels)
        optimizers.backward(loss)
        assert optimizers.step()


def payload(config, engine, step: int) -> dict:
    return {
        "model": engine.model.state_dict(),
        "schedule": {"step_count": step, "total_steps": 10},
        "train_state": {"epoch": 0, "batch_in_epoch": step, "step": step, "images_seen": 4 * step},
        "swa": None,
        "config": config.model_dump(mode="json"),
        "data_identity": None,
    }


def full_head(objective) -> dict | None:
    """The gathered head (weights, optimizer state, sampler) on rank 0, for comparison."""
    return objective.head.full_state_dict(objective.optimizers["head"])


def save_worker(info, run_dir: str, head_optimizer: str):
    config, engine, objective = build_parts(Path(run_dir), head_optimizer)
    train_steps(engine, objective, 3, info.rank)
    save_checkpoint(run_dir, 3, payload(config, engine, 3), objective, engine, keep_last=2)
    return full_head(objective)


def load_worker(info, run_dir: str, head_optimizer: str):
    _config, engine, objective = build_parts(Path(run_dir), head_optimizer)
    path = latest_checkpoint(run_dir)
    assert path is not None
    state = load_checkpoint(path, objective, engine)
    return {
        "head": full_head(objective),
        "step": state["train_state"]["step"],
        "rows": (objective.head.class_start, objective.head.class_end),
    }


def assert_same_head(saved: dict, loaded: dict) -> None:
    assert torch.equal(saved["weight"], loaded["weight"])
    assert saved["sampler"] == loaded["sampler"]
    assert saved["optimizer"]["name"] == loaded["optimizer"]["name"]
    assert saved["optimizer"]["state"].keys() == loaded["optimizer"]["state"].keys()
    for key, value in saved["optimizer"]["state"].items():
        assert torch.equal(value, loaded["optimizer"]["state"][key]), key


@pytest.mark.dist
def test_saved_on_3_ranks_loads_bit_for_bit_on_1_2_and_4(tmp_path):
    run = tmp_path / "run"
    saved = spawn_local_group(save_worker, 3, args=(str(run), "sgd"))[0]
    checkpoint = latest_checkpoint(run)
    index = read_checkpoint(checkpoint)["objective"]["head"]["index"]
    assert [(r["rank"], r["start"], r["end"]) for r in index] == [(0, 0, 4), (1, 4, 8), (2, 8, 11)]
    assert "weight" not in torch.load(checkpoint / STATE, weights_only=True)["objective"]["head"]  # not gathered
    assert float(saved["optimizer"]["state"]["momentum_buffer"].abs().sum()) > 0
    for world in (1, 2, 4):  # world 1 in this process: one fewer process start
        results = (
            [load_worker(None, str(run), "sgd")]
            if world == 1
            else spawn_local_group(load_worker, world, args=(str(run), "sgd"))
        )
        assert_same_head(saved, results[0]["head"])
        assert [r["step"] for r in results] == [3] * world
        assert results[-1]["rows"][1] == CLASSES


def test_adamw_head_round_trips_in_one_process(tmp_path):
    """AdamW's per-row state includes a (rows,) step count: a 1-D row-sharded tensor."""
    config, engine, objective = build_parts(tmp_path, "adamw")
    train_steps(engine, objective, 2)
    save_checkpoint(tmp_path, 2, payload(config, engine, 2), objective, engine, keep_last=1)
    _, engine2, fresh = build_parts(tmp_path, "adamw")
    load_checkpoint(latest_checkpoint(tmp_path), fresh, engine2)
    assert_same_head(full_head(objective), full_head(fresh))
    assert fresh.optimizers["head"].row_state()["row_step"].dim() == 1


def test_gathered_format_checkpoint_still_loads(tmp_path):
    """A checkpoint written before row shards (the full matrix inside state.pt) resumes."""
    config, engine, objective = build_parts(tmp_path)
    train_steps(engine, objective, 2)
    folder = tmp_path / "checkpoints" / step_dir_name(2)
    folder.mkdir(parents=True)
    old = {
        **payload(config, engine, 2),
        "objective": objective.full_state(),
        "rng": [],
        "world_size": 1,
        "engine": engine.state_dict(),
    }
    torch.save(old, folder / STATE)
    _, engine2, fresh = build_parts(tmp_path)
    load_checkpoint(latest_checkpoint(tmp_path), fresh, engine2)
    assert_same_head(full_head(objective), full_head(fresh))


def test_a_truncated_head_file_is_one_line_naming_it(tmp_path):
    config, engine, objective = build_parts(tmp_path)
    train_steps(engine, objective, 1)
    path = save_checkpoint(tmp_path, 1, payload(config, engine, 1), objective, engine, keep_last=1)
    victim = next((path / HEAD_DIR).glob("weight.*"))
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=f"{victim.name}.*truncated"):
        read_checkpoint(path)


@pytest.mark.parametrize("rows,parts,window", [(7, [7], (0, 7)), (10, [3, 3, 4], (2, 9)), (5, [1, 1, 1, 1, 1], (1, 4))])
def test_reader_returns_any_row_range_of_any_split(tmp_path, monkeypatch, rows, parts, window):
    """Property over splits and windows, with a copy chunk of 2 rows so reads cross chunks."""
    monkeypatch.setattr("dml.train.row_shards.CHUNK_BYTES", 2 * 3 * 4 * 2)
    full = {
        "w": torch.arange(rows * 6, dtype=torch.float32).reshape(rows, 2, 3),
        "m": torch.arange(rows, dtype=torch.bfloat16),
    }
    index, start = [], 0
    for rank, size in enumerate(parts):
        index.append(
            write_row_shard(tmp_path, rank, start, start + size, {k: v[start : start + size] for k, v in full.items()})
        )
        start += size
    reader = RowShardReader(tmp_path, index)
    lo, hi = window
    for name, tensor in full.items():
        assert torch.equal(reader.read(name, lo, hi), tensor[lo:hi])
    strided = torch.empty(2, hi - lo, 3).transpose(0, 1)  # not contiguous: read through the buffer
    assert torch.equal(reader.read("w", lo, hi, strided), full["w"][lo:hi])


_KILLED_SAVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import dml.train.checkpoint as checkpoint
from test_sharded_checkpoint import build_parts, payload, train_steps
run = Path({run!r})
config, engine, objective = build_parts(run)
train_steps(engine, objective, 1)
checkpoint.save_checkpoint(run, 1, payload(config, engine, 1), objective, engine, keep_last=3)
train_steps(engine, objective, 1)
real_write = checkpoint.write_row_shard
def write_then_hang(*args, **kwargs):
    record = real_write(*args, **kwargs)
    (run / "head-rows-written").touch()
    time.sleep(120)  # killed here: head rows on disk, commit record not yet written
    return record
checkpoint.write_row_shard = write_then_hang
checkpoint.save_checkpoint(run, 2, payload(config, engine, 2), objective, engine, keep_last=3)
"""


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_newest(tmp_path):
    run = tmp_path / "run"
    code = _KILLED_SAVER.format(tests=str(ROOT / "tests"), run=str(run))
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300
        while not (run / "head-rows-written").exists():
            assert proc.poll() is None, "the saving process ended before reaching the kill point"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (run / "checkpoints" / (step_dir_name(2) + ".tmp") / HEAD_DIR).is_dir()  # killed mid-save
    assert latest_checkpoint(run).name == step_dir_name(1)
    config, engine, objective = build_parts(run)
    assert load_checkpoint(latest_checkpoint(run), objective, engine)["train_state"]["step"] == 1
    save_checkpoint(run, 2, payload(config, engine, 2), objective, engine, keep_last=3)
    assert latest_checkpoint(run).name == step_dir_name(2)
    assert not list((run / "checkpoints").glob("*.tmp"))
