"""`dml track sync RUN_DIR`: upload a stage folder's metrics and files to MLflow later, when
the tracker could not be reached while the stage ran (its ``tracking.json`` says unsynced)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from dml.config import DMLConfig, validate_config
from dml.errors import DMLError
from dml.tracking.mlflow_run import (
    TRACKING_FILE,
    StageRun,
    log_params,
    read_tracking_file,
)
from dml.tracking.mlflow_store import experiment_id, flat_params, make_client
from dml.train.metrics_log import read_metrics

log = logging.getLogger(__name__)
STAGE_FILES = ("config.yaml", "metrics.jsonl", "train_result.json", "report.json", "report.md", "per_class.csv")


def saved_config(folder: Path) -> DMLConfig:
    """The resolved config a stage saved in ``folder`` (config.yaml, or report.json's).

    Raises DMLError when the folder has neither file.
    """
    if (folder / "config.yaml").is_file():
        return validate_config(yaml.safe_load((folder / "config.yaml").read_text()) or {})
    if (folder / "report.json").is_file():
        return validate_config(json.loads((folder / "report.json").read_text())["config"])
    raise DMLError(f"{folder}: no config.yaml or report.json to take the run's parameters from")


def sync_folder(folder: str | Path, uri: str | None = None) -> str:
    """Upload ``folder``'s parameters, every metrics.jsonl record (with its step) and its
    files to a new MLflow run at ``uri`` (default: the one recorded in tracking.json);
    returns the run id. A folder already synced returns its run id without uploading.

    Raises DMLError when the folder was not tracked, MLflow cannot be reached, or the run fails.
    """
    folder = Path(folder)
    state = read_tracking_file(folder)
    if not state:
        raise DMLError(f"{folder}: no {TRACKING_FILE}; it was not run with tracking.mlflow on")
    if state.get("synced") and state.get("run_id") and uri in (None, state.get("uri")):
        log.info("track sync: %s is already in mlflow (run %s)", folder, state["run_id"])
        return state["run_id"]
    uri = uri or state["uri"]
    config = saved_config(folder)
    client = make_client(uri)
    try:
        created = client.create_run(
            experiment_id(client, config.tracking.mlflow.experiment, uri),
            tags={
                "mlflow.runName": f"{state.get('stage', 'stage')} ({folder.name}, synced)",
                "dml.stage": str(state.get("stage")),
                "dml.synced_from": str(folder.resolve()),
            },
        )
        log_params(client, created.info.run_id, flat_params(config))
    except Exception as exc:  # noqa: BLE001 - say why in one line
        raise DMLError(f"track sync: mlflow at {uri} cannot be reached: {type(exc).__name__}") from None
    run = StageRun(client, created.info.run_id, uri, str(state.get("stage")), folder)
    for record in read_metrics(folder):
        run.log_metrics(record)
    if (folder / "report.json").is_file():  # an evaluation folder: its headline metrics
        headline = json.loads((folder / "report.json").read_text()).get("headline", {})
        run.log_metrics({k: v for k, v in headline.items() if v is not None}, step=0)
    run.log_artifacts([folder / name for name in STAGE_FILES])
    run.finish()
    if run.error or run.run_id is None:
        raise DMLError(f"track sync: {run.error or 'no MLflow run was created'}")
    log.info("track sync: %s -> mlflow %s run %s", folder, uri, run.run_id)
    return run.run_id
