"""Evaluation core: faiss kNN search, retrieval metrics, verification and identification."""

from dml.eval.index import KnnIndex, as_unit_float32, build_index, knn_search
from dml.eval.metrics import retrieval_metrics
from dml.eval.verification import (
    DEFAULT_FARS,
    VerificationPair,
    cmc_curve,
    pair_rows,
    pair_scores,
    read_pairs_file,
    verification_metrics,
)

__all__ = [
    "DEFAULT_FARS",
    "KnnIndex",
    "VerificationPair",
    "as_unit_float32",
    "build_index",
    "cmc_curve",
    "knn_search",
    "pair_rows",
    "pair_scores",
    "read_pairs_file",
    "retrieval_metrics",
    "verification_metrics",
]
