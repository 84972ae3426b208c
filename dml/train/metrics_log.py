"""Run metrics: one JSON object per line in ``metrics.jsonl`` (rank 0), optional TensorBoard."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when on GPU), in MiB."""
    out = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class MetricsLog:
    """Appends records to ``<run>/metrics.jsonl``; inactive on ranks other than 0."""

    def __init__(self, run_dir: Path, active: bool, tensorboard: bool = False):
        self.active = active
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.info("train.tensorboard: the tensorboard package is not installed; logging to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
