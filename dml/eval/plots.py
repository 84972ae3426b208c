"""Report pictures: TAR@FAR (ROC) curve, recall@k curve, and a 2-D map of the embeddings.

matplotlib runs on the Agg backend (files only, no display), set on the figure itself so
importing this module never changes the caller's global backend. The retrieval grid, which
needs images from the shards, lives in `dml.eval.retrieval_grid`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dml.eval.class_names import class_name

log = logging.getLogger(__name__)

DPI = 110
MAP_MAX_POINTS = 5000
MAP_MAX_COLOURED_CLASSES = 20


def new_figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas (no pyplot state, safe in worker threads), laid out
    so titles and labels never overlap neighbouring axes."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Save ``figure`` as a PNG at ``path`` (tight bounding box); returns the path."""
    path = Path(path)
    figure.savefig(path, format="png", bbox_inches="tight")
    log.debug("wrote %s", path)
    return path


def plot_tar_at_far(verification: Mapping[str, Any], path: str | Path) -> Path:
    """TAR against FAR (log scale) from ``verification['curve']``; the configured FARs are
    marked and labelled, AUC and EER are in the title."""
    figure = new_figure(6.0, 4.5)
    axes = figure.add_subplot()
    curve = verification["curve"]
    axes.plot(curve["far"], curve["tar"], color="tab:blue", lw=1.8, label="TAR@FAR")
    marked = [(float(k), v) for k, v in verification["tar_at_far"].items() if v is not None]
    if marked:
        axes.scatter(
            [f for f, _ in marked],
            [t for _, t in marked],
            color="tab:red",
            zorder=3,
            s=22,
            label="configured FARs",
            clip_on=False,
        )
        for far, tar in marked:
            # Above the point, on a white box: below it, labels at small TARs ran into the
            # FAR tick labels under the axis.
            axes.annotate(
                f"{tar:.3f}",
                (far, tar),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=7,
                zorder=4,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
            )
        smallest = min(f for f, _ in marked)
        axes.set_xlim(smallest / 3, 1.5)  # room for the outermost points and their labels
    axes.set_xscale("log")
    axes.set_ylim(-0.02, 1.08)
    axes.set_xlabel("false accept rate (FAR)")
    axes.set_ylabel("true accept rate (TAR)")
    axes.set_title(
        f"verification: AUC {verification['roc_auc']:.4f}, EER {verification['eer']:.4f}\n"
        f"{verification['num_positive_pairs']} same / {verification['num_negative_pairs']} "
        f"different pairs",
        fontsize=9,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return save_figure(figure, path)


def plot_recall_at_k(
    recall_curve: Mapping[str, Sequence], path: str | Path, cmc: Mapping[str, Any] | None = None
) -> Path:
    """Recall@k against k (log scale beyond k = 10), with the CMC curve when there is one."""
    figure = new_figure(6.0, 4.5)
    axes = figure.add_subplot()
    axes.plot(recall_curve["k"], recall_curve["recall"], marker="o", ms=3, color="tab:green", label="recall@k")
    if cmc is not None:
        axes.plot(cmc["ranks"], cmc["cmc"], ls="--", color="tab:purple", label="CMC (identification)")
    if max(recall_curve["k"]) > 10:
        axes.set_xscale("log")
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("k (neighbours retrieved)")
    axes.set_ylabel("fraction of queries")
    axes.set_title("retrieval: recall@k", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return save_figure(figure, path)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """Project rows of ``vectors`` (N, D) onto their first two principal components (N, 2),
    by a thin SVD of the centred matrix (N x D floats of scratch)."""
    centred = np.asarray(vectors, np.float64) - np.mean(vectors, axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:2].T
    if projected.shape[1] < 2:  # D == 1: pad so the map still has two axes
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    return projected


def plot_embedding_map(
    vectors: np.ndarray, labels: np.ndarray, path: str | Path, class_names: Sequence[str] | None = None, seed: int = 0
) -> Path:
    """Scatter of the first two principal components, one colour per class, of at most
    MAP_MAX_POINTS rows (a seeded sample). The report's maps are drawn by `dml.eval.maps`."""
    rows = np.arange(len(labels))
    if len(rows) > MAP_MAX_POINTS:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), MAP_MAX_POINTS, replace=False))
    return plot_class_map(
        pca_2d(vectors[rows]),
        labels[rows],
        path,
        class_names,
        f"embeddings (PCA), {len(rows)} samples, {len(np.unique(labels[rows]))} classes",
        ("principal component 1", "principal component 2"),
    )


def plot_class_map(
    points: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None,
    title: str,
    axis_names: tuple[str, str],
    ticks: bool = True,
) -> Path:
    """Scatter of 2-D ``points`` (N, 2), one colour per class (labels (N,)), legend outside.

    With more than MAP_MAX_COLOURED_CLASSES classes the most frequent ones get colours and the
    rest are grey. ``ticks`` False hides tick values (axes of UMAP / t-SNE have no units).
    """
    classes, counts = np.unique(labels, return_counts=True)
    coloured = classes[np.argsort(-counts, kind="stable")][:MAP_MAX_COLOURED_CLASSES]
    figure = new_figure(6.5, 5.5)
    axes = figure.add_subplot()
    others = ~np.isin(labels, coloured)
    if others.any():
        axes.scatter(
            points[others, 0],
            points[others, 1],
            s=6,
            color="0.75",
            label=f"{len(classes) - len(coloured)} other classes",
        )
    colours = _class_colours(len(coloured))
    for colour, label in zip(colours, sorted(coloured), strict=True):
        mine = labels == label
        axes.scatter(points[mine, 0], points[mine, 1], s=10, color=colour, label=class_name(label, class_names))
    axes.set_xlabel(axis_names[0])
    axes.set_ylabel(axis_names[1])
    if not ticks:
        axes.tick_params(labelbottom=False, labelleft=False, length=0)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save_figure(figure, path)


def _class_colours(count: int) -> list:
    """Distinct colours: tab10 up to 10 classes, tab20 up to 20."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i) for i in range(count)]
