"""kNN search of dml.eval.index: exact ranking, ties, leave-one-out, backends, IVF-PQ."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import dml.eval.index as index_module
from dml.eval import build_index, knn_search
from exact_reference import exact_inner_products, exact_order

ROOT = Path(__file__).resolve().parents[1]


def unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clustered(n: int, dim: int, classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    labels = rng.integers(0, classes, n)
    return unit_rows(centres[labels] + noise * rng.standard_normal((n, dim))), labels


def exact_ranking(query: np.ndarray, gallery: np.ndarray, k: int, own: np.ndarray | None = None) -> np.ndarray:
    """Reference: exactly rounded scores (integer arithmetic, no BLAS), sorted by (score desc,
    index asc), own index removed."""
    order = exact_order(exact_inner_products(query, gallery))
    if own is not None:
        order = np.array([row[row != i] for row, i in zip(order, own, strict=True)])
    return order[:, :k]


def hypercube_points(n: int, dim: int, seed: int) -> np.ndarray:
    """Rows of +-1/sqrt(dim) with dim a power of 4: every score is exact in float32, many tie."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, dim))
    return (signs / np.sqrt(dim)).astype(np.float32)


def test_flat_search_matches_exact_float64_ranking():
    data, _ = clustered(600, 24, 30, 0.6, seed=0)
    query, gallery = data[:150], data[150:]
    sims, ids = knn_search(query, gallery, k=12, batch_size=64)
    assert ids.dtype == np.int64 and sims.shape == (150, 12)
    np.testing.assert_array_equal(ids, exact_ranking(query, gallery, 12))
    expected = np.take_along_axis(exact_inner_products(query, gallery), ids, 1)
    np.testing.assert_allclose(sims, expected, atol=1e-6)
    assert (np.diff(sims, axis=1) <= 0).all()


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_ties_are_ordered_by_gallery_index(backend):
    # 16-dim hypercube: scores are multiples of 1/8, so huge groups tie exactly
    points = hypercube_points(300, 16, seed=1)
    _, ids = knn_search(points[:50], points, k=40, backend=backend, batch_size=16)
    np.testing.assert_array_equal(ids, exact_ranking(points[:50], points, 40))


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("zero_rows, k", [(1, 5), (7, 30), (40, 139)])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_zero_queries_list_the_first_items_without_a_search(monkeypatch, backend, zero_rows, k, leave_one_out):
    """A zero row scores exactly 0 against every item, so its exact list is the items by
    index. Searched, it was one tie as long as the gallery, re-searched at doubling widths
    and rescored whole: ~1 s per zero query at N = 35k (found by a new-user trial)."""
    data, _ = clustered(140, 8, 6, 0.5, seed=zero_rows)
    zero = np.random.default_rng(k).choice(140, zero_rows, replace=False)
    data[zero] = 0
    searched = []
    raw = index_module.KnnIndex._raw_search
    monkeypatch.setattr(
        index_module.KnnIndex, "_raw_search", lambda self, q, width: searched.append(q.copy()) or raw(self, q, width)
    )
    k = min(k, 139) if leave_one_out else k
    _, ids = knn_search(data, None if leave_one_out else data, k=k, exclude_self=leave_one_out, backend=backend)
    np.testing.assert_array_equal(ids, exact_ranking(data, data, k, np.arange(140) if leave_one_out else None))
    assert not any((~batch.any(axis=1)).any() for batch in searched)  # zero queries never searched


def test_leave_one_out_drops_own_index_but_keeps_duplicates():
    base, _ = clustered(200, 16, 10, 0.5, seed=2)
    data = np.concatenate([base, base[:20]])  # rows 200..219 duplicate rows 0..19
    sims, ids = knn_search(data, k=5, exclude_self=True, batch_size=33)
    assert not (ids == np.arange(len(data))[:, None]).any()
    twin = np.concatenate([np.arange(200, 220), np.arange(20, 200), np.arange(20)])
    has_twin = np.arange(len(data)) < 20
    has_twin |= np.arange(len(data)) >= 200
    np.testing.assert_array_equal(ids[has_twin, 0], twin[has_twin])
    np.testing.assert_allclose(sims[has_twin, 0], 1.0, atol=1e-6)
    np.testing.assert_array_equal(ids, exact_ranking(data, data, 5, own=np.arange(len(data))))


