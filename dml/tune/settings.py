"""The ``study`` section of a search-space file: protocol, budget, sampler, pruner, storage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dml.config import StrictModel, validate_config


class StudySettings(StrictModel):
    """How `dml tune` searches (defaults follow "A Metric Learning Reality Check").

    ``folds`` class-disjoint folds of the training classes, each trial trains one model per
    fold; ``n_trials`` finished (complete or pruned) trials end the search; ``parallel``
    trials run at once as local processes, each training with ``nproc_per_node`` processes
    (torchrun when above 1); ``storage`` is any SQLAlchemy URL (None: SQLite file
    ``study.db`` in ``study_dir``); the best values are retrained with ``seeds`` seeds and
    tested once on the held-out classes.
    """

    study_dir: str = "runs/tune"
    name: str = "dml-tune"
    storage: str | None = None
    n_trials: int = Field(20, ge=1)
    folds: int = Field(4, ge=2)
    fold_seed: int = 0
    parallel: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    sampler_seed: int | None = 0
    pruner: Literal["median", "hyperband", "none"] = "median"
    # Trials that must finish before the median pruner prunes; evaluations before it prunes.
    startup_trials: int = Field(2, ge=0)
    warmup_steps: int = Field(1, ge=0)
    max_failed_trials: int = Field(3, ge=1)  # failures (not kills) in one invocation stop the study
    seeds: int = Field(5, ge=1)
    concatenated_embedding: bool = True


def load_settings(study: dict[str, Any], where: str) -> StudySettings:
    """Validate the ``study`` mapping; raises `ConfigError` (one line naming ``where``)."""
    from dml.errors import ConfigError

    try:
        return validate_config(study, StudySettings)
    except ConfigError as exc:
        raise ConfigError(f"{where}: study: {exc}") from None
