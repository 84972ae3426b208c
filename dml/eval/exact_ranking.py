"""Exact scores for ranking: float64 inner products, and exactly rounded ones where two
candidates come closer than the float64 sum's error bound.

Products of float32 numbers are exact in float64, so a candidate's score is exact up to the
rounding of one D-term sum; ``math.fsum`` removes even that. Ranking by (exactly rounded
score descending, index ascending) is therefore the same on every machine: it never depends
on summation order, SIMD width or the BLAS kernel. Used by `dml.eval.index.rerank_near_ties`,
which rescores only the runs of candidates whose float32 scores came too close to order.
"""

from __future__ import annotations

import math

import numpy as np


def float64_score_error(dim: int) -> float:
    """Bound on |float64 sum - exact| of ``dim`` exact products of two unit rows: each of the
    dim - 1 additions rounds by at most 2**-53 of the running |sum| <= |q| |g| <= 1 + 2e-5;
    doubled for safety."""
    return dim * 2.0**-52


def exactly_rounded_scores(
    queries: np.ndarray, gallery: np.ndarray, query_rows: np.ndarray, gallery_rows: np.ndarray
) -> np.ndarray:
    """``<queries[query_rows[i]], gallery[gallery_rows[i]]>`` (M,) rounded once from the exact
    value (``math.fsum`` of the float64 products, which are exact): the same bits on every
    machine, whatever the summation order, SIMD width or BLAS kernel. Products are formed in
    blocks of ~2**20 values; ``math.fsum`` costs about 1 us per pair at D = 128."""
    out = np.empty(len(query_rows), np.float64)
    step = max(1, 2**20 // max(1, gallery.shape[1]))
    for start in range(0, len(query_rows), step):
        stop = start + step
        products = queries[query_rows[start:stop]].astype(np.float64) * gallery[gallery_rows[start:stop]]
        out[start:stop] = [math.fsum(row) for row in products.tolist()]
    return out


def pair_scores(
    queries: np.ndarray, gallery: np.ndarray, query_rows: np.ndarray, gallery_rows: np.ndarray
) -> np.ndarray:
    """``<queries[query_rows[i]], gallery[gallery_rows[i]]>`` (M,) in float64: products of
    float32 numbers are exact in float64, their sum (numpy's pairwise sum, not BLAS) is within
    ``float64_score_error(D)`` of the exact value, and identical rows score bit-identically.
    Pairs are gathered in blocks of ~2**21 values to bound memory."""
    out = np.empty(len(query_rows), np.float64)
    step = max(1, 2**21 // max(1, gallery.shape[1]))
    for start in range(0, len(query_rows), step):
        stop = start + step
        cand = gallery[gallery_rows[start:stop]].astype(np.float64)
        out[start:stop] = (cand * queries[query_rows[start:stop]].astype(np.float64)).sum(-1)
    return out


def sort_runs_exactly(
    queries: np.ndarray,
    gallery: np.ndarray,
    scores: np.ndarray,
    ids: np.ndarray,
    group: np.ndarray,
    rescore: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Sort the candidates of each marked run by (exactly rounded score descending, gallery
    index ascending); returns (scores float64, ids), both (B, c), other entries unchanged.

    ``queries`` (B, D) unit rows; ``ids`` (B, c) their candidates; ``group`` (B, c)
    non-decreasing along each row: runs of candidates whose float32 scores ``scores`` came
    too close to order them, the runs themselves already in exact order. The entries of
    ``rescore`` (B, c) bool, whole runs, get float64 scores (:func:`pair_scores`) and are
    sorted within their run (a run keeps its columns); a rescored entry within 2 x the
    float64 error bound of its neighbour in the same run is rescored exactly
    (:func:`exactly_rounded_scores`). Only the marked entries are gathered and sorted.
    """
    scores = scores.astype(np.float64)
    rows, cols = np.nonzero(rescore)  # row-major: each run's entries are contiguous, in order
    if rows.size == 0:
        return scores, ids
    ids = ids.copy()
    cand = ids[rows, cols]
    exact = pair_scores(queries, gallery, rows, cand)
    run = rows * (group.shape[1] + 1) + group[rows, cols]  # one key per (row, run), ascending
    order = np.lexsort((cand, -exact, run))
    exact, cand = exact[order], cand[order]  # runs keep their places: run[order] == run
    close_pair = (run[:-1] == run[1:]) & (exact[:-1] - exact[1:] <= 2 * float64_score_error(gallery.shape[1]))
    close = np.zeros(len(exact), dtype=bool)
    close[:-1] |= close_pair
    close[1:] |= close_pair
    if close.any():
        at = np.flatnonzero(close)
        exact[at] = exactly_rounded_scores(queries, gallery, rows[at], cand[at])
        order = np.lexsort((cand, -exact, run))
        exact, cand = exact[order], cand[order]
    scores[rows, cols], ids[rows, cols] = exact, cand
    return scores, ids
