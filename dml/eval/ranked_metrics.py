"""Retrieval metrics (MAP@R, P@1, R-precision, recall@k, GAP) of any ranking of the gallery.

:func:`dml.eval.metrics.retrieval_metrics` ranks by cosine similarity itself; re-ranking
methods rank by other scores, so they hand a ranking function to :func:`score_rankings`, which
asks it for just the depth each batch of queries needs (max(R, max ks), queries grouped by R)
and scores it with the same per-query definitions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dml.eval.gap import global_average_precision
from dml.eval.metrics import per_query_scores, relevant_counts

# rank(query rows (B,), depth) -> (gallery ids (B, depth), scores (B, depth), higher = better)
Ranker = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
BATCH = 2048


def score_rankings(
    rank: Ranker,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    leave_one_out: bool,
    ks: Sequence[int],
    batch: int = BATCH,
) -> dict[str, Any]:
    """The keys of ``retrieval_metrics`` (without per-class) plus ``global_average_precision``
    (top-1 label as the prediction, its score as the confidence; queries with R = 0 are the
    distractors), for the ranking ``rank`` gives.

    ``leave_one_out``: the queries are the gallery, and ``rank`` must leave each query's own
    row out. Raises ValueError when the gallery has no item a query may retrieve.
    """
    ks = tuple(dict.fromkeys(int(k) for k in ks))
    searchable = len(gallery_labels) - (1 if leave_one_out else 0)
    if searchable < 1:
        raise ValueError("the gallery has no item to retrieve")
    num_relevant = relevant_counts(query_labels, gallery_labels, leave_one_out)
    order = np.argsort(num_relevant, kind="stable")
    top_label = np.empty(len(query_labels), dtype=gallery_labels.dtype)
    top_score = np.empty(len(query_labels), dtype=np.float64)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        depth = int(min(max(num_relevant[rows].max(), max(ks), 1), searchable))
        ids, scores = rank(rows, depth)
        top_label[rows], top_score[rows] = gallery_labels[ids[:, 0]], scores[:, 0]
        scored = num_relevant[rows] > 0
        if scored.any():
            matches = gallery_labels[ids[scored]] == query_labels[rows[scored]][:, None]
            parts.append(per_query_scores(matches, num_relevant[rows[scored]], ks))
    result: dict[str, Any] = {}
    names = ["precision_at_1", "r_precision", "map_at_r"] + [f"{m}_at_{k}" for k in ks for m in ("recall", "map")]
    for name in names:
        values = np.concatenate([p[name] for p in parts]) if parts else np.empty(0)
        result[name] = float(values.mean()) if len(values) else float("nan")
    result["num_queries"] = int((num_relevant > 0).sum())
    result["num_excluded_queries"] = int((num_relevant == 0).sum())
    result["global_average_precision"] = global_average_precision(top_label, top_score, query_labels, num_relevant > 0)
    return result
