"""Retrieval post-processing: alpha-QE, DBA and k-reciprocal re-ranking equal dense reference
implementations (tests/reranking_reference.py) over random sizes, blocked or not; GAP equals
its definition with ties and distractors; the ranking scorer equals `retrieval_metrics` on the
plain search; the config refuses chains that cannot run."""

from __future__ import annotations

import numpy as np
import pytest

from dml.config import load_config
from dml.config_reranking import RerankingConfig
from dml.errors import ConfigError
from dml.eval import k_reciprocal
from dml.eval.gap import global_average_precision
from dml.eval.index import as_unit_float32
from dml.eval.k_reciprocal import k_reciprocal_rerank
from dml.eval.metrics import retrieval_metrics
from dml.eval.query_expansion import alpha_query_expansion, database_side_augmentation
from dml.eval.ranked_metrics import score_rankings
from dml.eval.reranking import nearest_neighbour_gap, reranked_metrics, vector_ranker
from reranking_reference import dense_expand, dense_gap, dense_k_reciprocal


def clustered(rng: np.random.Generator, n: int, classes: int, dim: int, spread: float = 0.7):
    """Unit float32 embeddings around ``classes`` random centres, labels (n,) int64."""
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, n)
    return as_unit_float32(centres[labels] + spread * rng.normal(size=(n, dim))), labels


CASES = [
    (seed, n, ng, k1, k2, lam)
    for seed, (n, ng, k1, k2, lam) in enumerate(
        [
            (40, None, 20, 6, 0.3),
            (37, 25, 20, 6, 0.3),
            (30, None, 5, 3, 0.0),
            (23, 31, 4, 1, 1.0),
            (50, None, 7, 2, 0.5),
            (18, 44, 9, 4, 0.2),
            (60, None, 30, 10, 0.3),
        ]
    )
]


@pytest.mark.parametrize("seed,n,ng,k1,k2,lam", CASES)
@pytest.mark.parametrize("budget", [k_reciprocal.PAIR_BUDGET, 50])
def test_k_reciprocal_equals_dense_reference(seed, n, ng, k1, k2, lam, budget, monkeypatch):
    monkeypatch.setattr(k_reciprocal, "PAIR_BUDGET", budget)  # 50: one query per block
    rng = np.random.default_rng(seed)
    queries, _ = clustered(rng, n, 5, 8)
    gallery = None if ng is None else clustered(rng, ng, 5, 8)[0]
    reference = dense_k_reciprocal(queries, gallery, k1, k2, lam)
    depth = reference.shape[1] - (1 if gallery is None else 0)
    ids, distances = k_reciprocal_rerank(queries, gallery, depth, k1=k1, k2=k2, lambda_value=lam)
    assert_same_ranking(ids, distances, reference, depth)


def assert_same_ranking(ids: np.ndarray, distances: np.ndarray, reference: np.ndarray, depth: int) -> None:
    """The reference's top ``depth`` by (distance, index), except that items whose distances
    differ by float rounding only (< 1e-12: the sums run in another order) may swap."""
    expected = np.argsort(reference, axis=1, kind="stable")[:, :depth]
    np.testing.assert_allclose(distances, np.take_along_axis(reference, expected, 1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.take_along_axis(reference, ids, 1), distances, rtol=0, atol=1e-12)
    assert all(len(set(row)) == depth for row in ids)
    swapped = ids != expected
    gaps = np.abs(np.take_along_axis(reference, ids, 1) - np.take_along_axis(reference, expected, 1))
    assert (gaps[swapped] < 1e-12).all()


def test_k_reciprocal_shallow_depth_is_the_top_of_the_full_ranking():
    """The memory-bounded merge (sharing items + original top list) loses nothing at small depth."""
    queries, _ = clustered(np.random.default_rng(3), 80, 6, 8, spread=1.2)
    full_ids, full_d = k_reciprocal_rerank(queries, None, 79, k1=10, k2=3)
    for depth in (1, 2, 5, 17):
        ids, d = k_reciprocal_rerank(queries, None, depth, k1=10, k2=3)
        np.testing.assert_array_equal(ids, full_ids[:, :depth])
        np.testing.assert_allclose(d, full_d[:, :depth], atol=1e-12, rtol=0)


def test_k_reciprocal_refuses_sets_smaller_than_k1():
    queries, _ = clustered(np.random.default_rng(0), 10, 2, 4)
    with pytest.raises(ValueError, match="needs at least 21 embeddings"):
        k_reciprocal_rerank(queries, None, 3, k1=20)


@pytest.mark.parametrize("seed", range(6))
def test_query_expansion_and_dba_equal_dense_reference(seed):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(5, 40)), int(rng.integers(8, 40))
    queries, _ = clustered(rng, n, 4, 6)
    database, _ = clustered(rng, m, 4, 6)
    k, alpha = int(rng.integers(1, 7)), float(rng.choice([0.0, 1.0, 3.0]))
    np.testing.assert_allclose(
        alpha_query_expansion(queries, database, k, alpha), dense_expand(queries, database, k, alpha, False), atol=1e-6
    )
    np.testing.assert_allclose(
        database_side_augmentation(database, k, alpha), dense_expand(database, database, k, alpha, True), atol=1e-6
    )
    np.testing.assert_allclose(
        alpha_query_expansion(database, database, k, alpha, leave_self_out=True),
        dense_expand(database, database, k, alpha, True),
        atol=1e-6,
    )


