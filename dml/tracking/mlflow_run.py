"""One MLflow run per stage (a child of the pipeline's run when there is one), on rank 0.

A tracker that cannot be reached never stops the stage: one warning, the run goes on with its
files (``metrics.jsonl``, reports), and ``tracking.json`` in the stage's folder says what is
unsynced, for ``dml track sync`` to upload later.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dml.config import DMLConfig
from dml.errors import ConfigError
from dml.tracking.mlflow_store import (
    experiment_id,
    flat_params,
    make_client,
    mlflow_enabled,
    numeric_metrics,
    tracking_uri,
)

log = logging.getLogger(__name__)
TRACKING_FILE = "tracking.json"
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000


def read_tracking_file(folder: str | Path) -> dict[str, Any]:
    """``<folder>/tracking.json`` (empty when the stage was not tracked)."""
    path = Path(folder) / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_tracking_file(folder: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as the folder's tracking.json (creating the folder)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / TRACKING_FILE).write_text(json.dumps(payload, indent=1))


class StageRun:
    """The MLflow run of one stage. Every method is a no-op once the tracker has failed."""

    def __init__(self, client: Any, run_id: str | None, uri: str, stage: str, folder: Path):
        self.client, self.run_id, self.uri, self.stage, self.folder = client, run_id, uri, stage, folder
        self.error: str | None = None

    @property
    def active(self) -> bool:
        """True while the run exists and no tracker call has failed."""
        return self.run_id is not None and self.error is None

    def _record(self) -> None:
        write_tracking_file(
            self.folder,
            {
                "stage": self.stage,
                "uri": self.uri,
                "run_id": self.run_id,
                "synced": self.error is None,
                "error": self.error,
            },
        )

    def fail(self, what: str, exc: Exception) -> None:
        """Record the tracker failure ``what`` (one warning naming `dml track sync`); later calls do nothing."""
        self.error = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning(
            "mlflow at %s cannot be reached (%s); metrics stay in %s, upload them later with `dml track sync %s`",
            self.uri,
            self.error,
            self.folder,
            self.folder,
        )
        self._record()

    def log_metrics(self, record: dict[str, Any], step: int | None = None) -> None:
        """Log the numeric values of ``record`` at ``step`` (default ``record['step']`` or 0)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        step = int(record.get("step", 0)) if step is None else step
        stamp = int(1000 * record.get("time", time.time()))
        metrics = [Metric(key, value, stamp, step) for key, value in numeric_metrics(record).items()]
        try:
            for start in range(0, len(metrics), METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[start : start + METRICS_PER_BATCH])
        except Exception as exc:  # noqa: BLE001 - any tracker failure must not end training
            self.fail("logging metrics", exc)

    def log_artifacts(self, paths: Sequence[str | Path], subdir: str | None = None) -> None:
        """Upload existing files (missing ones are skipped) under ``subdir`` of the run."""
        if not self.active:
            return
        try:
            for path in paths:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path), subdir)
        except Exception as exc:  # noqa: BLE001
            self.fail("uploading artifacts", exc)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set each tag on the run."""
        if not self.active:
            return
        try:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
        except Exception as exc:  # noqa: BLE001
            self.fail("setting tags", exc)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED or FAILED) and record the outcome in tracking.json."""
        if self.active:
            try:
                self.client.set_terminated(self.run_id, status)
            except Exception as exc:  # noqa: BLE001
                self.fail("closing the run", exc)
        self._record()


def start_stage_run(config: DMLConfig, stage: str, folder: str | Path) -> StageRun | None:
    """Start the MLflow run of ``stage`` writing to ``folder`` (None when MLflow is off), with
    the resolved config as parameters. An unreachable tracker gives a `StageRun` that only
    records itself as unsynced; a missing mlflow package is a `ConfigError`."""
    if not mlflow_enabled(config):
        return None
    uri, folder = tracking_uri(config), Path(folder)
    client = make_client(uri)
    run = StageRun(client, None, uri, stage, folder)
    settings = config.tracking.mlflow
    tags = {"mlflow.runName": f"{stage} ({folder.name})", "dml.stage": stage, "dml.folder": str(folder.resolve())}
    if settings.parent_run_id:
        tags["mlflow.parentRunId"] = settings.parent_run_id
    try:
        created = client.create_run(experiment_id(client, settings.experiment, uri), tags=tags)
        run.run_id = created.info.run_id
        log_params(client, run.run_id, flat_params(config))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreachable tracker never stops the stage
        run.fail("starting the run", exc)
        return run
    log.info("%s: logging to mlflow %s (run %s)", stage, uri, run.run_id)
    run._record()
    return run


def log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    """Log ``params`` on ``run_id`` in batches of PARAMS_PER_BATCH."""
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])
