"""Checkpoints that can be trusted: never written non-finite, never half-written on a full
disk (which is said in one line), and a damaged ``model.pt`` is one line in evaluate/export.

Real pieces throughout: the real model, DDP engine, partial-FC objective and optimizers, a
real tmpfs that fills up, 2 real gloo processes, and the real `dml` command.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from dml.cli import main
from dml.config import DMLConfig
from dml.distributed import get_rank
from dml.models.model_file import build_model, save_final_model
from dml.train.checkpoint import CheckpointError, NonFiniteState, list_checkpoints, read_checkpoint, save_checkpoint
from dml.train.engine import DDPEngine
from dml.train.objective import Objective
from dml.train.optimizers import OptimizersContainer
from local_group import spawn_local_group
from small_disk import mounted_tmpfs
from train_fixtures import tiny_shards, tiny_train_config

CLASSES = 6


def trained_parts(shards: Path, run_dir: Path):
    """(config, engine, objective) after one real optimizer step, so optimizer state exists."""
    config = DMLConfig.model_validate(tiny_train_config(shards, run_dir))
    torch.manual_seed(0)
    engine = DDPEngine(build_model(config), config, torch.device("cpu"))
    objective = Objective(config, CLASSES, torch.device("cpu"))
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6) % CLASSES
    optimizers = OptimizersContainer(engine, objective.optimizers, grad_accum=1)
    loss, _ = objective(engine.forward(images), labels)
    optimizers.backward(loss)
    assert optimizers.step()
    return config, engine, objective


def payload(config: DMLConfig, engine: DDPEngine, step: int) -> dict:
    return {
        "model": engine.model.state_dict(),
        "schedule": {"step_count": step, "total_steps": 10},
        "train_state": {"epoch": 0, "batch_in_epoch": step, "step": step, "images_seen": 6 * step},
        "swa": None,
        "config": config.model_dump(mode="json"),
        "data_identity": None,
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("data"), classes=CLASSES)


def _poison_model(engine, objective):
    next(engine.model.parameters()).data[0].fill_(float("nan"))


def _poison_head(engine, objective):
    objective.head.weight.data[1, 0] = float("inf")


def _poison_optimizer(engine, objective):
    state = next(iter(engine.optimizer.state.values()))
    state["momentum_buffer"].view(-1)[0] = float("nan")


@pytest.mark.parametrize("poison", [_poison_model, _poison_head, _poison_optimizer])
def test_a_non_finite_state_is_not_written(tmp_path, shards, poison):
    config, engine, objective = trained_parts(shards, tmp_path / "run")
    save_checkpoint(tmp_path / "run", 1, payload(config, engine, 1), objective, engine, keep_last=3)
    poison(engine, objective)
    with pytest.raises(
        NonFiniteState,
        match=r"step 2 not written: .* holds NaN or inf; the previous "
        r"checkpoint .*step-00000001 is intact",
    ):
        save_checkpoint(tmp_path / "run", 2, payload(config, engine, 2), objective, engine, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000001"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000001"]
    read_checkpoint(list_checkpoints(tmp_path / "run")[0])  # the one kept reads back finite


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (needs root and mount); skipped with the reason where it cannot be made."""
    with mounted_tmpfs(tmp_path / "disk", "16m") as mount:
        yield mount


def fill_disk(mount: Path, leave_bytes: int) -> Path:
    filler = mount / "filler"
    free = shutil.disk_usage(mount).free
    with open(filler, "wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_disk_full_keeps_the_previous_checkpoint_and_says_where(small_disk, shards):
    run = small_disk / "run"
    config, engine, objective = trained_parts(shards, run)
    save_checkpoint(run, 2, payload(config, engine, 2), objective, engine, keep_last=1)
    size = (run / "checkpoints" / "step-00000002" / "state.pt").stat().st_size
    filler = fill_disk(small_disk, size // 3)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(run, 4, payload(config, engine, 4), objective, engine, keep_last=1)
    message = str(caught.value)
    assert "\n" not in message and "unexpected pos" not in message
    assert f"the disk holding {run / 'checkpoints'} is full" in message
    assert "partial files removed" in message and "step-00000002 is intact" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]  # no .tmp left
    assert read_checkpoint(run / "checkpoints" / "step-00000002")["train_state"]["step"] == 2
    filler.unlink()  # with space again, the next checkpoint is written and the old one pruned
    save_checkpoint(run, 4, payload(config, engine, 4), objective, engine, keep_last=1)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]


def disk_full_worker(info, shards: Path, mount: Path) -> str:
    run = mount / "run"
    config, engine, objective = trained_parts(shards, run)
    save_checkpoint(run, 1, payload(config, engine, 1), objective, engine, keep_last=3)
    if get_rank() == 0:
        fill_disk(mount, 64 * 1024)
    torch.distributed.barrier()
    try:
        save_checkpoint(run, 2, payload(config, engine, 2), objective, engine, keep_last=3)
    except CheckpointError as exc:
        return str(exc)
    return "written"


@pytest.mark.dist
def test_disk_full_on_two_processes_stops_both_ranks_with_the_same_line(small_disk, shards):
    messages = spawn_local_group(disk_full_worker, 2, args=(shards, small_disk))
    assert messages[0] == messages[1] and "is full" in messages[0] and "step-00000001 is intact" in messages[0]
    assert sorted(p.name for p in (small_disk / "run" / "checkpoints").iterdir()) == ["step-00000001"]


def _truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def _non_dml_torch_file(tmp_path: Path) -> bytes:
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(3)}, other)
    return other.read_bytes()


def _pickled_module(tmp_path: Path) -> bytes:
    other = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), other)  # a whole pickled module: refused, never unpickled
    return other.read_bytes()


DAMAGE = {
    "truncated": lambda good, tmp: _truncated(good),
    "empty": lambda good, tmp: b"",
    "random bytes": lambda good, tmp: os.urandom(4096),
    "non-dml torch file": lambda good, tmp: _non_dml_torch_file(tmp),
    "pickled module": lambda good, tmp: _pickled_module(tmp),
}


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_damaged_model_file_is_one_line(tmp_path, shards, command, capsys):
    config = DMLConfig.model_validate(tiny_train_config(shards, tmp_path / "run"))
    good = tmp_path / "good.pt"
    save_final_model(build_model(config), config, good, data_digest="x")
    for kind, damage in DAMAGE.items():
        bad = tmp_path / kind.replace(" ", "_") / "model.pt"
        bad.parent.mkdir()
        bad.write_bytes(damage(good.read_bytes(), tmp_path))
        code = main(
            [
                command,
                f"data.shard_dir={shards}",
                f"{command}.model_path={bad}",
                f"{command}.output_dir={tmp_path / 'out'}",
                "evaluate.gallery_split=null",
            ]
        )
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith(f"dml {command}: error:")]
        assert code == 2, kind
        assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in err, (kind, err)