def permuted_copies(dim: int, copies: int, rng) -> np.ndarray:
    """Unit rows that are coordinate permutations of one positive row of mixed magnitudes."""
    base = unit_rows(np.abs(rng.standard_normal((1, dim))) * 10.0 ** rng.integers(-6, 1, dim))[0]
    return np.stack([base[rng.permutation(dim)] for _ in range(copies)])  # same float32 values


@pytest.mark.parametrize("dim", [8, 32, 128])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_rows_with_permuted_products_tie_exactly_whatever_the_summation_order(dim, seed, backend):
    # Against a constant query, permuted rows have the same products in another order: their
    # exact scores are equal, while any float sum (BLAS or numpy) may round them apart.
    rng = np.random.default_rng(seed)
    copies = permuted_copies(dim, 40, rng)
    others = unit_rows(rng.standard_normal((60, dim)))
    gallery = np.concatenate([others[:30], copies, others[30:]])
    query = np.full((1, dim), dim**-0.5, np.float32)
    _, ids = knn_search(query, gallery, k=45, backend=backend)
    np.testing.assert_array_equal(ids, exact_ranking(query, gallery, 45))
    in_copies = ids[0][(ids[0] >= 30) & (ids[0] < 70)]
    np.testing.assert_array_equal(in_copies, np.sort(in_copies))


def test_leave_one_out_with_more_duplicates_than_k():
    # 30 copies of one point: the query's own index ranks after the smaller copies and falls
    # outside the top k+1 for late copies; the last column is dropped instead
    rng = np.random.default_rng(3)
    data = unit_rows(np.concatenate([np.repeat(rng.standard_normal((1, 8)), 30, 0), rng.standard_normal((50, 8))]))
    for backend in ("faiss", "torch"):
        _, ids = knn_search(data, k=4, exclude_self=True, backend=backend)
        np.testing.assert_array_equal(ids[:30], [[j for j in range(5) if j != i][:4] for i in range(30)])
        np.testing.assert_array_equal(ids, exact_ranking(data, data, 4, own=np.arange(len(data))))


def test_torch_backend_equals_faiss_and_merges_gallery_blocks(monkeypatch):
    data, _ = clustered(500, 32, 25, 0.8, seed=4)
    expected_sims, expected_ids = knn_search(data, k=15, exclude_self=True, backend="faiss")
    monkeypatch.setattr(index_module, "TORCH_SCORE_BLOCK", 64 * 37)  # 37-row gallery blocks
    sims, ids = knn_search(data, k=15, exclude_self=True, backend="torch", batch_size=64)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(sims, expected_sims, atol=1e-6)


def test_results_do_not_depend_on_batch_size_and_accept_torch_input():
    data, _ = clustered(300, 16, 12, 0.7, seed=5)
    _, ids_small = knn_search(data, k=7, exclude_self=True, batch_size=7)
    _, ids_big = knn_search(torch.from_numpy(data * 3.0), k=7, exclude_self=True, batch_size=4096)
    np.testing.assert_array_equal(ids_small, ids_big)


def test_search_widens_when_ties_run_past_the_candidate_margin():
    # 60 identical gallery rows all closest to the query: top-5 must be their 5 smallest ids
    rng = np.random.default_rng(6)
    far = unit_rows(rng.standard_normal((100, 8)))
    near = np.repeat(unit_rows(rng.standard_normal((1, 8))), 60, 0)
    gallery = np.concatenate([far[:40], near, far[40:]])
    for backend in ("faiss", "torch"):
        knn = build_index(gallery, backend=backend)
        _, ids = knn.search(near[:1].copy(), 5)
        np.testing.assert_array_equal(ids[0], [40, 41, 42, 43, 44])


