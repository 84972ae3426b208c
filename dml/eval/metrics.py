"""Retrieval metrics from a kNN search, as defined in Musgrave, Belongie and Lim,
"A Metric Learning Reality Check" (ECCV 2020).

For a query q with label y, R is the number of gallery items labelled y (not counting q
itself in leave-one-out). With rel_i = 1 when the i-th retrieved item (i = 1, 2, ...) has
label y:

- precision_at_1 = rel_1
- r_precision    = (1/R) * sum_{i<=R} rel_i
- map_at_r       = (1/R) * sum_{i<=R} rel_i * P@i,   P@i = (1/i) * sum_{j<=i} rel_j
- recall_at_k    = 1 if any rel_i = 1 for i <= k (the "Recall@K" of the DML literature)
- map_at_k       = (1/min(k, R)) * sum_{i<=k} rel_i * P@i (AP truncated at k, normalised so
                   that a perfect ranking scores 1)

Each is averaged over queries with R >= 1; queries with no relevant gallery item are left
out and counted in ``num_excluded_queries``. Exact similarity ties are ranked by smaller
gallery index (see :mod:`dml.eval.index`).

Queries are searched in batches grouped by R, each with k = max(R in batch, max ks), and the
per-query values are computed from the batch's (B, k) label-match matrix with array ops, so
the (Nq, max R) neighbour matrix is never held whole. Leave-one-out on a CPU flat index
instead builds all neighbour lists in one symmetric sweep (:mod:`dml.eval.self_search`, half
the multiply-adds of a per-query search) for the queries whose lists fit (see
``_self_search_lists``), and ranks each batch exactly from them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from dml.eval.index import KnnIndex, as_unit_float32, build_index, faiss, rerank_near_ties, warn_zero_rows
from dml.eval.self_search import DEFAULT_BLOCK, SweptLists, min_block_rows, sweep_neighbour_lists
from dml.value_rules import check_ks

log = logging.getLogger(__name__)

RESULT_BUDGET = 2**22  # neighbour entries per batch (B x k); ~50 bytes each, ~200 MB
SELF_SEARCH_BUDGET = 2**27  # list entries (N x width) of the symmetric sweep; 12 bytes each
SELF_SEARCH_BLOCK = DEFAULT_BLOCK  # rows per block of the sweep (tests shrink it)
SWEEP_MARGIN = 2  # sweep list entries past the k + 1 that the near-tie check reads


def as_label_array(labels: Any, length: int, name: str) -> np.ndarray:
    """Labels (numpy or torch, 1-D, one per embedding row) as a numpy array.

    Raises ValueError unless 1-D with ``length`` labels.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != length:
        raise ValueError(f"{name} must be 1-D with one label per embedding ({length}), got shape {array.shape}")
    return array


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, leave_one_out: bool) -> np.ndarray:
    """R per query: gallery items sharing its label, minus the query itself if leave-one-out."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    position = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
    found = classes[position] == query_labels
    counts_per_query = np.where(found, counts[position], 0)
    return counts_per_query - 1 if leave_one_out else counts_per_query


def per_query_scores(matches: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-query metric values from a (B, K) bool label-match matrix, ranks in columns.

    ``num_relevant`` (B,) is R (>= 1). K must be >= max R; columns past the gallery are False.
    Returns float64 arrays of shape (B,) keyed by metric name.
    """
    width = matches.shape[1]
    ranks = np.arange(1, width + 1)
    hits_so_far = np.cumsum(matches, axis=1, dtype=np.int32)
    precision_at_rank = np.where(matches, hits_so_far / ranks, 0.0)  # rel_i * P@i
    within_r = ranks <= num_relevant[:, None]
    r_float = num_relevant.astype(np.float64)
    scores = {
        "precision_at_1": matches[:, 0].astype(np.float64),
        "r_precision": (matches & within_r).sum(axis=1) / r_float,
        "map_at_r": (precision_at_rank * within_r).sum(axis=1) / r_float,
    }
    for k in ks:
        scores[f"recall_at_{k}"] = matches[:, :k].any(axis=1).astype(np.float64)
        scores[f"map_at_{k}"] = precision_at_rank[:, :k].sum(axis=1) / np.minimum(r_float, k)
    return scores


