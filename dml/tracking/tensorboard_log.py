"""TensorBoard: training scalars, and the embedding projector for evaluation embeddings.

Uses torch's `SummaryWriter`, which needs the tensorboard package (the ``tracking`` extra).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dml.tracking import require
from dml.tracking.mlflow_store import numeric_metrics

log = logging.getLogger(__name__)
SWITCH = "tracking.tensorboard"
TENSORBOARD_SUBDIR = "tensorboard"
PROJECTOR_MAX_POINTS = 2000  # the projector's browser view stays responsive up to a few thousand
THUMBNAIL_SIDE = 32  # sprite thumbnails, pixels


def summary_writer(folder: str | Path) -> Any:
    """A `SummaryWriter` writing event files into ``folder`` (ConfigError naming the extra when
    tensorboard is not installed)."""
    require("tensorboard", SWITCH)
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


class ScalarLog:
    """Every numeric value of a metrics record (loss parts, lr, images_per_s, memory in MiB,
    eval metrics) as a TensorBoard scalar at the record's step."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.writer = summary_writer(folder)

    def write(self, record: dict[str, Any]) -> None:
        """Write the record's numeric values as scalars at its ``step`` (records without one are skipped)."""
        if "step" not in record:
            return
        for key, value in numeric_metrics(record).items():
            self.writer.add_scalar(key, value, int(record["step"]))

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def write_projector(
    folder: str | Path,
    vectors: np.ndarray,
    labels: Sequence[str],
    thumbnails: torch.Tensor | None = None,
    tag: str = "embeddings",
) -> Path:
    """Embedding projector files in ``folder``: the vectors (N, D), one label per row, and
    optionally thumbnails (N, C, H, W) in [0, 1] packed into a sprite. Returns ``folder``."""
    writer = summary_writer(folder)
    try:
        writer.add_embedding(
            torch.as_tensor(np.asarray(vectors, np.float32)), metadata=list(labels), label_img=thumbnails, tag=tag
        )
    finally:
        writer.close()
    log.info(
        "tensorboard: embedding projector (%d points%s) -> %s",
        len(labels),
        ", with thumbnails" if thumbnails is not None else "",
        folder,
    )
    return Path(folder)
