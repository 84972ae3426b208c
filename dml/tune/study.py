"""The Optuna study: RDB storage, sampler, pruner, resuming a killed study, parallel trials.

A study killed mid-way leaves its running trials in the RUNNING state; resuming marks each
of them FAILED (never counted) and queues its values again, so the trial is retried. The
search ends when ``n_trials`` trials are complete or pruned.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from dml.errors import ConfigError, DMLError
from dml.progress import progress
from dml.tune.launch import FAIL_REASON, TrainFailed
from dml.tune.settings import StudySettings
from dml.tune.space import SearchSpace

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SPACE_ATTR = "search_space"
GRID_SEED_ATTR = "grid_shuffle_seed"


def storage_url(settings: StudySettings) -> str:
    """The SQLAlchemy URL of the study: ``settings.storage``, or SQLite ``<study_dir>/study.db``."""
    if settings.storage:
        return settings.storage
    return f"sqlite:///{(Path(settings.study_dir) / 'study.db').resolve()}"


_GRID_CHOICE = threading.Lock()  # one grid choice or trial state change at a time in this process


class SerialGridSampler(optuna.samplers.GridSampler):
    """optuna's grid sampler giving each new trial the first grid point no trial holds, one
    trial at a time in this process. optuna's gives trial number i point i, and past the grid
    size a random point among those not finished or running: a thread could take a point another
    thread's trial was about to get (a point ran twice under ``parallel``). Processes that share
    a study can still race here (optuna's own caveat for distributed grid search)."""

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Store the first free grid point on ``trial`` (a queued retry keeps its own); with no
        point left, optuna's own choice."""
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return  # a queued retry already holds its point
        with _GRID_CHOICE:  # the choice is stored (grid_id) before the next thread looks
            held = study._storage.get_all_trials(study._study_id, deepcopy=False)
            taken = {t.system_attrs["grid_id"] for t in held if "grid_id" in t.system_attrs}
            free = [i for i in range(len(self._all_grids)) if i not in taken]
            if not free:  # the grid is spent: optuna's own choice (it re-evaluates one, with a warning)
                super().before_trial(study, trial)
                return
            study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
            study._storage.set_trial_system_attr(trial._trial_id, "grid_id", free[0])


class ClaimingRDBStorage(optuna.storages.RDBStorage):
    """optuna's RDB storage moving one trial's state at a time in this process: on SQLite (no
    row locks) two threads both moved the same queued (WAITING) trial, a resumed study's retry,
    to RUNNING and both ran it."""

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        """optuna's state change, under this process's lock; True when the state was set."""
        with _GRID_CHOICE:
            return super().set_trial_state_values(trial_id, state, values)


def fit_trials_to_grid(settings: StudySettings, space: SearchSpace) -> StudySettings:
    """``settings`` with ``n_trials`` cut to the number of grid points under the grid sampler
    (one INFO line when cut): past it optuna re-ran points already visited or running."""
    if settings.sampler != "grid":
        return settings
    size = math.prod(len(values) for values in space.grid().values())
    if settings.n_trials <= size:
        return settings
    log.info("tune: the grid has %d points: n_trials %d cut to %d", size, settings.n_trials, size)
    return settings.model_copy(update={"n_trials": size})


def trials_left(study: optuna.Study, n_trials: int) -> int:
    """How many more trials to start for ``n_trials`` complete or pruned ones; under the grid
    sampler no more than the queued retries plus the points no trial has taken (a failed
    trial's point counts as taken, as optuna counts it: another trial would repeat a point)."""
    left = n_trials - finished_count(study)
    sampler = study.sampler
    if not isinstance(sampler, optuna.samplers.GridSampler):
        return left
    trials = study.get_trials(deepcopy=False)
    taken = {t.system_attrs["grid_id"] for t in trials if "grid_id" in t.system_attrs}
    queued = sum(t.state == TrialState.WAITING for t in trials)
    return min(left, len(sampler._all_grids) - len(taken) + queued)


def make_sampler(
    settings: StudySettings, space: SearchSpace, trials_so_far: int = 0, grid_seed: int | None = None
) -> optuna.samplers.BaseSampler:
    """The configured optuna sampler (grid, random or TPE).

    Random and TPE are seeded with ``study.sampler_seed`` plus the number of trials the study
    already holds: a resumed run, or another process joining the study, must not replay the
    first run's draws (a fixed seed made the first new trial after a resume repeat the values
    of the killed one). The grid sampler is the opposite case: trial number i evaluates entry
    i of a grid shuffled by the seed, so every process of one study must shuffle with the same
    ``grid_seed`` (`attach_study` stores it in the study); a per-process seed made two parallel
    trials evaluate the same grid point and skip another.
    """
    if settings.sampler == "grid":
        return SerialGridSampler(space.grid(), seed=settings.sampler_seed if grid_seed is None else grid_seed)
    seed = None if settings.sampler_seed is None else settings.sampler_seed + trials_so_far
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, settings.startup_trials))


def make_pruner(settings: StudySettings) -> optuna.pruners.BasePruner:
    """The configured optuna pruner (median, hyperband, or none)."""
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.startup_trials, n_warmup_steps=settings.warmup_steps
        )
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, settings.warmup_steps))
    return optuna.pruners.NopPruner()


