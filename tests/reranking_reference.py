"""Dense, loop-by-loop reference implementations of the retrieval post-processing methods,
written from the papers' definitions for small sets (the product's versions are sparse and
blocked). Float64 throughout; ties by smaller index (stable sorts)."""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    """Rows as float64 unit vectors; rows already unit (within 1e-5) are kept as they are,
    as the product keeps them, so both start from the same numbers."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x if (np.abs(norms - 1) <= 1e-5).all() else x / norms


def dense_expand(vectors: np.ndarray, database: np.ndarray, k: int, alpha: float, leave_self_out: bool) -> np.ndarray:
    """alpha-QE / DBA: v + sum over the k most similar database rows of max(s, 0)^alpha * row."""
    v, db = unit(vectors), unit(database)
    out = np.empty_like(v)
    for i in range(len(v)):
        sims = db @ v[i]
        order = [j for j in np.argsort(-sims, kind="stable") if not (leave_self_out and j == i)][:k]
        total = v[i].copy()
        for j in order:
            total += max(sims[j], 0.0) ** alpha * db[j]
        out[i] = total / np.linalg.norm(total)
    return out


def _reciprocal(rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = rank[i, : k + 1]
    return np.array([j for j in forward if i in rank[j, : k + 1]], dtype=np.int64)


def dense_k_reciprocal(queries: np.ndarray, gallery: np.ndarray | None, k1: int, k2: int, lam: float) -> np.ndarray:
    """(Nq, Ng) final distances d* of Zhong et al. (CVPR 2017), dense; own entry +inf in LOO."""
    q = unit(queries)
    union = q if gallery is None else np.concatenate([q, unit(gallery)])
    n = len(union)
    dist = 2.0 - 2.0 * union @ union.T
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")
    encoding = np.zeros((n, n))
    half = int(np.round(k1 / 2))
    for i in range(n):
        own = _reciprocal(rank, i, k1)
        members = set(own.tolist())
        for c in own:
            theirs = _reciprocal(rank, c, half)
            if len(set(own.tolist()).intersection(theirs.tolist())) > 2.0 / 3.0 * len(theirs):
                members.update(theirs.tolist())
        idx = np.array(sorted(members))
        weights = np.exp(-dist[i, idx])
        encoding[i, idx] = weights / weights.sum()
    if k2 > 1:
        encoding = np.stack([encoding[rank[i, :k2]].mean(axis=0) for i in range(n)])
    offset = 0 if gallery is None else len(q)
    n_gallery = len(q) if gallery is None else len(gallery)
    final = np.empty((len(q), n_gallery))
    for i in range(len(q)):
        for g in range(n_gallery):
            shared = np.minimum(encoding[i], encoding[offset + g]).sum()
            jaccard = 1.0 - shared / (2.0 - shared)
            final[i, g] = (1 - lam) * jaccard + lam * dist[i, offset + g]
    if gallery is None:
        np.fill_diagonal(final, np.inf)
    return final


def dense_gap(predicted, confidence, truth, answerable) -> float:
    """GAP straight from the definition: sort by confidence (desc, then query order), then
    sum precision-at-i over correct predictions, divided by the answerable count."""
    items = sorted(range(len(predicted)), key=lambda i: (-float(confidence[i]), i))
    total = sum(bool(a) for a in answerable)
    if total == 0:
        return float("nan")
    correct_so_far, score = 0, 0.0
    for position, i in enumerate(items, start=1):
        if answerable[i] and predicted[i] == truth[i]:
            correct_so_far += 1
            score += correct_so_far / position
    return score / total
