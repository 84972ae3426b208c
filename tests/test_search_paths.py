"""Every leave-one-out search path of retrieval_metrics gives the reference metrics exactly,
over random mixes of class sizes (singletons, pairs, mid-sized and large classes in one set).

Paths: the symmetric sweep (rows in label order, blocks small enough that a class spans
several), per-query faiss search, and the torch matmul + top-k fallback. The reference ranks
every row by exact inner products (integer arithmetic, ties by smaller index) and applies
the metric definitions of dml.eval.metrics one query at a time.
"""

import numpy as np
import pytest

import dml.eval.metrics
from dml.eval import retrieval_metrics
from exact_reference import exact_inner_products, exact_order

KS = (1, 3, 7)


def class_size_mix(rng: np.random.Generator) -> np.ndarray:
    """Labels for a random mix of class sizes: some of 1-2, some of 3-12, a few of 20-60."""
    sizes = np.concatenate(
        [
            rng.integers(1, 3, rng.integers(2, 20)),
            rng.integers(3, 13, rng.integers(1, 10)),
            rng.integers(20, 61, rng.integers(0, 3)),
        ]
    )
    return rng.permutation(np.repeat(np.arange(len(sizes)), sizes))


def embeddings(kind: str, labels: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    if kind == "clustered":
        centres = rng.standard_normal((labels.max() + 1, dim))
        data = centres[labels] + rng.uniform(0.3, 1.5) * rng.standard_normal((n, dim))
    elif kind == "duplicates":  # a third of the rows copied over others: exact ties
        data = rng.standard_normal((n, dim))
        data[rng.integers(0, n, n // 3)] = data[rng.integers(0, n, n // 3)]
    else:  # ternary values: scores take few values, mass ties
        data = rng.integers(-1, 2, (n, dim)).astype(np.float64)
        data[np.abs(data).sum(1) == 0, 0] = 1
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    return data.astype(np.float32)


def reference_metrics(data: np.ndarray, labels: np.ndarray, ks=KS) -> dict:
    """Leave-one-out metrics from the exact ranking, query by query."""
    scores = exact_inner_products(data, data)
    np.fill_diagonal(scores, -np.inf)
    order = exact_order(scores)[:, :-1]  # the query itself (-inf) ranks last
    values: dict[str, list[float]] = {}
    for q in range(len(data)):
        hits = labels[order[q]] == labels[q]
        r = int(hits.sum())
        if r == 0:
            continue
        precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        row = {
            "precision_at_1": float(hits[0]),
            "r_precision": hits[:r].sum() / r,
            "map_at_r": (precision_at[:r] * hits[:r]).sum() / r,
        }
        for k in ks:
            row[f"recall_at_{k}"] = float(hits[:k].any())
            row[f"map_at_{k}"] = (precision_at[:k] * hits[:k]).sum() / min(r, k)
        for name, value in row.items():
            values.setdefault(name, []).append(value)
    return {name: float(np.mean(v)) for name, v in values.items()}


def path_options(path: str) -> dict:
    options: dict[str, dict] = {
        "sweep": {"symmetric": True},
        "per-query": {"symmetric": False},
        "torch": {"symmetric": False, "backend": "torch"},
    }
    return options[path]


@pytest.mark.parametrize("path", ["sweep", "per-query", "torch"])
@pytest.mark.parametrize("kind", ["clustered", "duplicates", "ternary"])
@pytest.mark.parametrize("seed", range(4))
def test_each_path_equals_the_reference_over_class_size_mixes(path, kind, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    labels = class_size_mix(rng)
    data = embeddings(kind, labels, int(rng.choice([3, 8])), rng)
    block = int(rng.integers(40, 90))  # classes of 20-60 cross block boundaries
    monkeypatch.setattr(dml.eval.metrics, "SELF_SEARCH_BLOCK", block)
    result = retrieval_metrics(data, labels, ks=KS, batch_size=int(rng.integers(5, 40)), **path_options(path))
    want = reference_metrics(data, labels)
    for name, value in want.items():
        assert result[name] == pytest.approx(value, abs=1e-12), (name, len(labels), block)
    assert result["num_queries"] == int((np.bincount(labels)[labels] > 1).sum())


def test_sweep_serves_the_classes_whose_lists_fit_and_search_serves_the_rest(monkeypatch):
    rng = np.random.default_rng(11)
    labels = np.concatenate([rng.integers(0, 40, 200), np.full(70, 99)])  # one class of 70
    data = embeddings("clustered", labels, 8, rng)
    monkeypatch.setattr(dml.eval.metrics, "SELF_SEARCH_BLOCK", 64)  # lists of the class of 70 do not fit
    widths = []
    sweep = dml.eval.metrics.sweep_neighbour_lists
    monkeypatch.setattr(dml.eval.metrics, "sweep_neighbour_lists", lambda *args: widths.append(args[1]) or sweep(*args))
    result = retrieval_metrics(data, labels, ks=KS, batch_size=50)  # batches of one R range
    small = (np.bincount(labels)[labels] > 1) & (labels != 99)  # queries (R >= 1) of the small classes
    # all but the last batch of small classes (it shares the large class's k) come from the sweep
    assert len(widths) == 1 and (widths[0][labels == 99] == 1).all() and (widths[0][small] > 1).mean() > 0.7
    want = reference_metrics(data, labels)
    assert {name: result[name] for name in want} == pytest.approx(want, abs=1e-12)
