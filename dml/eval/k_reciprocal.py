"""k-reciprocal re-ranking (Zhong, Zheng, Cao and Li, "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), exact and memory-bounded.

Over the union U of queries and gallery (just the query set in leave-one-out), with unit
embeddings and d(i, j) = 2 - 2 cos(i, j) (squared Euclidean distance) divided by the row's
largest distance over U (as the authors' public code does):

1. N(i, k): the k + 1 nearest items of i in U (itself included), ties by smaller index.
   R(i, k) = {j in N(i, k) : i in N(j, k)} (k-reciprocal neighbours).
2. R*(i) = R(i, k1) plus, for each c in R(i, k1), R(c, round(k1 / 2)) when more than 2/3 of
   that set lies in R(i, k1) (eq. 12 of the paper).
3. V(i) is a sparse vector over U: exp(-d(i, j)) on R*(i), normalised to sum 1 (eq. 11).
4. Local query expansion: V(i) <- mean of V(j) over the k2 nearest items j of i (eq. 14).
5. Jaccard distance d_J(q, g) = 1 - S / (2 - S), S = sum_j min(V_j(q), V_j(g)) (eq. 13).
6. Final distance d* = (1 - lambda) d_J + lambda d (eq. 15); ranking by d*, ties by index.

The authors' code builds dense |U| x |U| matrices. Here every V is sparse (at most a few
hundred entries), S is accumulated only over pairs that share support, and a gallery item
sharing none with the query has d_J = 1, so its d* = (1 - lambda) + lambda d orders exactly as
the original ranking: the top ``depth`` of d* is the best of the sharing items and the
original top ``depth``. Memory: |U| x (k1 + 1) neighbour ids, the sparse V (|U| x ~k2 |R*|
entries) and one query block's pair list (at most ``PAIR_BUDGET`` entries).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sparse

from dml.eval.index import KnnIndex, as_unit_float32, build_index
from dml.progress import progress

PAIR_BUDGET = 2**22  # (query, gallery, column) triples per Jaccard block; ~40 bytes each
SEARCH_BATCH = 4096


def pair_distances(left: np.ndarray, right: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """2 - 2 <left[rows], right[cols]> in float64 for matching index arrays (any shape)."""
    dots = np.einsum("...d,...d->...", left[rows].astype(np.float64), right[cols].astype(np.float64))
    return 2.0 - 2.0 * dots


def neighbour_lists(union: np.ndarray, k: int, knn: KnnIndex) -> np.ndarray:
    """(|U|, k + 1) ids of each item's k + 1 nearest items in U (itself included), exact."""
    out = np.empty((len(union), k + 1), np.int64)
    for start in range(0, len(union), SEARCH_BATCH):
        _, out[start : start + SEARCH_BATCH] = knn.search(union[start : start + SEARCH_BATCH], k + 1)
    return out


def largest_distances(union: np.ndarray, knn: KnnIndex) -> np.ndarray:
    """Each item's largest d over U: 2 - 2 x its smallest cosine (a top-1 search for -x)."""
    worst = np.empty(len(union), np.int64)
    for start in range(0, len(union), SEARCH_BATCH):
        _, ids = knn.search(-union[start : start + SEARCH_BATCH], 1)
        worst[start : start + SEARCH_BATCH] = ids[:, 0]
    largest = pair_distances(union, union, np.arange(len(union)), worst)
    return np.where(largest > 0, largest, 1.0)  # all items identical: nothing to normalise


def reciprocal_mask(neighbours: np.ndarray, k: int, block: int = 8192) -> np.ndarray:
    """(|U|, k + 1) bool: entry a of row i is True when i is among the k + 1 nearest items of
    its a-th neighbour (R(i, k) as a mask over N(i, k))."""
    forward = neighbours[:, : k + 1]
    mask = np.empty(forward.shape, dtype=bool)
    for start in range(0, len(forward), block):
        rows = np.arange(start, min(start + block, len(forward)))
        backward = forward[forward[rows]]  # (B, k + 1, k + 1)
        mask[rows] = (backward == rows[:, None, None]).any(axis=2)
    return mask


