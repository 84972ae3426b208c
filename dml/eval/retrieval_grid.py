"""A picture of retrieval results: each row a query image and its top-k gallery images, with
green borders on correct (same class) and red borders on wrong neighbours.

Queries are drawn at random (seeded), one per class first so the rows show different
classes. Neighbours come from an exact flat index (leave-one-out when there is no gallery),
the images from the shards by key (`dml.eval.shard_lookup`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dml.eval.class_names import class_name
from dml.eval.embedding_store import EmbeddingSet
from dml.eval.index import as_unit_float32, build_index
from dml.eval.plots import new_figure, save_figure
from dml.eval.shard_lookup import read_images_by_key

log = logging.getLogger(__name__)

MAX_COLUMNS = 8
RIGHT, WRONG, QUERY = "#1a9850", "#d73027", "#4a4a4a"


def pick_grid_queries(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` query rows in a seeded random order, distinct classes first."""
    order = np.random.default_rng(seed).permutation(len(labels))
    first_of_class = np.zeros(len(order), dtype=bool)
    _, first = np.unique(labels[order], return_index=True)
    first_of_class[first] = True
    preferred = np.concatenate([order[first_of_class], order[~first_of_class]])
    return preferred[: min(count, len(labels))]


def grid_neighbours(embeddings: EmbeddingSet, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (n, k), gallery rows (n, k)) of the chosen query rows, best first."""
    queries = as_unit_float32(embeddings.query.vectors, "query")
    if embeddings.gallery is None:
        return build_index(queries).search(np.ascontiguousarray(queries[rows]), k, own_ids=rows)
    return build_index(embeddings.gallery.vectors).search(np.ascontiguousarray(queries[rows]), k)


def _class_name(label: Any, class_names: Sequence[str] | None) -> str:
    name = class_name(label, class_names)
    return name if len(name) <= 14 else name[:13] + "…"


def _draw_cell(axes, image: np.ndarray | None, title: str, colour: str) -> None:
    if image is None:
        axes.text(0.5, 0.5, "image\nnot found", ha="center", va="center", fontsize=7, transform=axes.transAxes)
    else:
        axes.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_color(colour)
        spine.set_linewidth(4)
    axes.set_title(title, fontsize=7, color=colour)


def plot_retrieval_grid(
    embeddings: EmbeddingSet,
    shard_dir: str | Path,
    path: str | Path,
    num_queries: int,
    k: int,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> Path | None:
    """Draw ``num_queries`` queries with their top ``k`` (at most MAX_COLUMNS) neighbours.

    Returns the PNG path, or None (with one logged line) when there is nothing to show.
    Reads at most num_queries x (k + 1) images, scanning the splits' shards once.
    """
    query, gallery = embeddings.query, embeddings.gallery
    searchable = len(query.keys) - 1 if gallery is None else len(gallery.keys)
    k = min(k, MAX_COLUMNS, searchable)
    if num_queries < 1 or k < 1:
        log.info("retrieval grid skipped: %d queries x %d neighbours to show", num_queries, k)
        return None
    rows = pick_grid_queries(query.labels, num_queries, seed)
    sims, ids = grid_neighbours(embeddings, rows, k)
    target = gallery if gallery is not None else query
    wanted = {query.keys[r] for r in rows} | {target.keys[i] for i in ids.ravel() if i >= 0}
    images = read_images_by_key(shard_dir, embeddings.splits(), wanted)
    figure = new_figure(1.3 * (k + 1), 1.7 * len(rows))
    cells = figure.subplots(len(rows), k + 1, squeeze=False)
    for line, row in enumerate(rows):
        label = query.labels[row]
        _draw_cell(cells[line, 0], images.get(query.keys[row]), f"query\n{_class_name(label, class_names)}", QUERY)
        for column in range(k):
            hit = int(ids[line, column])
            if hit < 0:
                cells[line, column + 1].set_axis_off()
                continue
            hit_label = target.labels[hit]
            colour = RIGHT if hit_label == label else WRONG
            title = f"{_class_name(hit_label, class_names)}\n{sims[line, column]:.3f}"
            _draw_cell(cells[line, column + 1], images.get(target.keys[hit]), title, colour)
    figure.suptitle(f"top-{k} neighbours (green: same class, red: different class)", fontsize=9)
    return save_figure(figure, path)