@pytest.fixture
def one_faiss_thread():
    """k-means training runs many tiny OpenMP regions, which crawl on a shared, loaded
    2-core machine; one thread keeps the IVF-PQ test fast and does not change results."""
    faiss = index_module.faiss
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_ivfpq_reports_recall_against_exact_search(caplog, one_faiss_thread):
    data, _ = clustered(3000, 32, 40, 0.4, seed=7)
    options = dict(nlist=16, pq_m=32, pq_nbits=4, nprobe=16)
    with caplog.at_level(logging.INFO, logger="dml.eval.index"):
        _, ids = knn_search(data[:300], data, k=10, index="ivfpq", **options)
    assert ids.shape == (300, 10) and ((ids >= -1) & (ids < 3000)).all()
    lines = [r.getMessage() for r in caplog.records if "IVF-PQ recall@10" in r.getMessage()]
    assert len(lines) == 1
    logged = float(lines[0].rsplit(":", 1)[1])
    # all 300 queries are sampled (sample=1000 > 300): recompute the recall from the results
    exact = exact_ranking(data[:300], data, 10)
    recall = np.mean([np.intersect1d(a, e).size for a, e in zip(ids, exact, strict=True)]) / 10
    assert logged == pytest.approx(recall, abs=1e-4)
    assert 0.6 < recall < 1.0  # product quantisation loses some neighbours, not most
    fewer_bits = build_index(data, "ivfpq", **{**options, "pq_m": 8})
    assert fewer_bits.kind == "ivfpq" and fewer_bits.measure_recall(data[:300], 10) < recall
    assert build_index(data).measure_recall(data[:300], 10) == 1.0


def test_without_faiss_falls_back_to_torch_with_one_log_line(tmp_path):
    script = textwrap.dedent(
        """
        import json, logging, sys
        sys.modules["faiss"] = None  # makes `import faiss` raise ImportError
        logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s")
        import numpy as np
        from dml.eval import knn_search
        rng = np.random.default_rng(0)
        x = rng.standard_normal((200, 8)).astype(np.float32)
        _, flat = knn_search(x, k=5, exclude_self=True)
        _, ivf = knn_search(x, k=5, exclude_self=True, index="ivfpq")
        print(json.dumps({"flat": flat.tolist(), "ivf": ivf.tolist()}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    log_lines = [line for line in done.stderr.splitlines() if line.startswith("LOG dml.eval")]
    assert len(log_lines) == 1 and "faiss not importable" in log_lines[0], done.stderr
    result = json.loads(done.stdout)
    x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    expected = exact_ranking(unit_rows(x), unit_rows(x), 5, own=np.arange(200))
    np.testing.assert_array_equal(result["flat"], expected)
    np.testing.assert_array_equal(result["ivf"], expected)


@pytest.mark.skipif(index_module.faiss is None or index_module.faiss.get_num_gpus() == 0, reason="no faiss GPU")
def test_gpu_index_matches_cpu():  # pragma: no cover - runs only on GPU machines
    data, _ = clustered(2000, 64, 50, 0.5, seed=8)
    assert build_index(data).backend == "faiss-gpu"
    _, gpu_ids = knn_search(data, k=10, exclude_self=True)
    _, cpu_ids = knn_search(data, k=10, exclude_self=True, use_gpu=False)
    np.testing.assert_array_equal(gpu_ids, cpu_ids)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: knn_search(x, k=100), "k must be in"),
        (lambda x: knn_search(x, k=3, exclude_self=True, gallery=x[:10]), "exclude_self"),
        (lambda x: knn_search(x[:, 0], k=3), "2-D"),
        (lambda x: knn_search(np.where(x > 1.5, np.nan, x), k=3), "NaN"),
        (lambda x: knn_search(x, x[:, :4], k=3), "dimension"),
        (lambda x: knn_search(x, k=3, index="hnsw"), "index must be one of"),
        (lambda x: knn_search(x, k=3, backend="cuda"), "backend must be one of"),
        (lambda x: knn_search(x, k=3, batch_size=0), "batch_size"),
    ],
)
def test_bad_input_raises_one_line_value_error(call, message):
    x = np.random.default_rng(9).standard_normal((50, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        call(x)


@pytest.mark.parametrize("dim", [3, 16, 130])
def test_exactly_rounded_scores_equal_integer_arithmetic(dim):
    from dml.eval.exact_ranking import exactly_rounded_scores

    rng = np.random.default_rng(dim)
    rows = unit_rows(rng.standard_normal((40, dim)) * 10.0 ** rng.integers(-8, 1, (40, dim)))
    pairs = rng.integers(0, 40, (2, 300))
    got = exactly_rounded_scores(rows, rows, pairs[0], pairs[1])
    np.testing.assert_array_equal(got, exact_inner_products(rows, rows)[pairs[0], pairs[1]])
