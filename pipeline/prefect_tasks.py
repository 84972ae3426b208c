"""Prefect tasks: one generic stage task (retried, skipped when its stamp matches) and the
publish task.

Caching is the stage stamps' job (`pipeline.stage_cache`), not Prefect's result cache: the stamp
sits next to the outputs it vouches for, survives a throwaway or replaced Prefect server,
is checked against the files actually on disk (a deleted model.pt means the stage runs
again), and is readable by every launcher's stage process. Prefect's own cache is off
(``NO_CACHE``) so the two never disagree; a skipped stage finishes in a Completed state
named "Cached" so the UI shows it as such.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from pipeline.config import PipelineConfig, PipelineRunConfig
from pipeline.errors import StageFailed
from pipeline.launchers import build_launcher
from pipeline.publish import publish_release
from pipeline.stage_execution import execute_stage
from pipeline.stage_specs import StageOutcome

# Defaults of the task; `pipeline.flows.run_stages` applies ``pipeline.stage_retries`` and
# ``pipeline.retry_delay_seconds`` of the run's config.
STAGE_RETRIES = PipelineConfig.model_fields["stage_retries"].default
RETRY_DELAY_SECONDS = PipelineConfig.model_fields["retry_delay_seconds"].default


def retry_unless_input_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry infrastructure failures; a bad config or missing input fails the same way again."""
    error = state.data
    return not (isinstance(error, StageFailed) and error.input_error)


@task(
    name="stage",
    task_run_name="{stage}",
    retries=STAGE_RETRIES,
    retry_delay_seconds=RETRY_DELAY_SECONDS,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def run_stage(stage: str, config: PipelineRunConfig) -> StageOutcome:
    """Run or skip one stage with the launcher named in ``config.pipeline``."""
    logger = get_run_logger()
    outcome = execute_stage(stage, config, build_launcher(config.pipeline))
    if outcome.status == "cached":
        logger.info("%s: inputs unchanged, outputs in %s", stage, outcome.output_dir)
        # Prefect hands the caller the state's data (the outcome); the state only names the run "Cached".
        return Completed(  # type: ignore[return-value]
            name="Cached", message=f"inputs unchanged (key {outcome.key[:12]})", data=outcome
        )
    logger.info("%s: done -> %s (log %s)", stage, outcome.output_dir, outcome.log_path)
    return outcome


@task(name="publish", cache_policy=NO_CACHE, persist_result=False)
def publish(publish_dir: str, outcomes: dict[str, StageOutcome]) -> dict[str, str]:
    """Copy the model card, ONNX and reports to ``publish_dir`` (see `pipeline.publish`)."""
    published = publish_release(publish_dir, outcomes)
    get_run_logger().info("published %d files to %s", len(published), publish_dir)
    return published
