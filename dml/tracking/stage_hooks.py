"""What each stage hands to the trackers: one call per stage, made on rank 0.

- training and distillation: `TrainingTrackers` receives every metrics.jsonl record (MLflow
  metrics with steps, TensorBoard scalars) and at the end the run's files as artifacts;
- evaluation: `track_evaluation` logs the headline metrics, the report and its pictures, and
  writes the TensorBoard embedding projector when TensorBoard is on;
- export: `track_export` logs the ONNX file and model card and registers the student.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dml.config import DMLConfig
from dml.tracking import require
from dml.tracking.mlflow_run import StageRun, start_stage_run
from dml.tracking.mlflow_store import mlflow_enabled
from dml.tracking.tensorboard_log import PROJECTOR_MAX_POINTS, TENSORBOARD_SUBDIR, ScalarLog, write_projector

log = logging.getLogger(__name__)


def tensorboard_enabled(config: DMLConfig) -> bool:
    """True when ``tracking.tensorboard`` (or the older ``train.tensorboard``) is on."""
    return config.tracking.tensorboard or config.train.tensorboard


def check_installed(config: DMLConfig) -> None:
    """Raise the one-line ConfigError of a turned-on tracker whose package is missing. Called
    on every rank before training starts, so no rank waits in a collective for one that failed."""
    if tensorboard_enabled(config):
        require("tensorboard", "tracking.tensorboard")
    if mlflow_enabled(config):
        require("mlflow", "tracking.mlflow")


class TrainingTrackers:
    """The trackers of one training run (rank 0): MLflow run and TensorBoard scalars."""

    def __init__(self, config: DMLConfig, stage: str, run_dir: Path):
        self.run_dir = run_dir
        self.scalars = ScalarLog(run_dir / TENSORBOARD_SUBDIR) if tensorboard_enabled(config) else None
        self.mlflow: StageRun | None = start_stage_run(config, stage, run_dir)

    def write(self, record: dict[str, Any]) -> None:
        """Send one metrics record to TensorBoard and MLflow, whichever are on."""
        if self.scalars is not None:
            self.scalars.write(record)
        if self.mlflow is not None:
            self.mlflow.log_metrics(record)

    def close(self) -> None:
        """Flush TensorBoard; the MLflow run stays open for `finish`."""
        if self.scalars is not None:
            self.scalars.close()

    def finish(self, files: list[Path]) -> None:
        """Upload ``files`` (config, metrics.jsonl, result) and close the MLflow run."""
        if self.mlflow is not None:
            self.mlflow.log_artifacts(files)
            self.mlflow.finish()


def track_evaluation(config: DMLConfig, result: Any, embeddings: Any, class_names: list[str] | None) -> None:
    """Log an `EvalResult` (headline metrics, report files, plots) and the projector."""
    output_dir = Path(result.output_dir)
    if tensorboard_enabled(config):
        _projector(config, embeddings, class_names, output_dir / TENSORBOARD_SUBDIR)
    run = start_stage_run(config, "evaluate", output_dir)
    if run is None:
        return
    run.log_metrics({k: v for k, v in result.metrics.items() if v is not None}, step=0)
    report_files = [result.report_path, result.markdown_path, output_dir / "per_class.csv"]
    run.log_artifacts(report_files, "report")
    run.log_artifacts(list(result.plots.values()), "plots")
    run.finish()


def _projector(config: DMLConfig, embeddings: Any, class_names: list[str] | None, folder: Path) -> None:
    """Projector files for a seeded sample of the query (and gallery) embeddings, labelled
    by class name, with thumbnails when the images are readable from the shards."""
    from dml.eval.maps import map_rows
    from dml.eval.shard_lookup import read_images_by_key

    parts = [embeddings.query] + ([embeddings.gallery] if embeddings.gallery is not None else [])
    vectors = np.concatenate([p.vectors for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    keys = [key for p in parts for key in p.keys]
    rows = map_rows(len(keys), PROJECTOR_MAX_POINTS, config.seed)
    names = [
        class_names[int(labels[r])] if class_names and 0 <= int(labels[r]) < len(class_names) else str(int(labels[r]))
        for r in rows
    ]
    thumbnails = None
    if class_names is not None:  # the shards are the embeddings' own: images can be read
        splits = [embeddings.query_split] + ([embeddings.gallery_split] if embeddings.gallery is not None else [])
        images = read_images_by_key(config.data.shard_dir, splits, [keys[r] for r in rows])
        if len(images) == len(rows):
            thumbnails = _thumbnails([images[keys[r]] for r in rows])
    write_projector(folder, vectors[rows], names, thumbnails)


def _thumbnails(images: list[np.ndarray]) -> torch.Tensor:
    """(N, 3, S, S) floats in [0, 1] from uint8 grey (H, W) or RGB (H, W, 3) images."""
    from PIL import Image

    from dml.tracking.tensorboard_log import THUMBNAIL_SIDE

    side = THUMBNAIL_SIDE
    out = np.stack([np.asarray(Image.fromarray(image).convert("RGB").resize((side, side))) for image in images])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def track_export(config: DMLConfig, result: Any, model_file: Path) -> None:
    """Log the exported files and model card; register the ONNX student (see `registry`)."""
    run = start_stage_run(config, "export", Path(result.out_dir))
    if run is None:
        return
    from dml.tracking.registry import register_student

    run.log_artifacts([result.card_path], "model")
    run.log_artifacts([path for name, path in result.files.items() if name.startswith("onnx")], "model")
    metrics = (result.card.get("metrics") or {}) if isinstance(result.card, dict) else {}
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
    register_student(config, run, result, model_file)
    run.finish()