@pytest.mark.parametrize("seed", range(30))
def test_gap_equals_its_definition(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    truth = rng.integers(0, 5, n)
    predicted = np.where(rng.random(n) < 0.6, truth, rng.integers(0, 5, n))
    confidence = np.round(rng.random(n), 1)  # many exact ties
    answerable = rng.random(n) < 0.8  # the rest are distractors
    expected = dense_gap(predicted, confidence, truth, answerable)
    got = global_average_precision(predicted, confidence, truth, answerable)
    assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_gap_known_values():
    # sorted by confidence: correct, wrong (distractor), correct -> (1/1 + 2/3) / 2
    assert global_average_precision([1, 2, 3], [0.9, 0.8, 0.7], [1, 5, 3], [True, False, True]) == pytest.approx(
        (1 + 2 / 3) / 2
    )
    assert np.isnan(global_average_precision([1], [0.5], [1], [False]))
    with pytest.raises(ValueError, match="one entry per query"):
        global_average_precision([1, 2], [0.5], [1, 2], [True, True])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("leave_one_out", [True, False])
def test_scoring_the_plain_ranking_equals_retrieval_metrics(seed, leave_one_out):
    """Random class sizes (1 to 30 items, some classes missing from the gallery)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, int(rng.integers(3, 12)))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    vectors = as_unit_float32(rng.normal(size=(len(sizes), 8))[labels] + rng.normal(size=(len(labels), 8)))
    ks = (1, 4)
    if leave_one_out:
        queries, q_labels, gallery, g_labels = vectors, labels, None, None
    else:
        in_gallery = rng.random(len(labels)) < 0.5
        queries, q_labels = vectors[~in_gallery], labels[~in_gallery]
        gallery, g_labels = vectors[in_gallery], labels[in_gallery]
    expected = retrieval_metrics(queries, q_labels, gallery, g_labels, ks=ks)
    ranker = vector_ranker(queries, queries if gallery is None else gallery, leave_one_out)
    got = score_rankings(ranker, q_labels, q_labels if g_labels is None else g_labels, leave_one_out, ks, batch=7)
    gap = got.pop("global_average_precision")
    assert got == pytest.approx(expected, abs=1e-12)
    assert gap == pytest.approx(nearest_neighbour_gap(queries, q_labels, gallery, g_labels), abs=1e-12)


def test_every_variant_is_reported_and_the_chain_too():
    rng = np.random.default_rng(7)
    vectors, labels = clustered(rng, 120, 8, 8)
    config = RerankingConfig(methods=("dba", "k_reciprocal"), dba={"k": 3}, k_reciprocal={"k1": 8, "k2": 3})
    results = reranked_metrics(vectors, labels, None, None, config, ks=(1, 5))
    assert list(results) == ["dba", "k_reciprocal", "dba+k_reciprocal"]
    for scores in results.values():
        assert 0 <= scores["map_at_r"] <= 1 and 0 <= scores["global_average_precision"] <= 1
        assert scores["num_queries"] == 120 - sum(np.bincount(labels) == 1)
    too_big = RerankingConfig(methods=("k_reciprocal",), k_reciprocal={"k1": 500})
    assert (
        "needs at least" in reranked_metrics(vectors, labels, None, None, too_big, ks=(1,))["k_reciprocal"]["skipped"]
    )


@pytest.mark.parametrize(
    "methods,message",
    [
        ('["k_reciprocal","dba"]', "must come last"),
        ('["alpha_qe","k_reciprocal"]', "not both"),
        ('["dba","dba"]', "twice"),
        ('["qe"]', "alpha_qe"),
    ],
)
def test_config_refuses_chains_that_cannot_run(methods, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"evaluate.reranking.methods={methods}"], check_backbones=False)


@pytest.mark.parametrize("seed", range(5))
def test_nearest_neighbour_gap_orders_near_tied_queries_exactly(seed):
    """GAP ranks queries against each other by confidence; float32 scores tied queries whose
    exact scores differ (pairs of points 1e-7 apart), so GAP was off an exact computation."""
    from dml.eval.gap import global_average_precision
    from dml.eval.reranking import nearest_neighbour_gap
    from exact_reference import exact_inner_products, exact_order

    rng = np.random.default_rng(seed)
    base = rng.choice([-1.0, 1.0], size=(150, 16)) / 4.0
    data = np.concatenate([base, base]) + 1e-7 * rng.standard_normal((300, 16))
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)
    labels = rng.integers(0, 3, 300)
    scores = exact_inner_products(data, data)
    np.fill_diagonal(scores, -np.inf)
    top = exact_order(scores)[:, 0]
    classes, counts = np.unique(labels, return_counts=True)
    answerable = counts[np.searchsorted(classes, labels)] > 1
    want = global_average_precision(labels[top], scores[np.arange(300), top], labels, answerable)
    assert nearest_neighbour_gap(data, labels, None, None) == want
