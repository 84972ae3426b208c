"""dml.eval.retrieval_metrics: hand-computed cases and parity with pytorch-metric-learning."""

import logging
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

import dml.eval.metrics
from dml.eval import retrieval_metrics

PML_NAMES = {
    "precision_at_1": "precision_at_1",
    "r_precision": "r_precision",
    "map_at_r": "mean_average_precision_at_r",
}


def on_circle(degrees) -> np.ndarray:
    radians = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], 1).astype(np.float32)


def pml_metrics(query, query_labels, gallery=None, gallery_labels=None, per_class=False) -> dict:
    calculator = AccuracyCalculator(
        include=tuple(PML_NAMES.values()), k="max_bin_count", device=torch.device("cpu"), return_per_class=per_class
    )
    as_tensor = lambda a: None if a is None else torch.from_numpy(np.asarray(a))  # noqa: E731
    result = calculator.get_accuracy(
        as_tensor(query), as_tensor(query_labels), as_tensor(gallery), as_tensor(gallery_labels)
    )
    return {ours: result[theirs] for ours, theirs in PML_NAMES.items()}


def labels_with_sizes(sizes, rng) -> np.ndarray:
    """Shuffled labels where class c has sizes[c] members (sizes 1 and 2 included on purpose)."""
    return rng.permutation(np.repeat(np.arange(len(sizes)), sizes))


