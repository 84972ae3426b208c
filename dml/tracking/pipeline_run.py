"""The parent MLflow run of one pipeline run: every stage's run becomes its child, through
``tracking.mlflow.parent_run_id`` in the config each stage receives (so it reaches stages
launched by torchrun or on Kubernetes the same way as in-process ones)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from dml.config import DMLConfig
from dml.tracking.mlflow_run import log_params
from dml.tracking.mlflow_store import experiment_id, flat_params, make_client, mlflow_enabled, tracking_uri

log = logging.getLogger(__name__)
ConfigT = TypeVar("ConfigT", bound=DMLConfig)


@contextmanager
def pipeline_run(config: ConfigT) -> Iterator[ConfigT]:
    """Open the pipeline's parent run and yield ``config`` pointing the stages at it (the
    same config when MLflow is off, already has a parent, or cannot be reached: one warning).
    The run ends FINISHED, or FAILED when the body raises."""
    if not mlflow_enabled(config) or config.tracking.mlflow.parent_run_id:
        yield config
        return
    uri = tracking_uri(config)
    client = make_client(uri)
    try:
        run = client.create_run(
            experiment_id(client, config.tracking.mlflow.experiment, uri),
            tags={"mlflow.runName": "pipeline", "dml.stage": "pipeline"},
        )
        log_params(client, run.info.run_id, flat_params(config))
    except Exception as exc:  # noqa: BLE001 - the pipeline runs without its parent run
        log.warning("pipeline: mlflow at %s cannot be reached (%s); stages log on their own", uri, exc)
        yield config
        return
    child = config.model_copy(deep=True)
    child.tracking.mlflow.uri, child.tracking.mlflow.parent_run_id = uri, run.info.run_id
    log.info("pipeline: mlflow run %s at %s", run.info.run_id, uri)
    status = "FAILED"
    try:
        yield child
        status = "FINISHED"
    finally:
        try:
            client.set_terminated(run.info.run_id, status)
        except Exception as exc:  # noqa: BLE001
            log.warning("pipeline: could not close mlflow run %s (%s)", run.info.run_id, exc)
