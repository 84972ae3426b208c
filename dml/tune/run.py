"""`dml tune`: folds, study, final retrain and test, report; one function for the CLI and for
`pipeline` (whose flow calls the same steps with trials as mapped tasks)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dml.config import apply_overrides, read_config_file, validate_config
from dml.errors import ConfigError, DMLError
from dml.tune.final import retrain_and_test, test_metrics
from dml.tune.folds import class_folds, training_classes, write_fold_shards
from dml.tune.launch import FoldTrainer
from dml.tune.report import summary_lines, write_best_config, write_plots, write_report
from dml.tune.settings import StudySettings, load_settings
from dml.tune.space import SearchSpace, load_space
from dml.tune.study import fit_trials_to_grid, make_sampler, open_study, run_trials
from dml.tune.trial import TrialRunner

log = logging.getLogger(__name__)


@dataclass
class TunePlan:
    """A checked tuning job: the run config mapping, the search space and the study settings."""

    base: dict[str, Any]
    space: SearchSpace
    settings: StudySettings

    @property
    def study_dir(self) -> Path:
        """The study's folder (``study.study_dir``)."""
        return Path(self.settings.study_dir)


@dataclass
class TuneResult:
    """Where a finished study's outputs are, and its summary lines."""

    best_config: str
    report_path: str
    lines: list[str]


def load_plan(config_path: str | Path, space_path: str | Path, overrides: list[str] | None = None) -> TunePlan:
    """Read and check the run config (with overrides) and the search-space file; raises
    `ConfigError` (one line naming the file) on any problem."""
    return make_plan(apply_overrides(read_config_file(config_path), overrides or []), space_path)


def make_plan(base: dict[str, Any], space_path: str | Path) -> TunePlan:
    """`load_plan` for a run config mapping already read; raises `ConfigError` on any problem."""
    validate_config(base)
    space = load_space(space_path, base)
    settings = load_settings(space.study, str(space_path))
    try:
        make_sampler(settings, space)  # e.g. a grid over a range without a step: refused before any folder is written
    except ConfigError as exc:
        raise ConfigError(f"{space_path}: {exc}") from None
    settings = fit_trials_to_grid(settings, space)
    return TunePlan(base, space, settings)


def prepare_folds(plan: TunePlan) -> list[Path]:
    """The fold shard folders (written once, under ``<study_dir>/folds``)."""
    config = validate_config(plan.base, check_backbones=False)
    classes = training_classes(config.data.shard_dir, config.data.train_split)
    folds = class_folds(classes, plan.settings.folds, plan.settings.fold_seed)
    return write_fold_shards(config.data.shard_dir, config.data.train_split, folds, plan.study_dir / "folds")


def trial_runner(plan: TunePlan, train_fold: FoldTrainer | None = None) -> TrialRunner:
    """The runner of this plan's trials over its folds (written on first use); each fold
    trains as a local `dml train` child unless ``train_fold`` is given."""
    return TrialRunner(
        plan.base, plan.space, prepare_folds(plan), plan.study_dir, plan.settings.nproc_per_node, train_fold
    )


def finish_study(plan: TunePlan, study: Any) -> TuneResult:
    """best.yaml, the seeds' retrain and test, the concatenated fold models, plots, report.

    Raises DMLError when the study has no complete trial.
    """
    settings = plan.settings
    try:
        best = study.best_trial
    except ValueError:
        raise DMLError(f"tune: study '{settings.name}' has no complete trial (all pruned or failed)") from None
    best_path = write_best_config(plan.base, best.params, plan.study_dir / "best.yaml")
    log.info("tune: best trial %d (validation MAP@R %.4f) -> %s", best.number, best.value, best_path)
    base = validate_config(plan.base)
    test = retrain_and_test(
        read_config_file(best_path),
        settings.seeds,
        plan.study_dir / "final",
        settings.parallel,
        settings.nproc_per_node,
    )
    extra: dict[str, Any] = {
        "best_config": str(best_path),
        "test": test,
        "plots": write_plots(study, plan.study_dir / "plots"),
    }
    if settings.concatenated_embedding:
        trial_dir = Path(best.user_attrs["trial_dir"])
        fold_models = sorted(trial_dir.glob("fold-*/model.pt"))
        extra["concatenated"] = test_metrics([p.parent for p in fold_models], base, concatenate=True)[0]
    report_path = write_report(study, plan.study_dir / "report.json", extra)
    report = {"best": {"number": best.number, "value": best.value, "params": best.params}, **extra}
    return TuneResult(str(best_path), str(report_path), summary_lines(report))


def run_tune(
    config_path: str | Path, space_path: str | Path, overrides: list[str] | None = None, resume: bool = False
) -> TuneResult:
    """The whole `dml tune`: check inputs, write folds, search, then `finish_study`.

    Raises `ConfigError` for bad files, `DMLError` when too many trials fail or none completes.
    """
    plan = load_plan(config_path, space_path, overrides)
    runner = trial_runner(plan)  # writes the folds first: a data error must not leave a study behind
    study = open_study(plan.settings, plan.space, resume)
    log.info(
        "tune: study '%s' -> %s (%d trials, %d folds, %d at a time)",
        plan.settings.name,
        plan.study_dir,
        plan.settings.n_trials,
        plan.settings.folds,
        plan.settings.parallel,
    )
    run_trials(study, runner, plan.settings)
    return finish_study(plan, study)
