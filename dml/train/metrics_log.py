"""Run metrics: one JSON object per line in ``metrics.jsonl`` (rank 0), also handed to the
configured trackers (MLflow, TensorBoard: `dml.tracking`)."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

from dml.files import atomic_path

log = logging.getLogger(__name__)


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when on GPU), in MiB."""
    out = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class MetricsLog:
    """Appends records to ``<run>/metrics.jsonl``; inactive on ranks other than 0."""

    def __init__(self, run_dir: Path, active: bool, config: Any = None, stage: str = "train"):
        self.active = active
        self.path = run_dir / "metrics.jsonl"
        self.trackers = None
        if config is not None:  # MLflow / TensorBoard as configured (dml.tracking)
            from dml.tracking.stage_hooks import TrainingTrackers, check_installed

            check_installed(config)  # on every rank: a missing package fails them all alike
            self.trackers = TrainingTrackers(config, stage, run_dir) if active else None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with a ``time`` stamp, seconds) to metrics.jsonl and the trackers; rank 0 only."""
        if not self.active:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.write(record)

    def rewind(self, step: int) -> int:
        """Before a resumed run logs again: move the records of steps after ``step`` (logged
        after the checkpoint the run resumes from, by the run that was killed) from
        metrics.jsonl to ``metrics.replayed.jsonl``, so each step appears once in the log;
        returns how many moved (rank 0 only, 0 elsewhere)."""
        if not self.active or not self.path.exists():
            return 0
        keep: list[str] = []
        moved: list[str] = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                later = int(json.loads(line).get("step", -1)) > step
            except (ValueError, TypeError, AttributeError):  # a torn last line from the kill
                later = True
            (moved if later else keep).append(line)
        if moved:
            with self.path.with_name("metrics.replayed.jsonl").open("a") as handle:
                handle.write("\n".join(moved) + "\n")
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(f"{line}\n" for line in keep))
            log.info(
                "metrics: %d records after step %d (logged before the run stopped) moved to %s",
                len(moved),
                step,
                self.path.with_name("metrics.replayed.jsonl"),
            )
        return len(moved)

    def close(self) -> None:
        """Close the trackers (TensorBoard flushes; the MLflow run stays open for `finish`)."""
        if self.trackers is not None:
            self.trackers.close()

    def finish(self, files: list[Path]) -> None:
        """Upload the run's ``files`` to the trackers and close their runs (rank 0)."""
        if self.trackers is not None:
            self.trackers.finish(files)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
