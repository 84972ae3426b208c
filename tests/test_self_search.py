"""dml.eval.self_search: symmetric leave-one-out neighbour lists against brute force."""

import itertools

import numpy as np
import pytest

import dml.eval.metrics
from dml.eval import retrieval_metrics
from dml.eval.self_search import block_bounds, min_block_rows, self_neighbour_lists, sweep_neighbour_lists
from exact_reference import exact_inner_products, exact_order


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def brute_force(units: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``width`` exact inner products of each row with the others (ties by smaller index)."""
    scores = exact_inner_products(units, units)
    np.fill_diagonal(scores, -np.inf)
    ids = exact_order(scores)[:, :width]
    return np.take_along_axis(scores, ids, 1), ids


def test_block_bounds_cover_the_rows_in_near_equal_blocks():
    bounds = block_bounds(1000, 300)
    assert bounds[0][0] == 0 and bounds[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert [b - a for a, b in bounds] == [250, 250, 250, 250]
    assert block_bounds(5, 300) == [(0, 5)]
    assert min_block_rows(1001, 300) == 250


@pytest.mark.parametrize("n, block", [(40, 4096), (257, 64), (500, 100)])
@pytest.mark.parametrize("permuted", [False, True])
def test_lists_equal_brute_force_top_k(n, block, permuted):
    units = unit_rows(n, 8, seed=n)
    widths = np.random.default_rng(0).integers(1, min(12, min_block_rows(n, block) - 1), n)
    order = np.random.default_rng(1).permutation(n) if permuted else None  # swept in that order
    scores, ids = self_neighbour_lists(units, widths, block, order)
    want_scores, want_ids = brute_force(units, int(widths.max()))
    for row, width in enumerate(widths):
        # continuous random data: no float32 near-ties, so the order is the exact one
        assert ids[row, :width].tolist() == want_ids[row, :width].tolist(), row
        assert np.allclose(scores[row, :width], want_scores[row, :width], atol=1e-6)
        assert row not in ids[row, :width]
        assert (ids[row, width:] == -1).all() and np.isneginf(scores[row, width:]).all()


def test_duplicate_rows_are_listed_and_a_row_never_lists_itself():
    units = unit_rows(60, 4, seed=3)
    units[30:] = units[:30]  # every row has one exact copy
    scores, ids = self_neighbour_lists(units, np.full(60, 3), block=16)
    copy_of = np.r_[np.arange(30, 60), np.arange(30)]
    assert (ids[:, 0] == copy_of).all()
    assert np.allclose(scores[:, 0], 1.0, atol=1e-6)
    assert not (ids == np.arange(60)[:, None]).any()


@pytest.mark.parametrize(
    "widths, message",
    [
        (np.full(100, 20), r"widths must be in \[1, 19\]"),
        (np.zeros(100, dtype=int), "widths must be in"),
        (np.ones(7, dtype=int), "one width per row"),
    ],
)
def test_bad_widths_raise(widths, message):
    with pytest.raises(ValueError, match=message):
        self_neighbour_lists(unit_rows(100, 4, seed=0), widths, block=20)


def test_metrics_fall_back_to_per_query_search_when_lists_do_not_fit(monkeypatch):
    rng = np.random.default_rng(5)
    units, labels = unit_rows(300, 8, seed=5), rng.integers(0, 10, 300)  # R about 30
    monkeypatch.setattr(dml.eval.metrics, "SELF_SEARCH_BLOCK", 16)  # lists need > 15 entries
    calls = []
    monkeypatch.setattr(
        dml.eval.metrics, "sweep_neighbour_lists", lambda *args: calls.append(args) or sweep_neighbour_lists(*args)
    )
    fallback = retrieval_metrics(units, labels)
    assert calls == []
    monkeypatch.setattr(dml.eval.metrics, "SELF_SEARCH_BLOCK", 300)
    swept = retrieval_metrics(units, labels)
    assert len(calls) == 1
    assert swept == fallback


@pytest.mark.parametrize("cols", [64, 70, 20])
def test_scores_above_finds_every_entry_over_its_floor(cols):
    import torch

    from dml.eval.self_search import scores_above

    rng = np.random.default_rng(cols)
    scores = torch.from_numpy(rng.standard_normal((50, cols)).astype(np.float32))
    row_floor = torch.from_numpy(rng.uniform(1.0, 2.5, 50).astype(np.float32))
    col_floor = torch.from_numpy(rng.uniform(1.0, 2.5, cols).astype(np.float32))
    rows, columns, values = scores_above(scores, row_floor, col_floor)
    floor = np.minimum(row_floor.numpy()[:, None], col_floor.numpy()[None, :])
    got, want = (
        set(zip(rows.tolist(), columns.tolist(), strict=True)),
        set(zip(*np.nonzero(scores.numpy() > floor), strict=True)),
    )
    assert want <= got and len(got) == len(rows)  # each entry once; extras only from passing chunks
    chunk_min = np.minimum.reduceat(col_floor.numpy(), np.arange(0, cols, 32))[columns.numpy() // 32]
    assert (values.numpy() > np.minimum(row_floor.numpy()[rows.numpy()], chunk_min)).all()
    assert torch.equal(values, scores[rows, columns])


def awkward_embeddings(kind: str, n: int, dim: int, rng) -> np.ndarray:
    """Inputs that stress exact ranking: duplicates, ternary values, zero rows, one point."""
    if kind == "duplicates":
        data = rng.standard_normal((max(1, n // 5), dim))[rng.integers(0, max(1, n // 5), n)]
    elif kind == "ternary":  # scores take few values: mass ties
        data = rng.integers(-1, 2, (n, dim)).astype(np.float64)
        data[np.abs(data).sum(1) == 0, 0] = 1
    elif kind == "zero-rows":
        data = rng.standard_normal((n, dim))
        data[rng.random(n) < 0.2] = 0
    elif kind == "near-duplicates":
        base = rng.standard_normal((max(1, n // 8), dim))
        data = base[rng.integers(0, len(base), n)] + 1e-7 * rng.standard_normal((n, dim))
    else:  # all rows equal
        data = np.tile(rng.standard_normal(dim), (n, 1))
    return data.astype(np.float32)


@pytest.mark.parametrize("kind", ["duplicates", "ternary", "zero-rows", "near-duplicates", "equal"])
@pytest.mark.parametrize("seed", range(4))
def test_symmetric_and_per_query_search_agree_on_tied_inputs(kind, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(60, 220))
    data = awkward_embeddings(kind, n, int(rng.choice([3, 8, 33])), rng)
    # mixed class sizes, one class large enough that its lists do not fit 32-row blocks
    labels = np.concatenate([rng.integers(0, n // 4, n - 50), np.full(50, n)])
    rng.shuffle(labels)
    monkeypatch.setattr(dml.eval.metrics, "SELF_SEARCH_BLOCK", int(rng.choice([32, 45])))
    sweeps = []
    monkeypatch.setattr(
        dml.eval.metrics, "sweep_neighbour_lists", lambda *args: sweeps.append(args[1]) or sweep_neighbour_lists(*args)
    )
    # batches of 25 queries sorted by R: only the last ones (the large class) need long lists
    swept = retrieval_metrics(data, labels, ks=(1, 3), per_class=True, symmetric=True, batch_size=25)
    per_query = retrieval_metrics(data, labels, ks=(1, 3), per_class=True, symmetric=False, batch_size=25)
    assert len(sweeps) == 1 and (sweeps[0][labels == n] == 1).all()  # the large class: per query
    assert swept == per_query


def test_one_loose_row_does_not_open_the_filter_for_its_block():
    import torch

    from dml.eval.self_search import scores_above

    scores = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (64, 96)).astype(np.float32))
    row_floor, col_floor = torch.full((64,), 0.9), torch.full((96,), 0.9)
    row_floor[5] = -2.0  # this row takes every score, the others only those above 0.9
    rows, columns, _ = scores_above(scores, row_floor, col_floor)
    want = set(zip(*np.nonzero((scores.numpy() > 0.9) | (np.arange(64) == 5)[:, None]), strict=True))
    assert set(zip(rows.tolist(), columns.tolist(), strict=True)) == want  # not every score of the block


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("n, block", [(300, 32), (130, 60)])
def test_lists_equal_brute_force_whatever_the_number_of_workers(workers, n, block):
    import torch

    units = unit_rows(n, 8, seed=n + workers)
    widths = np.random.default_rng(workers).integers(1, min_block_rows(n, block) - 1, n)
    threads = torch.get_num_threads()
    scores, ids = self_neighbour_lists(units, widths, block, workers=workers)
    assert torch.get_num_threads() == threads  # the caller's kernel threads are restored
    want_scores, want_ids = brute_force(units, int(widths.max()))
    for row, width in enumerate(widths):
        assert ids[row, :width].tolist() == want_ids[row, :width].tolist(), row
        assert np.allclose(scores[row, :width], want_scores[row, :width], atol=1e-6)


@pytest.mark.parametrize("blocks, workers", [(2, 4), (5, 2), (9, 3), (16, 8)])
def test_pair_schedule_hands_out_every_pair_once_and_never_two_sharing_a_block(blocks: int, workers: int) -> None:
    import threading
    import time

    from dml.eval.self_search import _PairSchedule

    schedule, guard = _PairSchedule(blocks), threading.Lock()
    in_work: set[int] = set()
    handed: list[tuple[int, int]] = []
    overlaps: list[tuple[int, int]] = []

    def worker() -> None:
        while (pair := schedule.take()) is not None:
            with guard:
                if in_work & set(pair):
                    overlaps.append(pair)
                in_work.update(pair)
                handed.append(pair)
            time.sleep(0.001)  # hold the pair so that others must wait or pick disjoint ones
            with guard:
                in_work.difference_update(pair)
            schedule.release(pair)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert overlaps == []
    assert sorted(handed) == list(itertools.combinations(range(blocks), 2))
