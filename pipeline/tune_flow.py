"""`dml pipeline tune`: the `dml tune` study as a Prefect flow whose trials are mapped tasks.

The flow checks the inputs and opens the study (retrying trials a killed run left behind),
writes the fold shards, maps one ``tune-trial`` task per missing trial (``study.parallel``
at a time; each task asks the shared RDB study for its values, so tasks on several
machines against one ``study.storage`` URL cooperate), then one ``tune-finish`` task retrains
the best values with the seeds and writes best.yaml and the report. No ML here: every step is
a `dml.tune` call. Each trial fold's `dml train` is started by ``pipeline.launcher``
(`pipeline.tune_launch`); the final seeds' retrain runs in the flow's machine as in `dml tune`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from dml.errors import DMLError
from dml.tune.launch import TrainFailed
from dml.tune.run import finish_study, trial_runner
from dml.tune.study import attach_study, open_study, trials_left
from pipeline.tune_launch import LauncherFoldTrainer, load_tune_inputs


@task(name="tune-trial", task_run_name="trial-{index}", cache_policy=NO_CACHE, persist_result=False)
def tune_trial(config_path: str, space_path: str, overrides: list[str], index: int) -> dict[str, Any]:
    """Run one trial of the study (all its folds); returns its number, state and value. A
    pruned or failed trial is recorded in the study, as `dml tune` records it."""
    plan, pipeline_settings = load_tune_inputs(config_path, space_path, overrides)
    study = attach_study(plan.settings, plan.space)
    ended = []
    study.optimize(
        trial_runner(plan, LauncherFoldTrainer(pipeline_settings)),
        n_trials=1,
        catch=(TrainFailed,),
        callbacks=[lambda study, trial: ended.append(trial)],
    )
    trial = ended[0]
    get_run_logger().info("trial %d: %s %s", trial.number, trial.state.name, trial.value)
    return {"number": trial.number, "state": trial.state.name, "value": trial.value}


@task(name="tune-finish", cache_policy=NO_CACHE, persist_result=False)
def tune_finish(config_path: str, space_path: str, overrides: list[str]) -> dict[str, Any]:
    """best.yaml, the seeds' retrain and single test, plots and report.json."""
    plan, _ = load_tune_inputs(config_path, space_path, overrides)
    result = finish_study(plan, attach_study(plan.settings, plan.space))
    return {"best_config": result.best_config, "report": result.report_path, "lines": result.lines}


@flow(name="dml-tune")
def dml_tune(
    config_path: str, space_path: str, overrides: list[str] | None = None, resume: bool = False
) -> dict[str, Any]:
    """The study: trials as mapped tasks until ``study.n_trials`` are complete or pruned.

    Raises DMLError when trials are still missing after ``study.max_failed_trials`` rounds.
    """
    overrides = list(overrides or [])
    plan, _ = load_tune_inputs(config_path, space_path, overrides)
    trial_runner(plan)  # writes the fold shards once, before the study and the trials that share them
    study = open_study(plan.settings, plan.space, resume)
    rounds = 0
    while (missing := trials_left(study, plan.settings.n_trials)) > 0:
        rounds += 1
        if rounds > plan.settings.max_failed_trials:
            raise DMLError(
                f"trials keep failing (see the tune-trial task logs); study kept in {plan.settings.study_dir}"
            )
        futures = tune_trial.map(unmapped(config_path), unmapped(space_path), unmapped(overrides), list(range(missing)))
        futures.wait()
    return tune_finish(config_path, space_path, overrides)


def run_tune_flow(config_path: str, space_path: str, overrides: list[str], resume: bool) -> dict[str, Any]:
    """`dml_tune` with ``study.parallel`` trial tasks at a time."""
    plan, _ = load_tune_inputs(config_path, space_path, overrides)
    runner: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(max_workers=plan.settings.parallel)
    # prefect types task_runner as TaskRunner[PrefectFuture]; the thread pool's futures are those
    return dml_tune.with_options(task_runner=runner)(  # type: ignore[arg-type]
        config_path, space_path, overrides, resume
    )
