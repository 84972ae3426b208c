"""How a trial fold's training is started: an injected `FoldTrainer` is watched through the
run folder's metrics.jsonl (pruning included), and `dml pipeline tune` builds the fold's
stage for the configured launcher (the Kubernetes Job rendered offline: no cluster here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dml.config import load_config
from dml.tune.launch import TrainFailed, run_training
from dml.tune.space import with_values
from dml.tune.trial import fold_overrides, write_run_config
from pipeline.launchers import KubernetesLauncher, TorchrunLauncher
from pipeline.tune_launch import LauncherFoldTrainer, fold_spec, load_tune_inputs
from train_fixtures import tiny_train_config
from tune_fixtures import write_tune_files


def _writing_trainer(count: int, fail: bool = False):
    """A trainer that appends ``count`` validation records to the run folder's metrics.jsonl."""

    def train(config_path: Path, run_dir: Path, nproc_per_node: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "metrics.jsonl").open("a") as handle:
            for step in range(count):
                handle.write(json.dumps({"step": step, "eval_map_at_r": step / 10}) + "\n")
        if fail:
            raise TrainFailed("dml train exited 1")

    return train


@pytest.mark.parametrize("count", [0, 1, 5])
def test_injected_trainer_reports_every_record(tmp_path: Path, count: int) -> None:
    seen: list[float] = []

    def on_record(record: dict) -> bool:
        seen.append(record["eval_map_at_r"])
        return False

    finished = run_training(tmp_path / "fold.yaml", tmp_path / "fold-0", 1, on_record, _writing_trainer(count))
    assert finished and seen == [step / 10 for step in range(count)]


@pytest.mark.parametrize("stop_at", [0, 2])
def test_injected_trainer_stops_reporting_once_pruned(tmp_path: Path, stop_at: int) -> None:
    seen: list[float] = []

    def on_record(record):
        seen.append(record["eval_map_at_r"])
        return len(seen) > stop_at

    assert not run_training(tmp_path / "fold.yaml", tmp_path / "fold-0", 1, on_record, _writing_trainer(5))
    assert seen[: stop_at + 1] == [step / 10 for step in range(stop_at + 1)]  # reported in order up to the stop


def test_injected_trainer_failure_reaches_the_trial(tmp_path):
    with pytest.raises(TrainFailed, match="exited 1"):
        run_training(tmp_path / "fold.yaml", tmp_path / "fold-0", 1, lambda record: False, _writing_trainer(2, True))


def _fold_config(tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "study" / "trials" / "trial-0003" / "fold-1"
    base = tiny_train_config(tmp_path / "shards", tmp_path / "run")
    path = write_run_config(
        with_values(base, fold_overrides(tmp_path / "folds" / "fold-1", run_dir)),
        tmp_path / "study" / "trials" / "trial-0003" / "fold-1.yaml",
    )
    return path, run_dir


def test_kubernetes_fold_job_trains_the_fold_config(tmp_path):
    run, space = write_tune_files(tmp_path, {"loss.margin": [0.1, 0.3]}, n_trials=2, folds=2, nproc_per_node=2)
    plan, settings = load_tune_inputs(str(run), str(space), ["pipeline.launcher=kubernetes", "pipeline.image=x:1"])
    assert "pipeline" not in plan.base  # dml.tune sees a plain run config
    config_path, run_dir = _fold_config(tmp_path)
    launcher = LauncherFoldTrainer(settings).launcher(plan.settings.nproc_per_node)
    assert isinstance(launcher, KubernetesLauncher)
    config_map, job = launcher.manifests(fold_spec(config_path, run_dir), resume=False)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "x:1"
    command = container["command"]
    assert command[command.index("--nproc_per_node") + 1] == "2"  # the study's processes per fold
    assert command[-3:] == ["train", "--config", "/etc/dml/config.yaml"]
    mounted = yaml.safe_load(config_map["data"]["config.yaml"])
    assert mounted == load_config(config_path).model_dump(mode="json")  # the fold's config, resolved
    assert mounted["train"]["run_dir"] == str(run_dir)  # the shared folder the tuner reads metrics from
    assert mounted["data"]["shard_dir"] == str(tmp_path / "folds" / "fold-1")


def test_default_launcher_runs_the_fold_under_torchrun(tmp_path):
    run, space = write_tune_files(tmp_path, {"loss.margin": [0.1]}, n_trials=1, folds=2)
    plan, settings = load_tune_inputs(str(run), str(space), [])
    config_path, run_dir = _fold_config(tmp_path)
    launcher = LauncherFoldTrainer(settings).launcher(plan.settings.nproc_per_node)
    assert isinstance(launcher, TorchrunLauncher)
    argv = launcher.command(fold_spec(config_path, run_dir), config_path, resume=False)
    assert argv[-3:] == ["train", "--config", str(config_path)] and "torch.distributed.run" in argv
