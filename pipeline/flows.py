"""Prefect flows: the chained pipeline and the nightly data-driven retrain (one stage alone is
its `dml` command: `dml prepare`, `dml train`, ...).

Every flow takes ``config_path`` (a YAML file readable where the flow runs) and dotted
``overrides``; stages are `pipeline.prefect_tasks.run_stage` tasks, so a flow re-run skips what its
stamps prove done and redoes what changed. Which launcher runs the stages
(``pipeline.launcher``) does not change the flow code.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Completed, State

from dml.tracking.pipeline_run import pipeline_run
from pipeline.config import PipelineRunConfig
from pipeline.errors import StageFailed
from pipeline.freshness import stale_reason
from pipeline.prefect_artifacts import publish_decision_artifact, publish_failure_artifact, publish_summary_artifacts
from pipeline.prefect_tasks import publish, run_stage
from pipeline.schedules import FLOW_NAME
from pipeline.stage_paths import load_pipeline_config
from pipeline.stage_specs import StageOutcome, chained_stages
from pipeline.summary import summarize


def run_stages(config: PipelineRunConfig, stages: list[str]) -> dict[str, StageOutcome]:
    """Run ``stages`` in order; on a failure publish the failure artifact and re-raise."""
    outcomes: dict[str, StageOutcome] = {}
    settings = config.pipeline
    stage_task = run_stage.with_options(
        retries=settings.stage_retries, retry_delay_seconds=settings.retry_delay_seconds
    )
    for stage in stages:
        try:
            # A skipped stage returns a "Cached" state: ask for the state and take its result.
            outcomes[stage] = stage_task(stage, config, return_state=True).result()
        except StageFailed as error:
            get_run_logger().error("%s", error)
            publish_failure_artifact(error, outcomes)
            raise
    return outcomes


def run_chain(config: PipelineRunConfig) -> dict[str, Any]:
    """The chained stages, then publish and the summary artifacts, inside the calling flow
    run (so its artifacts belong to that run); returns the summary."""
    with pipeline_run(config) as tracked:  # MLflow parent run, when tracking is on
        outcomes = run_stages(tracked, chained_stages(tracked))
    published = publish(config.pipeline.publish_dir, outcomes) if config.pipeline.publish_dir else {}
    summary = summarize(outcomes, published)
    publish_summary_artifacts(summary)
    return summary


@flow(name="dml-pipeline")
def dml_pipeline(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """prepare -> train teacher -> evaluate teacher -> distill -> evaluate student -> export
    -> publish; returns the summary (`pipeline.summary.summarize`)."""
    return run_chain(load_pipeline_config(config_path, overrides))


def _decision(config: PipelineRunConfig, only_if_data_changed: bool) -> str | None:
    """Why this scheduled run retrains, or None to skip it (`pipeline.freshness`)."""
    if not only_if_data_changed:
        return "asked to run the chain (only_if_data_changed=False)"
    return stale_reason(config)


@flow(name=FLOW_NAME)
def nightly_retrain(config_path: str, overrides: list[str] | None = None, only_if_data_changed: bool = True) -> State:
    """Prepare the data (new raw files give new shards), then run the chain only when some
    stage's outputs are not current: the data manifest or the config changed, an output is
    missing, or the last attempt crashed (it resumes through the stage stamps). Otherwise the
    run completes in a state named "Skipped" whose message says why; either way a
    ``dml-retrain-decision`` artifact records the decision. The result is a dict with
    ``retrained``, ``reason`` and ``manifest_sha256`` (and the summary when it retrained)."""
    config = load_pipeline_config(config_path, overrides)
    manifest = run_stages(config, ["prepare"])["prepare"].result["manifest_sha256"]
    reason = _decision(config, only_if_data_changed)
    if reason is None:
        reason = f"data manifest {manifest[:12]} and config unchanged, every stage's outputs are current"
        get_run_logger().info("no retrain: %s", reason)
        publish_decision_artifact(retrained=False, reason=reason)
        return Completed(
            name="Skipped",
            message=f"skipped: {reason}",
            data={"retrained": False, "reason": reason, "manifest_sha256": manifest},
        )
    get_run_logger().info("retraining: %s", reason)
    publish_decision_artifact(retrained=True, reason=reason)
    summary = run_chain(config)
    result = {"retrained": True, "reason": reason, "manifest_sha256": manifest, **summary}
    return Completed(message=f"retrained: {reason}", data=result)
