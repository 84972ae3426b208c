"""Leave-one-out neighbour lists by one symmetric sweep over the query set (CPU).

When the queries are the gallery, the score matrix X Xᵀ is symmetric: the block of rows i
and columns j holds the transpose of block (j, i). A per-query search (faiss, torch) computes
every score twice; this sweep computes each block pair once and offers its scores to both
sides: to the rows of block i as gallery items of block j, and to the rows of block j as
gallery items of block i. That halves the N x N x D product, which bounds exact search.

Selection is by threshold. Each block's rows keep their best float32 scores so far in
faiss min-heaps (as many as the widest list of the block; the root is the row's
threshold). The diagonal blocks are offered whole first (each row then has a full heap, from
its own block). For every other block pair, a chunked compare against the row and column
thresholds picks the few candidate scores (see :func:`scores_above`); those are offered to
each side's heaps. Thresholds only rise, so a dropped score never belongs to a row's final
list. A heap insert costs log(width), not a re-sort of the row's list: with lists of ~100
to ~500 (classes of that size) a sorted merge per block pair cost more than the product.

The output has the same meaning as a float32 search of ``widths[r]`` neighbours that leaves
each row's own index out: the best float32 scores, best first (order among exact float32
ties unspecified), and every item not listed scores at most the last listed score. Exact
ranking is applied afterwards by :func:`dml.eval.index.rerank_near_ties`.

Work is spread over threads, not inside each kernel: a few worker threads (one per core by
default) each take a whole block pair at a time (two pairs in work never share a block, so
each block's heaps have one writer), with torch and faiss limited to one thread per call.
Splitting every small kernel over OpenMP threads instead makes the threads meet at each
kernel's barrier, and on a machine shared with other jobs one descheduled thread stalls
them all: with one busy process beside it on 2 cores, leave-one-out metrics at N = 100k x
128, 500 items per class, took 70-71 s that way and 30-31 s with worker threads (same values).
With 3 blocks or fewer (N up to ~12k) every two pairs share a block: the sweep then runs in the
calling thread with the caller's kernel threads, as does ``workers=1``.

Memory: N x max(widths) x 12 bytes for the heaps and as much for the returned lists, plus
one score block (block² x 4 bytes) per worker, the candidates of a block pair (at most block² x 16 bytes,
in practice a few per row) and their per-row table (at most 2**22 entries x 12 bytes).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dml.eval.index import faiss

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 4096  # rows per block: a 4096 x 4096 fp32 score block is 64 MiB


def block_bounds(n: int, block: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into near-equal contiguous blocks of at most ``block`` rows.

    Equal sizes (rather than a short last block) keep every diagonal block large enough to
    fill its rows' lists on the first pass.
    """
    count = max(1, -(-n // block))
    edges = np.linspace(0, n, count + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def min_block_rows(n: int, block: int) -> int:
    """Rows in the smallest block :func:`block_bounds` makes for ``n`` rows."""
    return min(b - a for a, b in block_bounds(n, block))


DIAGONAL_CHUNK = 256  # rows offered their band of the diagonal block together
CHUNK = 32  # columns per chunk maximum; torch reduces 32-wide chunks ~4x faster than 16-wide


def scores_above(
    scores: torch.Tensor, row_floor: torch.Tensor, col_floor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column, value) of the entries of ``scores`` (R, C) that may beat a floor.

    Every entry greater than the smaller of its row's ``row_floor`` (R,) and its column's
    ``col_floor`` (C,) is returned; so may be other entries of the same 32-column chunk that
    beat the chunk's own floor (its row's floor or its lowest column floor), which the
    caller filters per side anyway. Few entries pass, so instead of a full mask and
    ``nonzero`` (two passes over R x C bytes) it takes each chunk's maximum and looks only
    inside chunks whose maximum beats that chunk floor; the last C mod 32 columns are
    compared directly. Per-row and per-chunk floors keep one loose row (an outlier, or a
    query of a large class with a long list) from opening the filter for a whole block.
    """
    cols = scores.shape[1]
    main = cols - cols % CHUNK
    per_row = main // CHUNK
    chunked = scores[:, :main].unflatten(1, (per_row, CHUNK))  # a view: (R, C // 32, 32)
    chunk_floor = torch.minimum(row_floor[:, None], col_floor[:main].view(-1, CHUNK).amin(1)[None, :])
    passing = torch.nonzero((chunked.amax(2) > chunk_floor).view(-1)).squeeze(1)  # flat chunk numbers
    # whole chunks are contiguous rows of 32: index_select copies them ~4x faster than a
    # two-index gather, which the general case (C not a multiple of 32) still needs
    if main == cols:
        values = scores.view(-1, CHUNK).index_select(0, passing)
    else:
        values = chunked[passing // per_row, passing % per_row]
    flat = torch.nonzero((values > chunk_floor.view(-1)[passing][:, None]).view(-1)).squeeze(1)
    chunk = passing[flat // CHUNK]
    a, b, v = chunk // per_row, (chunk % per_row) * CHUNK + flat % CHUNK, values.view(-1)[flat]
    if main < cols:
        tail = scores[:, main:]
        tail_rows, tail_cols = torch.nonzero(
            tail > torch.minimum(row_floor[:, None], col_floor[None, main:]), as_tuple=True
        )
        a = torch.cat([a, tail_rows])
        b = torch.cat([b, tail_cols + main])
        v = torch.cat([v, tail[tail_rows, tail_cols]])
    return a, b, v


class _BlockHeaps:
    """Per block of rows, faiss min-heaps (rows, k) of float32 scores and int64 ids; k is the
    widest list of the block. ``thresholds`` (N,) holds each row's heap root."""

    def __init__(self, bounds: list[tuple[int, int]], widths: torch.Tensor):
        self.bounds = bounds
        self.thresholds = torch.full((int(bounds[-1][1]),), float("-inf"))
        self.blocks = []
        for start, stop in bounds:
            k = int(widths[start:stop].max())
            scores, ids = np.empty((stop - start, k), np.float32), np.empty((stop - start, k), np.int64)
            heap = faiss.float_minheap_array_t()
            heap.nh, heap.k, heap.val, heap.ids = stop - start, k, faiss.swig_ptr(scores), faiss.swig_ptr(ids)
            heap.heapify()
            self.blocks.append((heap, scores, ids))

    def _refresh(self, block: int, rows: np.ndarray | None = None) -> None:
        start = self.bounds[block][0]
        roots = self.blocks[block][1][:, 0]
        if rows is None:
            self.thresholds[start : start + len(roots)] = torch.from_numpy(roots)
        else:
            self.thresholds[torch.from_numpy(rows + start)] = torch.from_numpy(roots[rows])

    def offer_diagonal(self, block: int, scores: torch.Tensor, first_id: int) -> None:
        """Offer a block's (rows, rows) scores against itself, columns ``first_id..`` as ids.

        Rows go in chunks; each chunk is offered the band of columns within its heap width of
        its own rows first, then the rest. Rows swept in label order find their classmates in
        that band, so the heap is near its final threshold before the bulk of the columns
        arrive, and few of those displace anything (a heap insert costs log(width) and most
        of the diagonal's cost).
        """
        heap, rows = self.blocks[block][0], scores.shape[0]
        width = heap.k
        for low in range(0, rows, DIAGONAL_CHUNK):
            high = min(rows, low + DIAGONAL_CHUNK)
            band = (max(0, low - width), min(rows, high + width))
            for cols in (band, (0, band[0]), (band[1], rows)):
                if cols[1] > cols[0]:
                    part = np.ascontiguousarray(scores[low:high, cols[0] : cols[1]].numpy())
                    # faiss's stubs list only addn's two-argument overload
                    heap.addn(cols[1] - cols[0], faiss.swig_ptr(part), first_id + cols[0], low, high - low)  # type: ignore[call-arg]
        self._refresh(block)

    def offer(self, block: int, rows: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Offer candidates (row within ``block``, id, score); each heap keeps its best k."""
        if rows.numel() == 0:
            return
        order = torch.argsort(rows, stable=True)
        row_of_candidate = rows[order].numpy()
        id_of_candidate, score_of_candidate = ids[order].numpy(), scores[order].numpy()
        heap = self.blocks[block][0]
        per_row = np.bincount(row_of_candidate, minlength=heap.nh)  # rows are sorted: no np.unique sort
        touched = np.flatnonzero(per_row)
        counts = per_row[touched]
        slot = np.arange(len(row_of_candidate)) - np.repeat(np.cumsum(counts) - counts, counts)
        row_of = np.repeat(np.arange(len(touched)), counts)
        widest = int(counts.max())
        step = max(64, 2**22 // len(touched))  # columns per call bound the table
        for low in range(0, widest, step):
            keep = slice(None) if widest <= step else (slot >= low) & (slot < low + step)
            width = min(step, widest - low)
            table = np.full((len(touched), width), -np.inf, np.float32)
            table_ids = np.full((len(touched), width), -1, np.int64)
            table[row_of[keep], slot[keep] - low] = score_of_candidate[keep]
            table_ids[row_of[keep], slot[keep] - low] = id_of_candidate[keep]
            subset = np.ascontiguousarray(touched, dtype=np.int64)
            heap.addn_query_subset_with_ids(
                len(subset), faiss.swig_ptr(subset), width, faiss.swig_ptr(table), faiss.swig_ptr(table_ids), width
            )
        self._refresh(block, touched)

    def finish_block(self, block: int) -> None:
        """Sort a block's heaps, best first; slots never filled keep id -1."""
        self.blocks[block][0].reorder()


class _PairSchedule:
    """Hands out the block pairs (i < j), row block by row block, so that no two pairs in
    work share a block: each block's heaps and thresholds then have one writer at a time and
    need no lock of their own."""

    def __init__(self, blocks: int):
        self._pending = list(itertools.combinations(range(blocks), 2))
        self.total = len(self._pending)
        self._busy: set[int] = set()
        self._changed = threading.Condition()

    def take(self) -> tuple[int, int] | None:
        """The first pending pair whose blocks are free (waits while none is), or None when
        every pair has been handed out."""
        with self._changed:
            while self._pending:
                for n, (i, j) in enumerate(self._pending):
                    if i not in self._busy and j not in self._busy:
                        del self._pending[n]
                        self._busy.update((i, j))
                        return i, j
                self._changed.wait()
            return None

    def release(self, pair: tuple[int, int]) -> None:
        with self._changed:
            self._busy.difference_update(pair)
            self._changed.notify_all()


class _ScoreBuffers:
    """One score buffer per worker thread, reused for every block pair: a fresh 64 MiB
    tensor per pair would be mapped and page-faulted anew each time (large allocations
    bypass malloc's pool), which cost ~1.8x the GEMM."""

    def __init__(self, largest_block: int):
        self._size = largest_block * largest_block
        self._local = threading.local()

    def view(self, rows: int, cols: int) -> torch.Tensor:
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = torch.empty(self._size)
        return buffer[: rows * cols].view(rows, cols)


def _single_threaded_worker() -> None:
    """OpenMP thread counts are per calling thread: each worker asks for one thread in torch
    and faiss, so two workers on two cores never wait at each other's OpenMP barriers."""
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


@contextlib.contextmanager
def _single_threaded_kernels() -> Iterator[None]:
    """torch's thread count is partly process-wide (MKL): one thread while the sweep's workers
    run, the caller's count restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SweptLists:
    """The sorted lists of one sweep, kept per block (each as wide as its widest row), so
    memory follows the sum of the widths, not N x the largest."""

    def __init__(self, heaps: _BlockHeaps, widths: np.ndarray, order: np.ndarray | None):
        self.widths = widths  # per row, in the caller's row order
        self._heaps, self._order = heaps, order
        n = len(widths)
        self._position = np.arange(n) if order is None else np.empty(n, np.int64)
        if order is not None:
            self._position[order] = np.arange(n)
        self._starts = np.array([start for start, _ in heaps.bounds])

    def take(self, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Lists of ``rows`` (B,) cut to ``width`` columns: (scores (B, width) float32, ids
        (B, width) int64), best first; entries past a row's own width are -inf / -1."""
        position = self._position[rows]
        block_of = np.searchsorted(self._starts, position, side="right") - 1
        out_scores = np.full((len(rows), width), -np.inf, np.float32)
        out_ids = np.full((len(rows), width), -1, np.int64)
        for block in np.unique(block_of):
            mine = np.flatnonzero(block_of == block)
            _, scores, ids = self._heaps.blocks[block]
            local = position[mine] - self._starts[block]
            cols = min(width, scores.shape[1])
            out_scores[mine, :cols], out_ids[mine, :cols] = scores[local, :cols], ids[local, :cols]
        beyond = (np.arange(width) >= self.widths[rows][:, None]) | (out_ids < 0)
        out_scores[beyond], out_ids[beyond] = -np.inf, -1
        if self._order is not None:
            out_ids[~beyond] = self._order[out_ids[~beyond]]
        return out_scores, out_ids


def self_neighbour_lists(
    units: np.ndarray,
    widths: np.ndarray,
    block: int = DEFAULT_BLOCK,
    order: np.ndarray | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``widths[r]`` highest float32 inner products with the other rows.

    ``units``: (N, D) float32 unit rows (the query set, which is also the gallery).
    ``widths``: (N,) ints in [1, N - 1] and at most the smallest block size minus one (see
    :func:`min_block_rows`). Returns (scores (N, W) float32, ids (N, W) int64), W =
    max(widths), best first; a row's own index never appears; columns past ``widths[r]``
    are -inf / -1. Only float32 order is guaranteed (see the module docstring). ``order``:
    and ``workers``: see :func:`sweep_neighbour_lists`, which keeps the lists per block instead.
    """
    lists = sweep_neighbour_lists(units, widths, block, order, workers)
    return lists.take(np.arange(len(units)), int(np.max(widths)))


def sweep_neighbour_lists(
    units: np.ndarray,
    widths: np.ndarray,
    block: int = DEFAULT_BLOCK,
    order: np.ndarray | None = None,
    workers: int | None = None,
) -> SweptLists:
    """The lists of :func:`self_neighbour_lists`, read with :meth:`SweptLists.take`.

    ``order`` (N,), a permutation, sweeps the rows in that order (lists still by original
    row and id). Rows likely to be each other's neighbours placed together (e.g. sorted by
    label) share their diagonal block, so the first pass already finds most of each list and
    later block pairs offer few candidates; rows of similar width together keep the blocks'
    heaps narrow. ``workers``: threads sweeping block pairs side by side (default: torch's
    thread count; at most half the blocks), each with one-thread torch and faiss kernels;
    one worker sweeps in the calling thread with the caller's kernel threads. Raises ValueError for widths
    out of range. Memory: a permuted copy of ``units`` and the lists (see the module docstring).
    """
    n = len(units)
    widths = np.asarray(widths, dtype=np.int64)
    if order is not None:
        order = np.asarray(order, dtype=np.int64)
        units = units[order]
    widths_t = torch.as_tensor(widths if order is None else widths[order])
    if widths_t.shape != (n,) or n < 2:
        raise ValueError(f"need one width per row of at least 2 rows, got {tuple(widths_t.shape)} for {n} rows")
    bounds = block_bounds(n, block)
    smallest = min(b - a for a, b in bounds)
    if int(widths_t.min()) < 1 or int(widths_t.max()) > smallest - 1:
        raise ValueError(
            f"widths must be in [1, {smallest - 1}] for {n} rows in blocks of {block}, "
            f"got [{int(widths_t.min())}, {int(widths_t.max())}]"
        )
    x = torch.from_numpy(np.ascontiguousarray(units, dtype=np.float32))
    heaps = _BlockHeaps(bounds, widths_t)
    # with 3 blocks or fewer every two pairs share a block: nothing could run side by side
    workers = max(1, min(workers or torch.get_num_threads(), len(bounds) // 2))
    buffers = _ScoreBuffers(max(b - a for a, b in bounds))
    pairs = _PairSchedule(len(bounds))

    def diagonal(i: int) -> None:  # a full heap from its own block first
        start, stop = bounds[i]
        scores = buffers.view(stop - start, stop - start)
        torch.mm(x[start:stop], x[start:stop].T, out=scores)
        scores.fill_diagonal_(float("-inf"))  # leave-one-out: identity, not score, decides
        heaps.offer_diagonal(i, scores, start)

    def off_diagonal(i: int, j: int) -> int:  # rows of block i see block j, and back
        (row_start, row_stop), (col_start, col_stop) = bounds[i], bounds[j]
        scores = buffers.view(row_stop - row_start, col_stop - col_start)
        torch.mm(x[row_start:row_stop], x[col_start:col_stop].T, out=scores)
        a, b, values = scores_above(scores, heaps.thresholds[row_start:row_stop], heaps.thresholds[col_start:col_stop])
        to_rows = values > heaps.thresholds[a + row_start]
        to_cols = values > heaps.thresholds[b + col_start]
        heaps.offer(i, a[to_rows], b[to_rows] + col_start, values[to_rows])
        heaps.offer(j, b[to_cols], a[to_cols] + row_start, values[to_cols])
        return values.numel()

    def sweep_pairs() -> None:
        while (pair := pairs.take()) is not None:
            try:
                offered = off_diagonal(*pair)
            finally:
                pairs.release(pair)
            log.debug("self search: block pair %s done, %d candidate scores", pair, offered)

    if workers == 1:  # in the calling thread, kernels keeping the caller's thread count
        for i in range(len(bounds)):
            diagonal(i)
        sweep_pairs()
        for i in range(len(bounds)):
            heaps.finish_block(i)
    else:
        with _single_threaded_kernels(), ThreadPoolExecutor(workers, initializer=_single_threaded_worker) as pool:
            list(pool.map(diagonal, range(len(bounds))))
            for future in [pool.submit(sweep_pairs) for _ in range(workers)]:
                future.result()
            list(pool.map(heaps.finish_block, range(len(bounds))))
    log.debug("self search: %d block pairs swept by %d workers", pairs.total, workers)
    return SweptLists(heaps, widths, order)