def expanded_sets(neighbours: np.ndarray, k1: int) -> list[np.ndarray]:
    """R*(i) for every item: R(i, k1) grown by the candidates' R(c, round(k1 / 2)) sets that
    overlap it by more than 2/3 (sorted unique ids)."""
    half = int(np.round(k1 / 2))  # numpy rounds half to even, as the authors' code does
    full_mask, half_mask = reciprocal_mask(neighbours, k1), reciprocal_mask(neighbours, half)
    half_sets = [neighbours[i, : half + 1][half_mask[i]] for i in range(len(neighbours))]
    sets = []
    for i in range(len(neighbours)):
        own = neighbours[i, : k1 + 1][full_mask[i]]
        parts = [own]
        for candidate in own:
            theirs = half_sets[candidate]
            if np.isin(theirs, own).sum() > 2.0 / 3.0 * len(theirs):
                parts.append(theirs)
        sets.append(np.unique(np.concatenate(parts)))
    return sets


def encode(union: np.ndarray, sets: list[np.ndarray], largest: np.ndarray) -> sparse.csr_matrix:
    """V (|U|, |U|) sparse: row i holds exp(-d(i, j)) over R*(i), normalised to sum 1."""
    lengths = np.array([len(s) for s in sets])
    rows = np.repeat(np.arange(len(sets)), lengths)
    cols = np.concatenate(sets)
    weights = np.exp(-pair_distances(union, union, rows, cols) / largest[rows])
    sums = np.bincount(rows, weights=weights, minlength=len(sets))
    return sparse.csr_matrix((weights / sums[rows], (rows, cols)), shape=(len(sets), len(sets)))


def local_expansion(encoding: sparse.csr_matrix, neighbours: np.ndarray, k2: int) -> sparse.csr_matrix:
    """V(i) replaced by the mean of V over i's k2 nearest items (k2 = 1: unchanged)."""
    if k2 <= 1:
        return encoding
    n = encoding.shape[0]
    rows = np.repeat(np.arange(n), k2)
    averaging = sparse.csr_matrix((np.full(n * k2, 1.0 / k2), (rows, neighbours[:, :k2].ravel())), shape=(n, n))
    return (averaging @ encoding).tocsr()


