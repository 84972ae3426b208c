"""Retrieval post-processing in `dml evaluate`: the configured chain of DBA, alpha-QE and
k-reciprocal re-ranking, each method alone and the whole chain, scored like the plain search.

Leave-one-out (no gallery split): the query set is the database, so DBA changes the queries
too, alpha-QE leaves each query's own row out of its expansion, and no ranking returns a
query's own row. With a gallery split, DBA changes the gallery only (the landmark-retrieval
convention: queries are expanded at query time by alpha-QE).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dml.config_reranking import RerankingConfig
from dml.eval.exact_ranking import exactly_rounded_scores
from dml.eval.gap import global_average_precision
from dml.eval.index import as_unit_float32, build_index
from dml.eval.k_reciprocal import KReciprocalRanker
from dml.eval.query_expansion import alpha_query_expansion, database_side_augmentation
from dml.eval.ranked_metrics import Ranker, score_rankings

log = logging.getLogger(__name__)


def nearest_neighbour_gap(
    queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray | None, gallery_labels: np.ndarray | None
) -> float:
    """GAP of the plain search: each query predicts its nearest gallery item's label with its
    cosine similarity, exactly rounded, as confidence (leave-one-out when ``gallery`` is None).
    NaN when no query has a relevant gallery item."""
    units = as_unit_float32(queries, "queries")
    leave_one_out = gallery is None
    knn = build_index(units if leave_one_out else gallery)
    labels = query_labels if gallery_labels is None else gallery_labels
    own = np.arange(len(units)) if leave_one_out else None
    _, ids = knn.search(units, 1, own)
    # GAP ranks the queries against each other by confidence: float32 scores misorder near-tied
    # queries (seen as 1e-8 off an exact computation); exactly rounded ones cost ~1 us a query
    confidence = exactly_rounded_scores(units, knn.gallery, np.arange(len(units)), ids[:, 0])
    classes, counts = np.unique(labels, return_counts=True)
    position = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
    present = (classes[position] == query_labels) & (counts[position] > (1 if leave_one_out else 0))
    return global_average_precision(labels[ids[:, 0]], confidence, query_labels, present)


def vector_ranker(queries: np.ndarray, gallery: np.ndarray, leave_one_out: bool) -> Ranker:
    """Rank by cosine similarity of (possibly expanded) vectors, own row left out if LOO."""
    knn = build_index(gallery)

    def rank(rows: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = knn.search(np.ascontiguousarray(queries[rows]), depth, rows if leave_one_out else None)
        return ids, sims.astype(np.float64)

    return rank


def chain_ranker(
    methods: Sequence[str], config: RerankingConfig, queries: np.ndarray, gallery: np.ndarray | None
) -> Ranker:
    """The ranking after applying ``methods`` in order (k_reciprocal, if present, last)."""
    leave_one_out = gallery is None
    database = queries if gallery is None else gallery
    if "dba" in methods:
        database = database_side_augmentation(database, config.dba.k, config.dba.alpha)
        if leave_one_out:
            queries = database
    if "alpha_qe" in methods:
        queries = alpha_query_expansion(
            queries, database, config.alpha_qe.k, config.alpha_qe.alpha, leave_self_out=leave_one_out
        )
    if "k_reciprocal" in methods:
        settings = config.k_reciprocal
        ranker = KReciprocalRanker(
            queries, None if leave_one_out else database, settings.k1, settings.k2, settings.lambda_value
        )

        def rank(rows: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
            ids, distances = ranker.rank(rows, depth)
            return ids, -distances  # smaller distance = higher confidence

        return rank
    return vector_ranker(queries, database, leave_one_out)


def reranked_metrics(
    queries: Any,
    query_labels: np.ndarray,
    gallery: Any | None,
    gallery_labels: np.ndarray | None,
    config: RerankingConfig,
    ks: Sequence[int],
) -> dict[str, dict[str, Any]]:
    """Metrics (``score_rankings`` keys plus ``seconds``) for each configured method alone and,
    when there are several, for the chain, keyed "dba", "alpha_qe", "k_reciprocal",
    "dba+alpha_qe" and so on. Empty when no method is configured. A variant that cannot run on
    this data (e.g. k1 + 1 larger than the set) gets {"skipped": reason} and a logged warning."""
    units = as_unit_float32(queries, "queries")
    base = None if gallery is None else as_unit_float32(gallery, "gallery")
    labels = query_labels if gallery_labels is None else gallery_labels
    variants: list[tuple[str, ...]] = [(m,) for m in config.methods]
    if len(config.methods) > 1:
        variants.append(tuple(config.methods))
    results: dict[str, dict[str, Any]] = {}
    for methods in variants:
        started, name = time.perf_counter(), "+".join(methods)
        try:
            ranker = chain_ranker(methods, config, units, base)
            scores = score_rankings(ranker, query_labels, labels, gallery is None, ks)
        except ValueError as error:  # e.g. k1 + 1 larger than the data: report, don't fail the stage
            log.warning("evaluate: %s re-ranking skipped: %s", name, error)
            results[name] = {"skipped": str(error)}
            continue
        scores["seconds"] = time.perf_counter() - started
        log.info(
            "evaluate: %s re-ranking: map_at_r=%.4f precision_at_1=%.4f (%.1f s)",
            name,
            scores["map_at_r"],
            scores["precision_at_1"],
            scores["seconds"],
        )
        results[name] = scores
    return results
