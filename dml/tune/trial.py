"""One trial: the sampled values trained once per fold (each an ordinary `dml train` run
folder), scored by the mean validation MAP@R over the folds.

Every validation MAP@R a fold logs while training is reported to Optuna as an intermediate
value (steps counted across the trial's folds, so one step means the same budget in every
trial) and the pruner may stop the trial there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from dml.config import validate_config
from dml.tune.launch import FAIL_REASON, FoldTrainer, TrainFailed, run_training
from dml.tune.space import SearchSpace, with_values

log = logging.getLogger(__name__)

METRIC = "eval_map_at_r"


def fold_overrides(fold_shards: Path, run_dir: Path) -> dict[str, Any]:
    """What makes a trial's config train on one fold: its shards, its run folder, and
    leave-one-out validation on the fold's held-out classes (its ``query`` split)."""
    return {
        "data.shard_dir": str(fold_shards),
        "data.train_split": "train",
        "train.run_dir": str(run_dir),
        "train.eval_split": "query",
        "train.eval_gallery_split": None,
    }


def write_run_config(data: dict[str, Any], path: Path) -> Path:
    """Validate ``data`` as a run config and write it as YAML (`dml train --config` takes it)."""
    validate_config(data, check_backbones=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class TrialRunner:
    """The objective Optuna calls: ``base`` is the run config mapping, ``fold_shards`` the
    fold shard folders, trials go to ``<study_dir>/trials/trial-NNNN/fold-I``; ``train_fold``
    trains a fold instead of a local `dml train` child (see `dml.tune.launch.FoldTrainer`)."""

    base: dict[str, Any]
    space: SearchSpace
    fold_shards: list[Path]
    study_dir: Path
    nproc_per_node: int = 1
    train_fold: FoldTrainer | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except TrainFailed as exc:  # Optuna logs a caught exception but keeps no reason on the trial
            trial.set_user_attr(FAIL_REASON, str(exc))
            raise

    def _run(self, trial: optuna.Trial) -> float:
        values = self.space.suggest(trial)
        trial_dir = self.study_dir / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("trial_dir", str(trial_dir))
        step = 0
        scores: list[float] = []
        for index, shards in enumerate(self.fold_shards):
            run_dir = trial_dir / f"fold-{index}"
            config_path = write_run_config(
                with_values(self.base, {**values, **fold_overrides(shards, run_dir)}), trial_dir / f"fold-{index}.yaml"
            )
            final: dict[str, Any] = {}

            def on_record(record: dict[str, Any], final: dict[str, Any] = final) -> bool:
                nonlocal step
                if METRIC not in record:
                    return False
                if record.get("final"):
                    final.update(record)
                step += 1
                trial.report(float(record[METRIC]), step)
                return trial.should_prune()

            if not run_training(config_path, run_dir, self.nproc_per_node, on_record, self.train_fold):
                log.info("tune: trial %d pruned in fold %d (%s)", trial.number, index, run_dir)
                raise optuna.TrialPruned(f"pruned in fold {index} at step {step}")
            if METRIC not in final:
                raise TrainFailed(f"{run_dir}: training logged no final {METRIC} (validation split missing?)")
            scores.append(float(final[METRIC]))
            trial.set_user_attr("fold_map_at_r", scores)
        return sum(scores) / len(scores)