def _batches_by_relevance(num_relevant: np.ndarray, k_floor: int, k_cap: int, batch_size: int):
    """Yield (query rows, k) with queries sorted by R so each batch searches a similar k."""
    rows = np.flatnonzero(num_relevant > 0)
    rows = rows[np.argsort(num_relevant[rows], kind="stable")]
    start = 0
    while start < len(rows):
        # size the batch by the largest k it may need, within the result budget
        size = max(1, min(batch_size, RESULT_BUDGET // max(k_floor, 1)))
        stop = min(start + size, len(rows))
        k = min(max(int(num_relevant[rows[stop - 1]]), k_floor), k_cap)
        if (stop - start) * k > RESULT_BUDGET and stop - start > 1:
            stop = start + max(1, RESULT_BUDGET // k)
        yield rows[start:stop], k
        start = stop


def sweep_width(k: int, k_cap: int) -> int:
    """Entries listed per query by the symmetric sweep to rank its exact top ``k`` among the
    ``k_cap`` other gallery items: k + 1 for the near-tie check of :func:`rerank_near_ties`,
    plus ``SWEEP_MARGIN`` and k / 32 more; a row whose near-tied run still reaches the list's
    end is searched again per query. Scores lie denser deep in a list, so near-tie runs grow
    with k: at k ~ 500 (N = 100k) a margin of 2 sent 2.5 % of the queries to a second search,
    k / 32 sends none there and widens the heaps by 3 %."""
    return min(k + SWEEP_MARGIN + k // 32, k_cap)


def _self_search_lists(
    knn: KnnIndex, plan: list[tuple[np.ndarray, int]], k_cap: int, symmetric: bool | None, order: np.ndarray
) -> SweptLists | None:
    """Neighbour lists from one symmetric sweep for the planned batches whose lists fit, or
    None when every batch is to be searched per query (GPU, IVF-PQ, ``symmetric=False``, or
    no faiss, whose heaps the sweep keeps its lists in).

    A batch fits when its list width is below the smallest sweep block and N lists of that
    width stay within ``SELF_SEARCH_BUDGET``; queries of larger classes (wider lists) are
    searched per query, the rest still come from the sweep. Rows are swept in ``order``
    (classmates together: see :func:`self_neighbour_lists`).
    """
    if symmetric is False or knn.kind != "flat" or knn.backend == "faiss-gpu" or not plan or faiss is None:
        return None
    limit = min(min_block_rows(knn.ntotal, SELF_SEARCH_BLOCK) - 1, SELF_SEARCH_BUDGET // knn.ntotal)
    widths = np.ones(knn.ntotal, dtype=np.int64)  # rows never queried still serve as items
    swept = 0
    for rows, k in plan:
        width = sweep_width(k, k_cap)
        if width <= limit:
            widths[rows], swept = width, swept + len(rows)
    if swept < sum(len(rows) for rows, _ in plan):
        log.info(
            "symmetric self-search covers %d queries; those with lists wider than %d are searched per query",
            swept,
            limit,
        )
    if not swept:
        return None
    return sweep_neighbour_lists(knn.gallery, widths, SELF_SEARCH_BLOCK, order)


def _exact_from_lists(
    knn: KnnIndex,
    batch: np.ndarray,
    rows: np.ndarray,
    k: int,
    width: int,
    lists: SweptLists,
    k_cap: int,
    labels: np.ndarray,
) -> np.ndarray:
    """Top-``k`` ids of queries ``rows`` from the first ``width`` entries of their float32
    lists, exact up to the order of near-tied runs whose items all do or all do not share the
    query's label (``labels``: of the query set): other near ties rescored in float64, and
    the rare row whose exact top k may lie past its list searched again."""
    sims, ids = lists.take(rows, width)
    same_label = labels[ids] == labels[rows][:, None]
    retry = rerank_near_ties(
        batch, knn.gallery, sims, ids, k, knn.score_error, complete=width == k_cap, same_label=same_label
    )
    if retry.any():  # exact ties beyond the list (duplicates, collapsed embeddings)
        log.debug("%d of %d queries (k=%d) searched again past their lists", int(retry.sum()), len(rows), k)
        _, ids[retry, :k] = knn.search(np.ascontiguousarray(batch[retry]), k, rows[retry])
    return ids[:, :k]


def _search_and_score(
    knn: KnnIndex,
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    num_relevant: np.ndarray,
    ks: Sequence[int],
    leave_one_out: bool,
    batch_size: int,
    symmetric: bool | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Search every query with R >= 1 and return (their rows, per-query score arrays)."""
    k_cap = knn.ntotal - (1 if leave_one_out else 0)
    plan = list(_batches_by_relevance(num_relevant, max(ks), k_cap, batch_size))
    lists = None
    if leave_one_out:  # sweep classmates together, in the order of the plan (by R, then label)
        order = np.lexsort((query_labels, num_relevant))
        lists = _self_search_lists(knn, plan, k_cap, symmetric, order)

    def score_batch(rows: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        batch = np.ascontiguousarray(queries[rows])
        if lists is not None and served(rows, k):  # (None checked again for mypy)
            ids = _exact_from_lists(knn, batch, rows, k, sweep_width(k, k_cap), lists, k_cap, query_labels)
        else:
            _, ids = knn.search(batch, k, rows if leave_one_out else None)
        matches = (gallery_labels[ids] == query_labels[rows][:, None]) & (ids >= 0)
        log.debug("searched %d queries (k=%d)", len(rows), k)
        return rows, per_query_scores(matches, num_relevant[rows], ks)

    def served(rows: np.ndarray, k: int) -> bool:
        return lists is not None and bool((lists.widths[rows] >= sweep_width(k, k_cap)).all())

    # batches read from the sweep's lists are numpy work on two cores' worth of threads (numpy
    # releases the GIL); batches searched per query run one at a time, as faiss/torch already
    # use every core for one search. Parts stay in plan order: the means sum in one order.
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]] | None] = [None] * len(plan)
    from_lists = [n for n, (rows, k) in enumerate(plan) if served(rows, k)]
    for n in sorted(set(range(len(plan))) - set(from_lists)):
        parts[n] = score_batch(*plan[n])
    if from_lists:
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            for n, part in zip(from_lists, pool.map(lambda n: score_batch(*plan[n]), from_lists), strict=True):
                parts[n] = part
    done = [part for part in parts if part is not None]
    rows = np.concatenate([p[0] for p in done]) if done else np.empty(0, np.int64)
    names = ["precision_at_1", "r_precision", "map_at_r"]
    names += [f"{m}_at_{k}" for k in ks for m in ("recall", "map")]
    scores = {n: np.concatenate([p[1][n] for p in done]) if done else np.empty(0) for n in names}
    return rows, scores


def _per_class(labels: np.ndarray, scores: dict[str, np.ndarray]) -> dict[Any, dict[str, float]]:
    """Mean of each metric per query label, plus the number of queries of that label."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    table: dict[Any, dict[str, float]] = {}
    means = {n: np.bincount(inverse, weights=v, minlength=len(classes)) / counts for n, v in scores.items()}
    for i, label in enumerate(classes):
        entry: dict[str, float] = {"num_queries": int(counts[i])}
        entry.update({n: float(m[i]) for n, m in means.items()})
        table[label.item() if hasattr(label, "item") else label] = entry
    return table


def retrieval_metrics(
    query: Any,
    query_labels: Any,
    gallery: Any = None,
    gallery_labels: Any = None,
    ks: Sequence[int] = (1, 5, 10),
    *,
    per_class: bool = False,
    batch_size: int = 4096,
    index: str = "flat",
    symmetric: bool | None = None,
    **index_options: Any,
) -> dict[str, Any]:
    """Retrieval metrics of ``query`` (Nq, D) against ``gallery`` (Ng, D) by cosine similarity.

    Embeddings and labels may be numpy arrays or torch tensors; rows are L2-normalised.
    ``gallery`` None means leave-one-out over the query set: a query never retrieves itself,
    its exact duplicates elsewhere still count. Returns floats ``precision_at_1``,
    ``r_precision``, ``map_at_r``, ``recall_at_{k}`` and ``map_at_{k}`` for k in ``ks``
    (definitions in the module docstring), ints ``num_queries`` (queries scored) and
    ``num_excluded_queries`` (no relevant gallery item), and with ``per_class=True`` a
    ``per_class`` dict label -> {num_queries, metric: mean}. With ``index="ivfpq"`` the
    metrics come from approximate search and ``knn_recall_at_{k}`` (neighbour recall against
    exact search on 1000 sampled queries, k = max(ks)) is added. ``symmetric``: for
    leave-one-out on a CPU flat index, None (default) and True build the neighbour lists in
    one symmetric sweep when they fit in memory, False searches per query; results are equal.

    Peak memory: the index's gallery copy plus batch_size x k x ~50 bytes per batch (k at
    most max(R, max ks), batches shrunk to 2**22 entries), plus ~8 bytes x Nq per metric;
    the symmetric sweep adds its lists (at most 2**27 entries, 12 bytes each) and one 4096 x
    4096 score block.

    Raises ValueError for bad ``ks``, a gallery without labels (or the reverse), mismatched
    dimensions or shapes, or fewer than 2 leave-one-out queries.
    """
    ks = check_ks(ks)
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("give both gallery and gallery_labels, or neither (leave-one-out)")
    queries = as_unit_float32(query, "query")
    warn_zero_rows(queries, "query" if gallery is not None else "embeddings")
    q_labels = as_label_array(query_labels, len(queries), "query_labels")
    leave_one_out = gallery is None
    if leave_one_out:
        if len(queries) < 2:
            raise ValueError("leave-one-out needs at least 2 query embeddings")
        knn, g_labels = build_index(queries, index, **index_options), q_labels
    else:
        knn = build_index(gallery, index, **index_options)
        warn_zero_rows(knn.gallery, "gallery")
        g_labels = as_label_array(gallery_labels, knn.ntotal, "gallery_labels")
    if knn.dim != queries.shape[1]:
        raise ValueError(f"query dimension {queries.shape[1]} != gallery dimension {knn.dim}")
    num_relevant = relevant_counts(q_labels, g_labels, leave_one_out)
    rows, scores = _search_and_score(
        knn, queries, q_labels, g_labels, num_relevant, ks, leave_one_out, batch_size, symmetric
    )
    result: dict[str, Any] = {}
    for name, values in scores.items():
        result[name] = float(values.mean()) if len(values) else float("nan")
    result["num_queries"] = len(rows)
    result["num_excluded_queries"] = int(len(queries) - len(rows))
    if not len(rows):
        log.warning("no query has a relevant gallery item; metrics are NaN")
    if knn.kind == "ivfpq":
        result[f"knn_recall_at_{max(ks)}"] = knn.measure_recall(queries, max(ks))
    if per_class:
        result["per_class"] = _per_class(q_labels[rows], scores)
    return result
