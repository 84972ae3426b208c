"""Where MLflow runs go: resolving the tracking URI, the experiment and the client.

URI order: ``tracking.mlflow.uri``, then the standard ``MLFLOW_TRACKING_URI``, then a SQLite
store ``mlflow.db`` (artifacts in ``mlartifacts/``) in the folder that holds the run folders
(the parent of ``train.run_dir``), so every stage of one pipeline shares one store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dml.config import DMLConfig
from dml.tracking import require

SWITCH = "tracking.mlflow"
LOCAL_DB, LOCAL_ARTIFACTS = "mlflow.db", "mlartifacts"
# MLflow retries an unreachable server for minutes by default; a training run should not wait
# that long to learn that it will log to metrics.jsonl only. Users' own settings win.
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
MAX_PARAM_LENGTH = 6000


def mlflow_enabled(config: DMLConfig) -> bool:
    """Whether MLflow logging is on: ``enabled``, or (when None) a configured or env URI."""
    settings = config.tracking.mlflow
    if settings.enabled is not None:
        return settings.enabled
    return settings.uri is not None or bool(os.environ.get("MLFLOW_TRACKING_URI"))


def tracking_uri(config: DMLConfig) -> str:
    """The tracking URI this config logs to (see module docstring)."""
    uri = config.tracking.mlflow.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{local_store_dir(config) / LOCAL_DB}"


def local_store_dir(config: DMLConfig) -> Path:
    """The folder that holds the runs folder: where a local MLflow store lives by default."""
    return Path(config.train.run_dir).resolve().parent


def artifact_location(uri: str) -> str | None:
    """Artifact root for new experiments in a local SQLite store (beside the database);
    None for servers, which choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / LOCAL_ARTIFACTS).as_uri()


def make_client(uri: str) -> Any:
    """An `mlflow.MlflowClient` for ``uri`` (ConfigError naming the extra when not installed)."""
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    mlflow = require("mlflow", SWITCH)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def flat_params(config: DMLConfig) -> dict[str, str]:
    """The resolved config as MLflow parameters: dotted keys, string values (long ones cut)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = str(value)[:MAX_PARAM_LENGTH]

    walk("", config.model_dump(mode="json"))
    return flat


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record that are metrics (not step, time, epoch or flags)."""
    return {
        key: float(value)
        for key, value in record.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time", "epoch")
    }
