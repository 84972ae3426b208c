"""Registering the exported student in the MLflow model registry, with its evaluation
metrics and the run ids of its own training and of its teacher as version tags."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from dml.config import DMLConfig
from dml.tracking.mlflow_run import StageRun, read_tracking_file

log = logging.getLogger(__name__)
MODEL_SUBDIR = "model"


def teacher_folder(config: DMLConfig, student_dir: Path) -> Path:
    """The teacher run folder of the student in ``student_dir``: its own saved config's
    ``distill.teacher``, else this config's."""
    saved = student_dir / "config.yaml"
    if saved.is_file():
        teacher = (yaml.safe_load(saved.read_text()) or {}).get("distill", {}).get("teacher")
        if teacher:
            return Path(teacher)
    return Path(config.distill.teacher)


def version_tags(config: DMLConfig, model_file: Path, metrics: dict[str, Any]) -> dict[str, str]:
    """Tags of a registered student version: run ids (empty when a stage was not tracked)
    and the evaluation metrics as ``metric.<name>``."""
    student_dir = model_file.parent
    tags = {
        "dml.student_run_id": str(read_tracking_file(student_dir).get("run_id") or ""),
        "dml.teacher_run_id": str(read_tracking_file(teacher_folder(config, student_dir)).get("run_id") or ""),
        "dml.model_file": str(model_file),
    }
    tags.update({f"metric.{k}": str(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return tags


def register_student(config: DMLConfig, run: StageRun, result: Any, model_file: Path) -> str | None:
    """Register ``result``'s ONNX file (uploaded by the export run) as a new version of
    ``tracking.mlflow.registered_model``; returns the version, or None when not registered."""
    name = config.tracking.mlflow.registered_model
    if name is None or not run.active or "onnx" not in result.files:
        return None
    client = run.client
    metrics = (result.card.get("metrics") or {}) if isinstance(result.card, dict) else {}
    try:
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name, description="dml students exported to ONNX")
        source = f"{client.get_run(run.run_id).info.artifact_uri}/{MODEL_SUBDIR}/{Path(result.files['onnx']).name}"
        version = client.create_model_version(
            name, source, run_id=run.run_id, tags=version_tags(config, model_file, metrics)
        )
    except Exception as exc:  # noqa: BLE001 - the export itself is done and on disk
        run.fail("registering the student", exc)
        return None
    log.info("export: registered %s version %s in mlflow", name, version.version)
    return str(version.version)
