"""Keeping the best model of a run by one logged metric (`train.best_metric`).

After each evaluation the chosen metric is compared with the best so far; on improvement
rank 0 writes ``<run_dir>/best/model.pt`` (the same format as the final ``model.pt``, so
`dml evaluate` and `dml export` take it) and ``best/best.json`` (metric, value, step).
Every rank computes the same metrics (verification embeddings are gathered on all ranks), so
every rank takes the same decision without a collective. On resume the best so far is read
back from ``best.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from dml.distributed import get_rank
from dml.errors import DMLError
from dml.files import write_json_atomic
from dml.models.model_file import model_file_in

log = logging.getLogger(__name__)
BEST_DIR = "best"


class BestModelKeeper:
    """Tracks ``metric`` (``mode`` "max" or "min") and saves the model when it improves.

    ``save(model, path, extra)`` writes a model file (e.g. `save_final_model` bound to the
    run's config); it is called on rank 0 only.
    """

    def __init__(self, run_dir: Path, metric: str, mode: str, save: Callable[[nn.Module, Path, dict], Any]):
        self.folder = Path(run_dir) / BEST_DIR
        self.metric, self.mode, self.save = metric, mode, save
        self.value: float | None = None
        record = self.folder / "best.json"
        if record.is_file():
            self.value = float(json.loads(record.read_text())["value"])

    def _better(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, metrics: dict[str, Any], step: int, model: nn.Module) -> bool:
        """Save ``model`` when ``metrics[metric]`` beats the best so far; returns whether it did.

        Raises `DMLError` when the evaluation did not produce the metric (names the ones it did).
        """
        if self.metric not in metrics:
            raise DMLError(
                f"train.best_metric '{self.metric}' was not computed; this run logs: "
                f"{', '.join(sorted(k for k in metrics if k != 'step'))}"
            )
        value = float(metrics[self.metric])
        if math.isnan(value) or not self._better(value):
            return False
        self.value = value
        if get_rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            info = {"metric": self.metric, "value": value, "step": step, "mode": self.mode}
            self.save(model, model_file_in(self.folder), {"best": info})
            write_json_atomic(self.folder / "best.json", info, sort_keys=False)
            log.info("train: best %s = %.4f at step %d -> %s", self.metric, value, step, model_file_in(self.folder))
        return True