def shared_mass(query_rows: sparse.csr_matrix, gallery_by_column: sparse.csc_matrix) -> sparse.csr_matrix:
    """S(q, g) = sum_j min(V_j(q), V_j(g)) for the pairs sharing support, (B, |G|) sparse."""
    coo = query_rows.tocoo()
    starts = gallery_by_column.indptr[coo.col]
    lengths = gallery_by_column.indptr[coo.col + 1] - starts
    total = int(lengths.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.repeat(starts, lengths) + offsets
    mins = np.minimum(np.repeat(coo.data, lengths), gallery_by_column.data[positions])
    pairs = (np.repeat(coo.row, lengths), gallery_by_column.indices[positions])
    return sparse.csr_matrix((mins, pairs), shape=(query_rows.shape[0], gallery_by_column.shape[1]))


class KReciprocalRanker:
    """Ranks a gallery for each query by the k-reciprocal final distance d*.

    ``queries`` (Nq, D) and ``gallery`` (Ng, D) embeddings, or ``gallery`` None for
    leave-one-out over ``queries`` (a query never ranks itself). ``k1``, ``k2`` and
    ``lambda_value`` as in the paper (its defaults 20, 6, 0.3). Building costs two exact
    searches over U and the sparse encoding; :meth:`rank` then ranks any query rows.
    Raises ValueError for k1 < 1, k2 < 1, lambda_value outside [0, 1], or a union smaller
    than k1 + 1 items.
    """

    def __init__(
        self, queries: np.ndarray, gallery: np.ndarray | None, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
    ):
        if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
            raise ValueError(
                f"k-reciprocal re-ranking needs k1 >= 1, k2 >= 1 and lambda in [0, 1], got "
                f"k1={k1}, k2={k2}, lambda={lambda_value}"
            )
        self.queries = as_unit_float32(queries, "queries")
        self.leave_one_out = gallery is None
        self.gallery = self.queries if gallery is None else as_unit_float32(gallery, "gallery")
        union = self.queries if gallery is None else np.concatenate([self.queries, self.gallery])
        if len(union) < k1 + 1 or len(union) < k2:
            raise ValueError(
                f"k-reciprocal re-ranking with k1={k1}, k2={k2} needs at least "
                f"{max(k1 + 1, k2)} embeddings, got {len(union)}"
            )
        self.lambda_value = lambda_value
        self.offset = 0 if gallery is None else len(self.queries)  # gallery row g is union row offset + g
        union_index = build_index(union)
        neighbours = neighbour_lists(union, k1, union_index)
        self.largest = largest_distances(union, union_index)
        encoding = local_expansion(encode(union, expanded_sets(neighbours, k1), self.largest), neighbours, k2)
        self.encoding = encoding
        self.gallery_by_column = encoding[self.offset : self.offset + len(self.gallery)].tocsc()
        self.gallery_index = union_index if gallery is None else build_index(self.gallery)

    def rank(self, rows: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (B, depth) int64, d* (B, depth) float64) of query ``rows``, best first."""
        own = rows if self.leave_one_out else None
        _, original = self.gallery_index.search(self.queries[rows], depth, own)
        ids = np.empty((len(rows), depth), np.int64)
        dists = np.empty((len(rows), depth), np.float64)
        for start, stop in self._blocks(rows):
            shared = shared_mass(self.encoding[rows[start:stop]], self.gallery_by_column)
            for b in range(start, stop):
                ids[b], dists[b] = self._rank_one(rows[b], shared.getrow(b - start), original[b], depth)
        return ids, dists

    def _blocks(self, rows: np.ndarray):
        """(start, stop) over ``rows`` so each block's pair list stays within PAIR_BUDGET."""
        column_lengths = np.diff(self.gallery_by_column.indptr)
        pairs_per_entry = column_lengths[self.encoding.indices]  # gallery rows sharing each entry's column
        per_row = (
            np.array([pairs_per_entry[self.encoding.indptr[r] : self.encoding.indptr[r + 1]].sum() for r in rows]) + 1
        )
        start = 0
        while start < len(rows):
            stop = start + 1
            budget = PAIR_BUDGET - per_row[start]
            while stop < len(rows) and budget >= per_row[stop]:
                budget -= per_row[stop]
                stop += 1
            yield start, stop
            start = stop

    def _rank_one(
        self, row: int, shared: sparse.csr_matrix, original: np.ndarray, depth: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """d* over the items sharing support with query ``row`` plus its original top list."""
        candidates = np.union1d(shared.indices, original)
        if self.leave_one_out:
            candidates = candidates[candidates != row]
        mass = np.zeros(len(candidates))
        found = np.searchsorted(candidates, shared.indices)
        inside = found < len(candidates)
        inside[inside] = candidates[found[inside]] == shared.indices[inside]
        mass[found[inside]] = shared.data[inside]
        jaccard = 1.0 - mass / (2.0 - mass)
        union_row = row  # queries are the first rows of U
        distance = pair_distances(self.queries, self.gallery, np.full(len(candidates), row), candidates)
        distance = distance / self.largest[union_row]
        final = (1.0 - self.lambda_value) * jaccard + self.lambda_value * distance
        order = np.lexsort((candidates, final))[:depth]
        return candidates[order], final[order]


def k_reciprocal_rerank(
    queries: np.ndarray,
    gallery: np.ndarray | None,
    depth: int,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``depth`` gallery ids (Nq, depth) and their d* (Nq, depth) for every query.

    ``gallery`` None: leave-one-out over ``queries``. Raises ValueError as
    :class:`KReciprocalRanker`, or for depth outside [1, searchable gallery size].
    """
    ranker = KReciprocalRanker(queries, gallery, k1, k2, lambda_value)
    searchable = len(ranker.gallery) - (1 if ranker.leave_one_out else 0)
    if not 1 <= depth <= searchable:
        raise ValueError(f"depth must be in [1, {searchable}], got {depth}")
    ids = np.empty((len(ranker.queries), depth), np.int64)
    dists = np.empty((len(ranker.queries), depth), np.float64)
    for start in progress(
        range(0, len(ranker.queries), SEARCH_BATCH), desc="k-reciprocal re-ranking", unit=" batch", show=show_progress
    ):
        rows = np.arange(start, min(start + SEARCH_BATCH, len(ranker.queries)))
        ids[rows], dists[rows] = ranker.rank(rows, depth)
    return ids, dists
