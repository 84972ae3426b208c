"""Leave-one-out neighbour lists by one symmetric sweep over the query set (CPU).

When the queries are the gallery, the score matrix X Xᵀ is symmetric: the block of rows i
and columns j holds the transpose of block (j, i). A per-query search (faiss, torch) computes
every score twice; this sweep computes each block pair once and offers its scores to both
sides: to the rows of block i as gallery items of block j, and to the rows of block j as
gallery items of block i. That halves the N x N x D product, which bounds exact search.

Selection is by threshold. Row r keeps its ``widths[r]`` best float32 scores so far; its
threshold is the last of them. The diagonal blocks are ranked first with ``topk`` (each row
then has a full list, from its own block). For every other block pair, a chunked compare
against the row and column thresholds picks the few candidate scores (see
:func:`scores_above`); those are offered to each side's lists. Thresholds
only rise, so a dropped score never belongs to a row's final list.

The output has the same meaning as a float32 search of ``widths[r]`` neighbours that leaves
each row's own index out: the best float32 scores, best first (order among exact float32
ties unspecified), and every item not listed scores at most the last listed score. Exact
ranking is applied afterwards by :func:`dml.eval.index.rerank_near_ties`.

Memory: N x max(widths) x 12 bytes for the lists, plus one score block (block² x 4 bytes),
the candidates of a block pair (at most block² x 16 bytes, in practice a few per row) and a
merge table of at most 2 x block x 2 x max(widths) x 12 bytes.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_BLOCK = 4096  # rows per block: a 4096 x 4096 fp32 score block is 64 MiB


def block_bounds(n: int, block: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into near-equal contiguous blocks of at most ``block`` rows.

    Equal sizes (rather than a short last block) keep every diagonal block large enough to
    fill its rows' lists on the first pass.
    """
    count = max(1, -(-n // block))
    edges = np.linspace(0, n, count + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def min_block_rows(n: int, block: int) -> int:
    """Rows in the smallest block :func:`block_bounds` makes for ``n`` rows."""
    return min(b - a for a, b in block_bounds(n, block))


CHUNK = 32  # columns per chunk maximum; torch reduces 32-wide chunks ~4x faster than 16-wide


def scores_above(scores: torch.Tensor, row_floor: torch.Tensor,
                 col_floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    rows, cols = scores.shape
    main = cols - cols % CHUNK
    chunked = scores[:, :main].unflatten(1, (main // CHUNK, CHUNK))  # a view: (R, C // 32, 32)
    chunk_floor = torch.minimum(row_floor[:, None], col_floor[:main].view(-1, CHUNK).amin(1)[None, :])
    chunk_rows, chunks = torch.nonzero(chunked.amax(2) > chunk_floor, as_tuple=True)
    values = chunked[chunk_rows, chunks]  # (passing chunks, 32): contiguous slices, cheap to gather
    hit, offset = torch.nonzero(values > chunk_floor[chunk_rows, chunks][:, None], as_tuple=True)
    a, b, v = chunk_rows[hit], chunks[hit] * CHUNK + offset, values[hit, offset]
    if main < cols:
        tail = scores[:, main:]
        tail_rows, tail_cols = torch.nonzero(tail > torch.minimum(row_floor[:, None], col_floor[None, main:]),
                                             as_tuple=True)
        a = torch.cat([a, tail_rows])
        b = torch.cat([b, tail_cols + main])
        v = torch.cat([v, tail[tail_rows, tail_cols]])
    return a, b, v


class _NeighbourLists:
    """Per-row best-so-far lists (N, W) of float32 scores and int64 ids, best first."""

    def __init__(self, n: int, widths: torch.Tensor):
        self.widths = widths
        self.scores = torch.full((n, int(widths.max())), float("-inf"))
        self.ids = torch.full((n, int(widths.max())), -1, dtype=torch.int64)
        self.thresholds = torch.full((n,), float("-inf"))

    def refresh_thresholds(self, rows: torch.Tensor) -> None:
        last = (self.widths[rows] - 1).unsqueeze(1)
        self.thresholds[rows] = self.scores[rows].gather(1, last).squeeze(1)

    def set_block(self, start: int, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Fill rows ``start..`` from (B, w) sorted lists; columns past a row's width stay."""
        stop, width = start + scores.shape[0], scores.shape[1]
        self.scores[start:stop, :width], self.ids[start:stop, :width] = scores, ids
        self.refresh_thresholds(torch.arange(start, stop))

    def merge(self, rows: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Offer candidate (row, id, score) triples; each row keeps its best ``width``."""
        if rows.numel() == 0:
            return
        width = self.scores.shape[1]
        sorted_rows, order = torch.sort(rows, stable=True)
        touched, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
        most = int(counts.max())
        if most > width:  # rare: order best first within each row, so its best `width` lead
            order = torch.argsort(scores, descending=True)
            order = order[torch.sort(rows[order], stable=True)[1]]
        ids, scores = ids[order], scores[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.numel()) - torch.repeat_interleave(starts, counts)
        row_of = torch.repeat_interleave(torch.arange(touched.numel()), counts)
        if most > width:  # the padded merge stays within (touched rows) x 2 x width
            kept = slot < width
            slot, row_of, ids, scores = slot[kept], row_of[kept], ids[kept], scores[kept]
        pad = min(most, width)
        all_scores = torch.full((touched.numel(), width + pad), float("-inf"))
        all_ids = torch.full((touched.numel(), width + pad), -1, dtype=torch.int64)
        all_scores[:, :width], all_ids[:, :width] = self.scores[touched], self.ids[touched]
        all_scores[row_of, width + slot], all_ids[row_of, width + slot] = scores, ids
        best, position = all_scores.topk(width, dim=1)
        self.scores[touched], self.ids[touched] = best, all_ids.gather(1, position)
        self.refresh_thresholds(touched)


def self_neighbour_lists(units: np.ndarray, widths: np.ndarray,
                         block: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``widths[r]`` highest float32 inner products with the other rows.

    ``units``: (N, D) float32 unit rows (the query set, which is also the gallery).
    ``widths``: (N,) ints in [1, N - 1] and at most the smallest block size minus one (see
    :func:`min_block_rows`). Returns (scores (N, W) float32, ids (N, W) int64), W =
    max(widths), best first; a row's own index never appears; columns past ``widths[r]``
    are -inf / -1. Only float32 order is guaranteed (see the module docstring).
    """
    n = len(units)
    widths_t = torch.as_tensor(np.asarray(widths, dtype=np.int64))
    if widths_t.shape != (n,) or n < 2:
        raise ValueError(f"need one width per row of at least 2 rows, got {tuple(widths_t.shape)} for {n} rows")
    bounds = block_bounds(n, block)
    smallest = min(b - a for a, b in bounds)
    if int(widths_t.min()) < 1 or int(widths_t.max()) > smallest - 1:
        raise ValueError(f"widths must be in [1, {smallest - 1}] for {n} rows in blocks of {block}, "
                         f"got [{int(widths_t.min())}, {int(widths_t.max())}]")
    x = torch.from_numpy(np.ascontiguousarray(units, dtype=np.float32))
    lists = _NeighbourLists(n, widths_t)
    for start, stop in bounds:  # diagonal blocks: every row gets a full list from its own block
        scores = x[start:stop] @ x[start:stop].T
        scores.fill_diagonal_(float("-inf"))  # leave-one-out: identity, not score, decides
        best, position = scores.topk(int(widths_t[start:stop].max()), dim=1)
        lists.set_block(start, best, position + start)
    pairs = len(bounds) * (len(bounds) - 1) // 2
    done = offered = 0
    # one score buffer for all pairs: a fresh 64 MiB tensor per pair would be mapped and
    # page-faulted anew each time (large allocations bypass malloc's pool), ~1.8x the GEMM
    largest = max(b - a for a, b in bounds)
    score_buffer = torch.empty(largest * largest if pairs else 0)
    for i, (row_start, row_stop) in enumerate(bounds):
        rows = x[row_start:row_stop]
        for col_start, col_stop in bounds[i + 1:]:
            shape = (row_stop - row_start, col_stop - col_start)
            scores = score_buffer[: shape[0] * shape[1]].view(shape)
            torch.mm(rows, x[col_start:col_stop].T, out=scores)
            a, b, values = scores_above(scores, lists.thresholds[row_start:row_stop],
                                        lists.thresholds[col_start:col_stop])
            offered += values.numel()
            a, b = a + row_start, b + col_start
            # rows of block i see block j, and back; one merge for both (their rows differ)
            to_rows, to_cols = values > lists.thresholds[a], values > lists.thresholds[b]
            lists.merge(torch.cat([a[to_rows], b[to_cols]]), torch.cat([b[to_rows], a[to_cols]]),
                        torch.cat([values[to_rows], values[to_cols]]))
            done += 1
        logger.debug("self search: %d of %d block pairs, %d candidate scores so far", done, pairs, offered)
    beyond = torch.arange(lists.scores.shape[1]) >= widths_t[:, None]  # entries no threshold guarded
    lists.scores[beyond], lists.ids[beyond] = float("-inf"), -1
    return lists.scores.numpy(), lists.ids.numpy()
