"""The `export` stage: load a trained model, take parity / calibration / evaluation images
from the shards, and call `export_model`. Writes into ``export.output_dir``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dml.config import DataConfig, DMLConfig
from dml.data.loader import EvalLoader
from dml.files import sha256_file
from dml.export.pixel_input import collect_images
from dml.export.checked_export import ExportResult, export_model
from dml.tracking.stage_hooks import track_export
from dml.models.model_file import load_final_model

log = logging.getLogger(__name__)
MAX_EVAL_IMAGES = 2000  # int8 MAP@R drop is measured on at most this many query images


def _images(data: DataConfig, split: str, count: int):
    return collect_images(EvalLoader(data, split, batch_size=min(count, 256)), max_images=count)


def _evaluation_metrics(model_path: Path) -> dict | None:
    """Headline metrics of the model's own evaluation report, when `dml evaluate` ran on it."""
    report = model_path.parent / "eval" / "report.json"
    if not report.exists():
        return None
    return json.loads(report.read_text()).get("headline")


def run_export(config: DMLConfig) -> ExportResult:
    """Export ``export.model_path`` to ONNX / TorchScript (+ int8) with parity checks."""
    cfg = config.export
    model, payload = load_final_model(cfg.model_path)
    model_file = Path(cfg.model_path) if Path(cfg.model_path).is_file() else Path(cfg.model_path) / "model.pt"
    data = DataConfig.model_validate({**payload["data"], "shard_dir": config.data.shard_dir, "num_workers": 0,
                                   "bad_samples": config.data.bad_samples})
    log.info("export: start (%s -> %s)", model_file, cfg.output_dir)
    parity_images, _ = _images(data, cfg.parity_split, cfg.parity_images)
    calibration = eval_images = eval_labels = None
    if cfg.int8:
        calibration, _ = _images(data, data.train_split, cfg.calibration_images)
        eval_images, eval_labels = _images(data, cfg.parity_split, MAX_EVAL_IMAGES)
    source = {"model_path": str(model_file), "model_sha256": sha256_file(model_file),
              "data_digest": payload.get("data_digest"), "teacher": payload.get("teacher")}
    result = export_model(model, cfg.output_dir, parity_images, formats=cfg.formats, opset=cfg.opset,
                          int8=cfg.int8, calibration_images=calibration, eval_images=eval_images,
                          eval_labels=eval_labels, source=source, metrics=_evaluation_metrics(model_file),
                          min_cosine=cfg.min_cosine, int8_min_cosine=cfg.int8_min_cosine,
                          preprocessing_in_graph=cfg.preprocessing_in_graph)
    log.info("export: done -> %s (card %s)", result.out_dir, result.card_path)
    track_export(config, result, model_file)
    return result
