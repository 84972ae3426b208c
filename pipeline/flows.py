"""Prefect flows: one per stage, the chained pipeline, and the nightly data-driven retrain.

Every flow takes ``config_path`` (a YAML file readable where the flow runs) and dotted
``overrides``; stages are `pipeline.tasks.run_stage` tasks, so a flow re-run skips what its
stamps prove done and redoes what changed. Which launcher runs the stages
(``pipeline.launcher``) does not change the flow code.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger

from dml.config import DMLConfig
from pipeline.artifacts import publish_failure_artifact, publish_summary_artifacts
from pipeline.errors import StageFailed
from pipeline.stages import STAGE_ORDER, StageOutcome
from pipeline.stamps import read_stamp
from pipeline.summary import summarize
from pipeline.tasks import publish, run_stage
from pipeline.wiring import load_pipeline_config


def run_stages(config: DMLConfig, stages: list[str]) -> dict[str, StageOutcome]:
    """Run ``stages`` in order; on a failure publish the failure artifact and re-raise."""
    outcomes: dict[str, StageOutcome] = {}
    for stage in stages:
        try:
            # A skipped stage returns a "Cached" state: ask for the state and take its result.
            outcomes[stage] = run_stage(stage, config, return_state=True).result()
        except StageFailed as error:
            get_run_logger().error("%s", error)
            publish_failure_artifact(error, outcomes)
            raise
    return outcomes


def chained_stages(config: DMLConfig) -> list[str]:
    return [stage for stage in STAGE_ORDER if stage != "evaluate_teacher" or config.pipeline.evaluate_teacher]


@flow(name="dml-pipeline")
def dml_pipeline(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """prepare -> train teacher -> evaluate teacher -> distill -> evaluate student -> export
    -> publish; returns the summary (`pipeline.summary.summarize`)."""
    config = load_pipeline_config(config_path, overrides)
    outcomes = run_stages(config, chained_stages(config))
    published = publish(config.pipeline.publish_dir, outcomes) if config.pipeline.publish_dir else {}
    summary = summarize(outcomes, published)
    publish_summary_artifacts(summary)
    return summary


def _single_stage(stage: str, config_path: str, overrides: list[str] | None) -> dict[str, Any]:
    config = load_pipeline_config(config_path, overrides)
    return run_stages(config, [stage])[stage].to_dict()


@flow(name="dml-prepare")
def prepare_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Raw images -> shards (skipped when the prepare config and the raw files are unchanged)."""
    return _single_stage("prepare", config_path, overrides)


@flow(name="dml-train")
def train_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train the teacher on the prepared shards."""
    return _single_stage("train", config_path, overrides)


@flow(name="dml-evaluate")
def evaluate_flow(config_path: str, overrides: list[str] | None = None,
                  model: Literal["teacher", "student"] = "teacher") -> dict[str, Any]:
    """Evaluate the teacher (``train.run_dir``) or the student (``distill.run_dir``)."""
    return _single_stage(f"evaluate_{model}", config_path, overrides)


@flow(name="dml-distill")
def distill_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Distil the trained teacher into the student."""
    return _single_stage("distill", config_path, overrides)


@flow(name="dml-export")
def export_flow(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Export the student (ONNX / TorchScript, parity-checked, model card)."""
    return _single_stage("export", config_path, overrides)


def last_trained_manifest(config: DMLConfig) -> str | None:
    """The manifest sha256 the current teacher was trained on (from its stamp), if any."""
    stamp = read_stamp(config.train.run_dir)
    if stamp is None or stamp.get("stage") != "train" or stamp.get("status") != "done":
        return None
    return stamp.get("inputs", {}).get("manifest")


def should_retrain(config: DMLConfig, manifest_sha256: str, only_if_data_changed: bool = True) -> bool:
    """True unless ``only_if_data_changed`` and the teacher was trained on this manifest."""
    return not only_if_data_changed or manifest_sha256 != last_trained_manifest(config)


@flow(name="dml-nightly-retrain")
def nightly_retrain(config_path: str, overrides: list[str] | None = None,
                    only_if_data_changed: bool = True) -> dict[str, Any]:
    """Prepare the data; retrain (the whole chain) only when the manifest differs from the one
    the current teacher was trained on, or always with ``only_if_data_changed=False``."""
    config = load_pipeline_config(config_path, overrides)
    prepared = run_stages(config, ["prepare"])["prepare"]
    manifest = prepared.result["manifest_sha256"]
    if not should_retrain(config, manifest, only_if_data_changed):
        get_run_logger().info("data manifest unchanged (%s): no retrain", manifest[:12])
        return {"retrained": False, "manifest_sha256": manifest}
    return {"retrained": True, "manifest_sha256": manifest, **dml_pipeline(config_path, overrides)}
