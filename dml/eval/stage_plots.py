"""Which pictures an evaluation draws, and under which file names in its output folder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dml.config import DMLConfig
from dml.errors import DataError
from dml.eval.embedding_store import EmbeddingSet
from dml.eval.evaluation import EvaluationMetrics
from dml.eval.maps import MAP_FILES, PLOT_KEYS, draw_embedding_maps
from dml.eval.plots import plot_recall_at_k, plot_tar_at_far
from dml.eval.retrieval_grid import plot_retrieval_grid

log = logging.getLogger(__name__)

PLOT_FILES = {
    "tar_at_far": "tar_at_far.png",
    "recall_at_k": "recall_at_k.png",
    "retrieval_grid": "retrieval_grid.png",
    **{PLOT_KEYS[kind]: file for kind, file in MAP_FILES.items()},
}


def draw_report_plots(
    config: DMLConfig,
    embeddings: EmbeddingSet,
    metrics: EvaluationMetrics,
    output_dir: Path,
    class_names: list[str] | None,
) -> dict[str, str]:
    """Draw every picture that applies; returns name -> file name (relative to ``output_dir``).

    Nothing is drawn (one logged line) when ``evaluate.plots`` is false. The retrieval grid
    needs the images, so it is left out (one logged line) when the shards the embeddings came
    from are not readable; ``class_names`` None is the sign of that.
    """
    if not config.evaluate.plots:
        log.info("evaluate: plots skipped (evaluate.plots is false)")
        return {}
    drawn: dict[str, str] = {}
    if metrics.verification is not None:
        plot_tar_at_far(metrics.verification, output_dir / PLOT_FILES["tar_at_far"])
        drawn["tar_at_far"] = PLOT_FILES["tar_at_far"]
    plot_recall_at_k(metrics.recall_curve, output_dir / PLOT_FILES["recall_at_k"], metrics.identification)
    drawn["recall_at_k"] = PLOT_FILES["recall_at_k"]
    if _draw_grid(config, embeddings, output_dir / PLOT_FILES["retrieval_grid"], class_names):
        drawn["retrieval_grid"] = PLOT_FILES["retrieval_grid"]
    vectors, labels = embeddings.query.vectors, embeddings.query.labels
    if embeddings.gallery is not None:
        vectors = np.concatenate([vectors, embeddings.gallery.vectors])
        labels = np.concatenate([labels, embeddings.gallery.labels])
    drawn.update(
        draw_embedding_maps(
            vectors,
            labels,
            config.evaluate.maps,
            output_dir,
            class_names,
            seed=config.seed,
            limit=config.evaluate.map_samples,
        )
    )
    return drawn


def _draw_grid(config: DMLConfig, embeddings: EmbeddingSet, path: Path, class_names: list[str] | None) -> bool:
    if config.evaluate.grid_queries < 1:
        log.info("evaluate: retrieval grid skipped (evaluate.grid_queries is 0)")
        return False
    if class_names is None:
        log.info("evaluate: retrieval grid skipped: the embeddings' shards are not at %s", config.data.shard_dir)
        return False
    try:
        written = plot_retrieval_grid(
            embeddings,
            config.data.shard_dir,
            path,
            config.evaluate.grid_queries,
            max(config.evaluate.ks),
            class_names,
            seed=config.seed,
        )
    except (DataError, OSError) as exc:
        log.info("evaluate: retrieval grid skipped: cannot read images (%s)", exc)
        return False
    return written is not None