def make_dataset(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 2, 3, 5, 8, 13], size=int(rng.integers(40, 90)))
    labels = labels_with_sizes(sizes, rng)
    n = len(labels)
    if kind == "random":
        data = rng.standard_normal((n, 16))
    elif kind == "clustered":
        centres = rng.standard_normal((len(sizes), 32))
        data = centres[labels] + rng.uniform(0.3, 1.2) * rng.standard_normal((n, 32))
    elif kind == "hypercube":  # +-1/4 in 16 dims: all scores exact multiples of 1/8, mass ties
        data = rng.choice([-0.25, 0.25], size=(n, 16))
    elif kind == "duplicates":  # a third of the rows overwritten by copies of other rows
        data = rng.standard_normal((n, 8))
        data[rng.integers(0, n, n // 3)] = data[rng.integers(0, n, n // 3)]
    else:
        raise AssertionError(kind)
    data = data / np.linalg.norm(data, axis=1, keepdims=True)
    return data.astype(np.float32), labels


def test_hand_computed_leave_one_out():
    # angles 0, 10, 25, 45, 70 degrees, labels A A B A B; see the per-query ranks in comments:
    # q0: A B A B  q1: A B A B  q2(R=1): A A A B  q3: B B A A  q4(R=1): A B A A
    points, labels = on_circle([0, 10, 25, 45, 70]), np.array([0, 0, 1, 0, 1])
    result = retrieval_metrics(points, labels, ks=(1, 2, 3))
    assert result["precision_at_1"] == pytest.approx(2 / 5)
    assert result["r_precision"] == pytest.approx((0.5 + 0.5) / 5)
    assert result["map_at_r"] == pytest.approx((0.5 + 0.5) / 5)
    assert [result[f"recall_at_{k}"] for k in (1, 2, 3)] == pytest.approx([2 / 5, 3 / 5, 4 / 5])
    assert result["map_at_2"] == pytest.approx((0.5 + 0.5 + 0.5) / 5)
    assert result["map_at_3"] == pytest.approx((5 / 6 + 5 / 6 + 1 / 6 + 1 / 2) / 5)
    assert result["num_queries"] == 5 and result["num_excluded_queries"] == 0


def test_hand_computed_query_gallery_with_unknown_label():
    gallery, gallery_labels = on_circle([0, 10, 25, 45, 70]), np.array([0, 0, 1, 0, 1])
    # query at 3 degrees (label 0): ranks A A B A B, R = 3; query with label 7 has no match
    result = retrieval_metrics(on_circle([3, 60]), np.array([0, 7]), gallery, gallery_labels, ks=(1, 4))
    assert result["precision_at_1"] == 1.0
    assert result["r_precision"] == pytest.approx(2 / 3)
    assert result["map_at_r"] == pytest.approx((1 + 1) / 3)
    assert result["map_at_4"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert result["recall_at_4"] == 1.0
    assert result["num_queries"] == 1 and result["num_excluded_queries"] == 1


@pytest.mark.parametrize("kind", ["random", "clustered", "hypercube", "duplicates"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("search", ["symmetric-blocks", "per-query"])
def test_equals_pml_leave_one_out(kind, seed, search, monkeypatch):
    data, labels = make_dataset(kind, seed)
    # blocks of ~64 rows: the symmetric sweep crosses many block pairs even on small data
    monkeypatch.setattr(dml.eval.metrics, "SELF_SEARCH_BLOCK", 64)
    ours = retrieval_metrics(data, labels, batch_size=50, symmetric=search == "symmetric-blocks")
    theirs = pml_metrics(data, labels)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    assert ours["num_queries"] + ours["num_excluded_queries"] == len(labels)
    assert ours["num_excluded_queries"] == int((np.bincount(labels) == 1).sum())


@pytest.mark.parametrize("kind", ["random", "clustered", "hypercube", "duplicates"])
@pytest.mark.parametrize("seed", [3, 4])
def test_equals_pml_separate_query_and_gallery(kind, seed):
    data, labels = make_dataset(kind, seed)
    split = len(labels) // 3
    query, gallery = data[:split], data[split:]
    ours = retrieval_metrics(query, labels[:split], gallery, labels[split:], batch_size=16)
    theirs = pml_metrics(query, labels[:split], gallery, labels[split:])
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    absent = ~np.isin(labels[:split], labels[split:])
    assert ours["num_excluded_queries"] == int(absent.sum())


def test_per_class_breakdown_equals_pml():
    data, labels = make_dataset("clustered", 5)
    ours = retrieval_metrics(data, labels, per_class=True)
    theirs = pml_metrics(data, labels, per_class=True)
    kept = sorted(ours["per_class"])
    assert kept == sorted(c for c, n in enumerate(np.bincount(labels)) if n >= 2)
    for name, values in theirs.items():
        assert [ours["per_class"][c][name] for c in kept] == pytest.approx(values, abs=1e-9), name
    assert sum(ours["per_class"][c]["num_queries"] for c in kept) == ours["num_queries"]


def test_torch_inputs_batching_and_string_labels_do_not_change_results():
    data, labels = make_dataset("duplicates", 6)
    reference = retrieval_metrics(data, labels, ks=(1, 3, 20))
    from_torch = retrieval_metrics(torch.from_numpy(data * 2.5), torch.from_numpy(labels), ks=(1, 3, 20), batch_size=3)
    as_strings = retrieval_metrics(data, np.array([f"id{v}" for v in labels]), ks=(1, 3, 20), batch_size=17)
    assert from_torch == pytest.approx(reference, abs=1e-12)
    assert as_strings == pytest.approx(reference, abs=1e-12)


def test_recall_at_k_is_monotone_and_one_when_k_covers_the_gallery():
    data, labels = make_dataset("random", 7)
    ks = (1, 2, 4, 8, 1000)  # 1000 exceeds the gallery: every query with R >= 1 hits
    result = retrieval_metrics(data, labels, ks=ks)
    recalls = [result[f"recall_at_{k}"] for k in ks]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0
    assert result["recall_at_1"] == result["precision_at_1"]
    assert result["map_at_1"] == result["precision_at_1"]


def test_no_query_has_a_relevant_item_gives_nan_and_counts():
    points = on_circle([0, 20, 40])
    result = retrieval_metrics(points, np.array([1, 2, 3]))
    assert math.isnan(result["map_at_r"]) and math.isnan(result["recall_at_5"])
    assert result["num_queries"] == 0 and result["num_excluded_queries"] == 3


def test_ivfpq_adds_neighbour_recall():
    data, labels = make_dataset("clustered", 8)
    result = retrieval_metrics(data, labels, index="ivfpq", nlist=2, pq_m=8, pq_nbits=4, nprobe=2)
    assert 0.0 < result["knn_recall_at_10"] <= 1.0
    assert 0.0 <= result["map_at_r"] <= 1.0 and result["num_queries"] > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(query_labels=np.zeros(3)), "query_labels must be 1-D"),
        (dict(gallery=np.ones((4, 2))), "gallery and gallery_labels"),
        (dict(gallery=np.ones((4, 2)), gallery_labels=np.zeros(5)), "gallery_labels must be 1-D"),
        (dict(gallery=np.ones((4, 3)), gallery_labels=np.zeros(4)), "dimension"),
        (dict(ks=(0, 5)), "ks must be positive"),
        (dict(query=np.ones((1, 2)), query_labels=np.zeros(1)), "at least 2"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    arguments = dict(query=on_circle([0, 30, 60, 90]), query_labels=np.array([0, 0, 1, 1]))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**arguments)


@pytest.mark.parametrize("zero_rows", [0, 1, 7])
@pytest.mark.parametrize("with_gallery", [False, True])
def test_all_zero_rows_are_counted_in_a_warning(zero_rows, with_gallery, caplog):
    """Zero rows are legal (they score 0 against everything) but usually a broken model."""
    rng = np.random.default_rng(zero_rows)
    data = rng.standard_normal((40, 6)).astype(np.float32)
    data[rng.choice(40, zero_rows, replace=False)] = 0
    labels = rng.integers(0, 5, 40)
    gallery = {"gallery": data[::-1].copy(), "gallery_labels": labels[::-1].copy()} if with_gallery else {}
    with caplog.at_level(logging.WARNING, logger="dml.eval.index"):
        retrieval_metrics(data, labels, **gallery)
    warned = [r.getMessage() for r in caplog.records if "all zero" in r.getMessage()]
    names = ["query", "gallery"] if with_gallery else ["embeddings"]  # leave-one-out: one warning
    tail = f"{zero_rows} of 40 rows are all zero (no direction): they score 0 against every row and rank by index"
    assert warned == ([f"{name}: {tail}" for name in names] if zero_rows else [])
