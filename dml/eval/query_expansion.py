"""Alpha query expansion (alpha-QE) and database-side augmentation (DBA) of unit embeddings.

Both follow Radenović, Tolias and Chum, "Fine-tuning CNN Image Retrieval with No Human
Annotation" (TPAMI 2019), section 5: a vector is replaced by the L2-normalised weighted sum of
itself (weight 1) and its ``k`` nearest database vectors, neighbour i weighted by
``max(s_i, 0) ** alpha`` where s_i is its cosine similarity. alpha-QE applies this to the
queries against the database; DBA applies it to every database vector against the rest of
the database (its own row left out, since it already enters with weight 1). ``alpha = 0``
gives plain average query expansion (Chum et al., ICCV 2007).

Neighbours come from the exact search of :mod:`dml.eval.index` (ties by smaller index), in
query batches, so memory is the index's copy of the database plus batch x k results.
"""

from __future__ import annotations

import numpy as np

from dml.eval.index import as_unit_float32, build_index

BATCH = 4096  # queries per search batch


def expand(
    vectors: np.ndarray, database: np.ndarray, k: int, alpha: float, *, leave_self_out: bool = False, batch: int = BATCH
) -> np.ndarray:
    """Each row of ``vectors`` (N, D) replaced by the normalised sum of itself and its ``k``
    nearest ``database`` (M, D) rows weighted by ``max(similarity, 0) ** alpha``.

    ``leave_self_out``: ``vectors`` are the database's own rows (N == M, row i = row i), and
    row i is not its own neighbour. Returns float32 (N, D), unit rows. Raises ValueError for
    k < 0, alpha < 0, mismatched shapes, or k larger than the database allows.
    """
    if k < 0 or alpha < 0:
        raise ValueError(f"query expansion needs k >= 0 and alpha >= 0, got k={k}, alpha={alpha}")
    queries = as_unit_float32(vectors, "vectors")
    base = as_unit_float32(database, "database")
    if leave_self_out and len(queries) != len(base):
        raise ValueError(f"leave_self_out needs vectors to be the database rows: {len(queries)} != {len(base)}")
    if k == 0:
        return queries
    knn = build_index(base)
    out = np.empty_like(queries)
    for start in range(0, len(queries), batch):
        rows = np.arange(start, min(start + batch, len(queries)))
        chunk = queries[rows]
        own = rows if leave_self_out else None
        _, ids = knn.search(chunk, k, own)
        # weights from the float64 inner products, so they do not depend on the search's rounding
        sims = np.einsum("bd,bkd->bk", chunk.astype(np.float64), base[ids].astype(np.float64))
        weights = np.maximum(sims, 0.0) ** alpha
        summed = chunk.astype(np.float64) + np.einsum("bk,bkd->bd", weights, base[ids].astype(np.float64))
        out[rows] = (summed / np.linalg.norm(summed, axis=1, keepdims=True)).astype(np.float32)
    return out


def alpha_query_expansion(
    queries: np.ndarray, database: np.ndarray, k: int, alpha: float, *, leave_self_out: bool = False
) -> np.ndarray:
    """alpha-QE of ``queries`` (N, D) with their ``k`` nearest ``database`` (M, D) rows.

    ``leave_self_out`` for leave-one-out evaluation, where the queries are the database.
    Returns unit float32 (N, D). Raises ValueError as :func:`expand`.
    """
    return expand(queries, database, k, alpha, leave_self_out=leave_self_out)


def database_side_augmentation(database: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """DBA: every ``database`` row (M, D) expanded with its ``k`` nearest other rows.

    Returns unit float32 (M, D). Raises ValueError as :func:`expand`.
    """
    return expand(database, database, k, alpha, leave_self_out=True)
