"""The `export` stage: load a trained model, take parity / calibration / evaluation images
from the shards, and call `export_model`. Writes into ``export.output_dir``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dml.config import DataConfig, DMLConfig
from dml.data.loader import EvalLoader
from dml.errors import DMLError, first_line
from dml.export.checked_export import ExportResult, export_model
from dml.export.pixel_input import collect_images
from dml.files import sha256_file
from dml.models.model_file import find_model_file, load_final_model
from dml.tracking.stage_hooks import track_export

log = logging.getLogger(__name__)
MAX_EVAL_IMAGES = 2000  # int8 MAP@R drop is measured on at most this many query images


def _images(data: DataConfig, split: str, count: int):
    return collect_images(EvalLoader(data, split, batch_size=min(count, 256)), max_images=count)


def _evaluation_metrics(report_path: str | None) -> dict | None:
    """Headline metrics of the model's evaluation report (``export.report_path``), None when not
    given. Raises `DMLError` naming the file when it is missing or not a report."""
    if report_path is None:
        return None
    try:
        report = json.loads(Path(report_path).read_text())
    except FileNotFoundError:
        raise DMLError(
            f"export.report_path: no evaluation report at {report_path}: run `dml evaluate` "
            "first, or leave export.report_path unset"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DMLError(f"export.report_path: {report_path} cannot be read as JSON ({first_line(exc, 120)})") from None
    if not isinstance(report, dict) or not isinstance(report.get("headline"), dict):
        raise DMLError(f"export.report_path: {report_path} is not a `dml evaluate` report (no headline)")
    return report["headline"]


def run_export(config: DMLConfig) -> ExportResult:
    """Export ``export.model_path`` to ONNX / TorchScript (+ int8) with parity checks."""
    cfg = config.export
    model_file = find_model_file(cfg.model_path, "export.model_path")
    metrics = _evaluation_metrics(cfg.report_path)
    model, payload = load_final_model(model_file)
    data = DataConfig.model_validate(
        {
            **payload["data"],
            "shard_dir": config.data.shard_dir,
            "num_workers": 0,
            "bad_samples": config.data.bad_samples,
        }
    )
    log.info("export: start (%s -> %s)", model_file, cfg.output_dir)
    parity_images, _ = _images(data, cfg.parity_split, cfg.parity_images)
    calibration = eval_images = eval_labels = None
    if cfg.int8:
        calibration, _ = _images(data, data.train_split, cfg.calibration_images)
        eval_images, eval_labels = _images(data, cfg.parity_split, MAX_EVAL_IMAGES)
    source = {
        "model_path": str(model_file),
        "model_sha256": sha256_file(model_file),
        "data_digest": payload.get("data_digest"),
        "teacher": payload.get("teacher"),
    }
    result = export_model(
        model,
        cfg.output_dir,
        parity_images,
        formats=cfg.formats,
        opset=cfg.opset,
        int8=cfg.int8,
        calibration_images=calibration,
        eval_images=eval_images,
        eval_labels=eval_labels,
        source=source,
        metrics=metrics,
        min_cosine=cfg.min_cosine,
        int8_min_cosine=cfg.int8_min_cosine,
        preprocessing_in_graph=cfg.preprocessing_in_graph,
    )
    log.info("export: done -> %s (card %s)", result.out_dir, result.card_path)
    track_export(config, result, model_file)
    return result
