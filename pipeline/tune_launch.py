"""`dml pipeline tune`: each trial fold's `dml train` started by the configured stage launcher
(``pipeline.launcher``: local torchrun processes, a Kubernetes Job, or in process).

A fold is a `StageSpec` like the pipeline's train stage, its output folder the fold's run
folder; the tuner reads the fold's ``metrics.jsonl`` from that folder for pruning, so with
Kubernetes ``study.study_dir`` must be on the runs volume that the flow's machine mounts too.
The study's ``nproc_per_node`` replaces ``pipeline.nproc_per_node``, so a trial trains the
same way under every launcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dml.config import apply_overrides, load_config, read_config_file, validate_config
from dml.tune.launch import TrainFailed
from dml.tune.run import TunePlan, make_plan
from pipeline import stage_paths
from pipeline.config import PipelineConfig
from pipeline.errors import StageFailed
from pipeline.fingerprint import sections_digest
from pipeline.launchers import Launcher, build_launcher
from pipeline.stage_specs import TRAIN_SECTIONS, StageSpec

FOLD_STAGE = "tune-fold"


def load_tune_inputs(config_path: str, space_path: str, overrides: list[str]) -> tuple[TunePlan, PipelineConfig]:
    """The tuning plan of the run config without its ``pipeline`` section, and that section.

    Raises `ConfigError` (one line naming the file or keys) on any problem.
    """
    data: dict[str, Any] = apply_overrides(read_config_file(config_path), overrides)
    settings = validate_config(data.pop("pipeline", None) or {}, PipelineConfig)
    return make_plan(data, space_path), settings


def fold_spec(config_path: Path, run_dir: Path) -> StageSpec:
    """The stage that trains the fold config at ``config_path`` into ``run_dir``."""
    config = load_config(config_path)
    inputs = {"config": sections_digest(config, TRAIN_SECTIONS), "run_dir": str(run_dir)}
    return StageSpec(
        FOLD_STAGE, "train", config, run_dir, stage_paths.MODEL_FILE, inputs, distributed=True, resumable=True
    )


@dataclass
class LauncherFoldTrainer:
    """A `dml.tune.launch.FoldTrainer` that launches the fold with ``pipeline.launcher``."""

    settings: PipelineConfig

    def launcher(self, nproc_per_node: int) -> Launcher:
        """The configured launcher with the study's processes per fold."""
        return build_launcher(self.settings.model_copy(update={"nproc_per_node": nproc_per_node}))

    def __call__(self, config_path: Path, run_dir: Path, nproc_per_node: int) -> None:
        """Train the fold to its end; raises `TrainFailed` with the launcher's reason and log."""
        try:
            self.launcher(nproc_per_node).launch(fold_spec(config_path, run_dir), resume=False)
        except StageFailed as exc:
            raise TrainFailed(str(exc)) from exc
