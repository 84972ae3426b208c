"""2-D maps of the embedding space for the report: PCA, UMAP (umap-learn) and t-SNE
(openTSNE), each on the same seeded sample, coloured by class, with its trustworthiness.

Trustworthiness (scikit-learn, Venna & Kaski) is 1 when every point's k nearest neighbours on
the map were also among its nearest neighbours in the embedding space, and falls towards 0
as the map invents neighbours: it tells a reader how far to believe what looks close. UMAP
and t-SNE are imported only when configured (the ``tracking`` extra ships them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dml.eval.plots import pca_2d, plot_class_map
from dml.tracking import require

log = logging.getLogger(__name__)
MAP_NAMES = {"pca": "PCA", "umap": "UMAP", "tsne": "t-SNE"}
MAP_FILES = {"pca": "embedding_map.png", "umap": "embedding_map_umap.png", "tsne": "embedding_map_tsne.png"}
PLOT_KEYS = {"pca": "embedding_map", "umap": "embedding_map_umap", "tsne": "embedding_map_tsne"}
TRUST_NEIGHBOURS = 10
MIN_POINTS = 6  # fewer points make no neighbourhood to keep or lose


@dataclass
class EmbeddingMap:
    """One drawn map: its kind, points (N, 2) and trustworthiness at ``neighbours``."""

    kind: str
    points: np.ndarray
    trustworthiness: float
    neighbours: int


def map_rows(count: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of at most ``limit`` of ``count`` rows (all when fewer)."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


def project(kind: str, vectors: np.ndarray, seed: int) -> np.ndarray:
    """``vectors`` (N, D) laid out in 2-D (N, 2) by ``kind``: "pca", "umap" or "tsne".

    Raises ConfigError naming the extra when umap-learn / openTSNE is not installed.

    Raises ValueError for an unknown ``kind``.
    """
    data = np.asarray(vectors, np.float32)
    if kind == "pca":
        return pca_2d(data)
    if kind == "umap":
        umap = require("umap", "evaluate.maps: umap")
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(data) - 1), random_state=seed, n_jobs=1)
        return np.asarray(reducer.fit_transform(data))
    if kind == "tsne":
        open_tsne = require("openTSNE", "evaluate.maps: tsne")
        perplexity = min(30.0, max(1.0, (len(data) - 1) / 3.0))
        return np.asarray(
            open_tsne.TSNE(n_components=2, perplexity=perplexity, random_state=seed, n_jobs=1, verbose=False).fit(data)
        )
    raise ValueError(f"unknown map kind {kind!r} (choose from {', '.join(MAP_NAMES)})")


def trust(vectors: np.ndarray, points: np.ndarray) -> tuple[float, int]:
    """(trustworthiness, k) of ``points`` (N, 2) as a map of ``vectors`` (N, D)."""
    from sklearn.manifold import trustworthiness

    k = min(TRUST_NEIGHBOURS, (len(vectors) - 1) // 2)
    return float(trustworthiness(np.asarray(vectors, np.float64), points, n_neighbors=k)), k


def draw_embedding_maps(
    vectors: np.ndarray,
    labels: np.ndarray,
    kinds: Sequence[str],
    output_dir: Path,
    class_names: Sequence[str] | None,
    seed: int,
    limit: int,
) -> dict[str, str]:
    """Draw one map per kind in ``output_dir`` on one seeded sample of at most ``limit`` rows;
    returns plot key -> file name. Too few rows for a map: nothing drawn, one logged line."""
    rows = map_rows(len(labels), limit, seed)
    if len(rows) < MIN_POINTS:
        log.info("evaluate: embedding maps skipped: %d samples (at least %d needed)", len(rows), MIN_POINTS)
        return {}
    sample, sample_labels = np.asarray(vectors)[rows], np.asarray(labels)[rows]
    drawn = {}
    for kind in kinds:
        drawn_map = EmbeddingMap(kind, project(kind, sample, seed), 0.0, 0)
        drawn_map.trustworthiness, drawn_map.neighbours = trust(sample, drawn_map.points)
        plot_class_map(
            drawn_map.points,
            sample_labels,
            output_dir / MAP_FILES[kind],
            class_names,
            _title(drawn_map, len(rows), len(labels), len(np.unique(sample_labels))),
            _axis_names(kind),
            ticks=kind == "pca",
        )
        log.info(
            "evaluate: %s map, trustworthiness %.3f (k=%d) -> %s",
            MAP_NAMES[kind],
            drawn_map.trustworthiness,
            drawn_map.neighbours,
            output_dir / MAP_FILES[kind],
        )
        drawn[PLOT_KEYS[kind]] = MAP_FILES[kind]
    return drawn


def _title(drawn: EmbeddingMap, shown: int, total: int, classes: int) -> str:
    sample = f"{shown} samples" if shown == total else f"{shown} of {total} samples (seeded)"
    return (
        f"embeddings ({MAP_NAMES[drawn.kind]}), {sample}, {classes} classes\n"
        f"trustworthiness {drawn.trustworthiness:.3f} (k={drawn.neighbours}; 1 = every map neighbour is a "
        f"true neighbour)"
    )


def _axis_names(kind: str) -> tuple[str, str]:
    if kind == "pca":
        return ("principal component 1", "principal component 2")
    return (f"{MAP_NAMES[kind]} 1", f"{MAP_NAMES[kind]} 2")