def attach_study(settings: StudySettings, space: SearchSpace) -> optuna.Study:
    """The study in its storage, created when missing; its killed trials are left alone (other
    processes may be running trials of it). Raises `ConfigError` when the stored search space
    differs from ``space``."""
    url = storage_url(settings)
    Path(settings.study_dir).mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=ClaimingRDBStorage(url),
        study_name=settings.name,
        direction="maximize",
        sampler=make_sampler(settings, space),
        pruner=make_pruner(settings),
        load_if_exists=True,
    )
    if settings.sampler == "grid":
        if GRID_SEED_ATTR not in study.user_attrs:  # the creator draws the shuffle every process shares
            drawn = settings.sampler_seed if settings.sampler_seed is not None else random.randrange(2**31)
            study.set_user_attr(GRID_SEED_ATTR, drawn)
        study.sampler = make_sampler(settings, space, grid_seed=study.user_attrs[GRID_SEED_ATTR])
    elif study.trials:
        study.sampler = make_sampler(settings, space, len(study.trials))
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        study.set_user_attr(SPACE_ATTR, space.as_dict())
    elif stored != space.as_dict():
        raise ConfigError(
            f"study '{settings.name}' in {url} searched another space ({sorted(stored)}); "
            "resume it with its own space file, or set study.name"
        )
    return study


def open_study(settings: StudySettings, space: SearchSpace, resume: bool) -> optuna.Study:
    """Create the study, or with ``resume`` load it and retry the trials a killed run left
    behind. Raises `ConfigError` when a study of that name exists and ``resume`` is off, or
    when the stored search space differs from ``space``."""
    make_sampler(settings, space)  # a bad space (e.g. grid without steps) fails before any storage exists
    url = storage_url(settings)
    Path(settings.study_dir).mkdir(parents=True, exist_ok=True)
    exists = settings.name in optuna.study.get_all_study_names(storage=url)
    if exists and not resume:
        raise ConfigError(
            f"study '{settings.name}' already exists in {url}; pass --resume to continue it, "
            "or set study.name / study.study_dir"
        )
    study = attach_study(settings, space)
    if exists:
        retry_killed_trials(study)
    return study


def retry_killed_trials(study: optuna.Study) -> list[int]:
    """Mark the trials a killed run left RUNNING as FAILED and queue their values again;
    returns their numbers."""
    killed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for trial in killed:
        study._storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, "killed while running; retried")
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[-1]
        for key in ("grid_id", "search_space"):  # the grid sampler's own marks: without them its
            if key in trial.system_attrs:  # after_trial raised KeyError('grid_id') on the retry
                study._storage.set_trial_system_attr(queued._trial_id, key, trial.system_attrs[key])
        log.info("tune: trial %d was killed while running: marked failed, its values queued again", trial.number)
    finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    log.info("tune: resuming study '%s': %d trials finished, %d retried", study.study_name, finished, len(killed))
    return [t.number for t in killed]


def finished_count(study: optuna.Study) -> int:
    """How many trials of ``study`` completed or were pruned."""
    return sum(t.state in FINISHED for t in study.get_trials(deepcopy=False, states=FINISHED))


def _best_text(study: optuna.Study) -> str:
    try:
        return f"{study.best_value:.4f}"
    except ValueError:  # no complete trial yet
        return "-"


def run_trials(study: optuna.Study, objective: Any, settings: StudySettings) -> None:
    """Run trials, ``settings.parallel`` at a time, until ``n_trials`` are complete or pruned;
    a progress bar shows the best mean validation MAP@R so far. Raises `DMLError` once
    ``max_failed_trials`` trials failed in this call."""
    failures: list[str] = []
    bar = progress(total=settings.n_trials, initial=finished_count(study), desc="tune", unit="trial")
    bar.set_postfix_str(f"best MAP@R {_best_text(study)}")

    def on_trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            failures.append(f"trial {trial.number}: {trial.user_attrs.get(FAIL_REASON, '?')}")
            if len(failures) >= settings.max_failed_trials:
                study.stop()
        bar.n = finished_count(study)
        bar.set_postfix_str(f"best MAP@R {_best_text(study)}")
        if bar.n >= settings.n_trials or _grid_done(study):
            study.stop()

    while (remaining := trials_left(study, settings.n_trials)) > 0 and len(failures) < settings.max_failed_trials:
        study.optimize(
            objective,
            n_trials=remaining,
            n_jobs=settings.parallel,
            catch=(TrainFailed,),
            callbacks=[on_trial_end],
            gc_after_trial=False,
        )
        if _grid_done(study):
            break
    bar.close()
    if len(failures) >= settings.max_failed_trials:
        raise DMLError(f"tune: {len(failures)} trials failed ({failures[-1]}); study kept in {storage_url(settings)}")


def _grid_done(study: optuna.Study) -> bool:
    sampler = study.sampler
    return isinstance(sampler, optuna.samplers.GridSampler) and finished_count(study) >= len(sampler._all_grids)
