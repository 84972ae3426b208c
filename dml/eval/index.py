"""k-nearest-neighbour search by inner product (cosine) over L2-normalised embeddings.

Backends, chosen at run time:

- ``faiss-gpu``: when ``faiss.get_num_gpus() > 0``. One GPU uses ``StandardGpuResources``;
  several GPUs get the gallery sharded across them (``index_cpu_to_all_gpus`` with
  ``shard=True``); ``fp16=True`` stores the gallery in half precision. Untested here (no GPU
  on the development machines).
- ``faiss-cpu``: an exact flat inner-product index (faiss parallelises each batch of queries
  with OpenMP over all cores), or IVF-PQ for galleries too large for exact search.
- ``torch``: if ``faiss`` cannot be imported, an exact matmul + top-k in blocks, announced
  in one logged line. ``index="ivfpq"`` is then served exactly.

Exact backends rank by the exact inner product of the float32 embeddings rounded once to
float64 (the exactly rounded score), ties (e.g. duplicate embeddings) by smaller gallery
index. A float32 GEMM does not give duplicate rows bit-identical scores, and its rounding
depends on the CPU's BLAS kernel, so rows whose float32 scores come within the rounding bound
of each other are rescored in float64, and candidates still within the float64 bound of a
neighbour get their exactly rounded score (``math.fsum``; see :func:`rerank_near_ties`). The
result does not depend on the backend, the batch size, the BLAS kernel or blocking, and equals
faiss' L2 flat order (what pytorch-metric-learning uses) whenever that order is not itself
changed by rounding.

Peak memory of a search: the gallery held by the index (N_gallery x D x 4 bytes; IVF-PQ
holds codes instead), plus per query batch the results (batch x (k + margin) x 12 bytes; the
margin is max(8, k/4) candidates), plus
faiss' fixed scratch block (4096 x 1024 floats, 16 MiB). The torch fallback adds the
batch x gallery-block score matrix, batch x min(N_gallery, max(k, 2**26 / batch)) x 4 bytes.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from dml.eval.exact_ranking import sort_runs_exactly

log = logging.getLogger(__name__)

try:  # faiss is a hard dependency of the package, but evaluation must survive without it
    import faiss
except ImportError as _error:  # pragma: no cover - exercised in a subprocess test
    faiss = None  # type: ignore[assignment]  # callers check it and say why it is missing
    _FAISS_IMPORT_ERROR = repr(_error)
else:
    _FAISS_IMPORT_ERROR = ""

INDEX_KINDS = ("flat", "ivfpq")
BACKENDS = ("auto", "faiss", "torch")
GPU_MAX_K = 2048  # largest k faiss' GPU k-selection supports
TORCH_SCORE_BLOCK = 2**26  # score-matrix elements per torch block (256 MiB of fp32)
_announced: set[str] = set()


def _log_once(key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
    if key not in _announced:
        _announced.add(key)
        log.log(level, message, *args)


def as_unit_float32(embeddings: Any, name: str = "embeddings") -> np.ndarray:
    """Return ``embeddings`` (numpy or torch, shape (N, D)) as C-contiguous float32 unit rows.

    Rows are divided by their L2 norm unless every norm is already within 1e-5 of 1 (or 0),
    in which case the values are kept bit for bit (no copy for a float32 C-contiguous input),
    so applying it twice changes nothing. All-zero rows stay zero (see :func:`warn_zero_rows`).
    Raises ValueError for a wrong shape or non-finite values.
    """
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().float().numpy()
    array = np.ascontiguousarray(np.asarray(embeddings), dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (N, D), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    norms = np.linalg.norm(array, axis=1)
    if ((np.abs(norms - 1.0) <= 1e-5) | (norms == 0)).all():
        return array  # already unit (zero rows stay zero): normalising again could change bits
    return array / np.maximum(norms, 1e-12)[:, None]


def warn_zero_rows(units: np.ndarray, name: str) -> None:
    """Log a warning counting the all-zero rows of ``units`` (N, D): legal (they score 0
    against every row and rank by index) but usually a collapsed model or unfilled rows,
    which the metrics alone would hide."""
    zero = int(np.count_nonzero(~units.any(axis=1)))
    if zero:
        log.warning(
            "%s: %d of %d rows are all zero (no direction): they score 0 against every row and rank by index",
            name,
            zero,
            len(units),
        )


def candidate_width(need: int, available: int) -> int:
    """Results to fetch so the exact top ``need`` can be ranked: a margin past the need-th
    item (rounding can only reorder near it), at most the ``available`` items."""
    return min(available, need + max(8, need // 4))


def drop_own_index(sims: np.ndarray, ids: np.ndarray, own_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own gallery index from (B, k+1) results, giving (B, k).

    Identity of the index decides, not the similarity, so exact duplicates of the query
    elsewhere in the gallery are kept. A row whose own index was pushed out of the k+1
    (more than k exact ties ranked before it) drops its last column instead.
    """
    is_own = ids == own_ids[:, None]
    is_own[~is_own.any(axis=1), -1] = True
    keep = ~is_own
    rows, width = ids.shape
    return sims[keep].reshape(rows, width - 1), ids[keep].reshape(rows, width - 1)


def _torch_search(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top k with torch (any order among ties), the gallery scanned in blocks."""
    query_t, gallery_t = torch.from_numpy(queries), torch.from_numpy(gallery)
    block = max(k, TORCH_SCORE_BLOCK // max(1, len(queries)))
    best_vals: torch.Tensor | None = None
    best_ids: torch.Tensor | None = None
    for start in range(0, len(gallery_t), block):
        scores = query_t @ gallery_t[start : start + block].T
        vals, idx = scores.topk(min(k, scores.shape[1]), dim=1)
        idx = idx + start
        if best_vals is not None and best_ids is not None:
            vals, pos = torch.cat([best_vals, vals], 1).topk(k, dim=1)
            idx = torch.cat([best_ids, idx], 1).gather(1, pos)
        best_vals, best_ids = vals, idx
    assert best_vals is not None and best_ids is not None  # callers pass a non-empty gallery
    return best_vals.numpy(), best_ids.numpy()


def rerank_near_ties(
    queries: np.ndarray,
    gallery: np.ndarray,
    sims: np.ndarray,
    ids: np.ndarray,
    need: int,
    error: float,
    complete: bool,
    same_label: np.ndarray | None = None,
) -> np.ndarray:
    """Make the first ``need`` columns of float32 search results exact, in place.

    Neighbouring float32 scores that differ by more than 2 x ``error`` (the bound on a float32
    score's error) are in exact order whatever the rounding. So each row splits into runs of
    candidates whose neighbours came closer than that; only the runs that reach into the top
    ``need`` are rescored in float64 and sorted by (exactly rounded score descending, gallery
    index ascending; see :func:`dml.eval.exact_ranking.sort_runs_exactly`), so the order never
    depends on the BLAS kernel. Rescoring runs instead of whole rows matters for deep lists:
    at need ~100 about half of all rows hold some close pair (measured in
    benchmarks/eval_knn.py). Returns a bool mask of rows whose exact top ``need`` may include
    items beyond the candidates: the run holding the need-th item reaches the last candidate,
    so an unseen item (float32 score at most the last one's) might belong (search those again
    wider); ``complete`` means the candidates are the whole gallery.

    ``same_label`` (B, c) bool, for label-based metrics only: whether each candidate shares
    its query's label. A run whose candidates all agree is left in float32 order, as its
    order cannot change a metric that reads only labels (in deep lists of large classes
    most runs are of classmates alone); the ids are then exact up to such runs.
    """
    close = sims[:, :-1] - sims[:, 1:] <= 2 * error  # (B, c - 1): columns p and p + 1 may swap
    near = np.flatnonzero(close[:, :need].any(axis=1))
    unresolved = np.zeros(len(sims), dtype=bool)
    if near.size == 0:
        return unresolved
    close = close[near]
    starts = np.ones((len(near), sims.shape[1]), dtype=bool)
    starts[:, 1:] = ~close
    group = np.cumsum(starts, axis=1)
    run_start = np.maximum.accumulate(np.where(starts, np.arange(sims.shape[1]), 0), axis=1)
    in_run = ~starts
    in_run[:, :-1] |= close
    rescore = in_run & (run_start < need)
    if same_label is not None:
        rescore &= _mixed_runs(starts, same_label[near])
    scores, cand = sort_runs_exactly(queries[near], gallery, sims[near], ids[near], group, rescore)
    if not complete:
        unresolved[near] = group[:, need - 1] == group[:, -1]
    sims[near], ids[near] = scores, cand
    return unresolved


def _mixed_runs(starts: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """(B, c) bool: entries of runs (each begins where ``starts`` is True; every row begins
    one) holding both True and False ``flags``."""
    first = np.flatnonzero(starts.ravel())
    sizes = np.diff(np.append(first, starts.size))
    true = np.add.reduceat(flags.ravel().astype(np.int64), first)
    return np.repeat((true > 0) & (true < sizes), sizes).reshape(starts.shape)


class KnnIndex:
    """An inner-product kNN index over a fixed gallery; build it with :func:`build_index`.

    Attributes: ``backend`` ("faiss-gpu", "faiss-cpu" or "torch"), ``kind`` ("flat" or
    "ivfpq"), ``ntotal`` (gallery size), ``dim``.
    """

    def __init__(
        self,
        gallery: np.ndarray,
        kind: str,
        backend: str,
        index: Any,
        cpu_index: Any,
        fp16: bool = False,
        keep_alive: Any = None,
    ):
        self.gallery = gallery  # unit float32 rows; kept for exact re-checks and torch search
        self.kind, self.backend = kind, backend
        self.ntotal, self.dim = gallery.shape
        self._index, self._cpu_index, self._keep_alive = index, cpu_index, keep_alive
        # bound on |float32 score - exact score| for unit rows: D roundings of 2**-24 each,
        # doubled for safety; fp16 storage on GPU adds 2**-11 relative per element
        self.score_error = 2 * self.dim * 2.0**-24 + (2.0**-11 if fp16 else 0.0)

    def search(self, queries: np.ndarray, k: int, own_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k gallery items for unit float32 ``queries`` (B, D): (sims (B, k) float32,
        ids (B, k) int64), best first. ``own_ids`` (B,) names each query's own gallery row
        to leave out (leave-one-out). Exact indexes rank by the exact inner product, ties by
        smaller gallery index (see :func:`rerank_near_ties`); IVF-PQ returns faiss' order and
        id -1 for missing results. Memory: B x (k + margin) x 12 bytes plus index scratch.

        Raises ValueError for k outside [1, gallery size (less one for leave-one-out)].
        """
        extra = 0 if own_ids is None else 1
        need = k + extra
        if not 1 <= k <= self.ntotal - extra:
            raise ValueError(f"k must be in [1, {self.ntotal - extra}] for a gallery of {self.ntotal}, got {k}")
        out_sims = np.empty((len(queries), need), np.float32)
        out_ids = np.empty((len(queries), need), np.int64)
        rows = np.arange(len(queries))
        if self.kind == "flat":
            # a zero query scores exactly 0 against every item: its exact list is the first
            # items by index. Searched, it is one tie as long as the gallery, re-searched at
            # doubling widths and rescored whole (~1 s per query at N = 35k)
            zero = ~queries.any(axis=1)
            out_sims[zero], out_ids[zero] = 0.0, np.arange(need)
            rows = rows[~zero]
        width = candidate_width(need, self.ntotal)
        while rows.size:
            batch = queries if rows.size == len(queries) else np.ascontiguousarray(queries[rows])
            sims, ids = self._raw_search(batch, width)
            retry = np.zeros(len(rows), dtype=bool)
            if self.kind == "flat":
                retry = rerank_near_ties(
                    batch, self.gallery, sims, ids, need, self.score_error, complete=width == self.ntotal
                )
            out_sims[rows], out_ids[rows] = sims[:, :need], ids[:, :need]
            rows, width = rows[retry], min(self.ntotal, 2 * width)
        if own_ids is not None:
            return drop_own_index(out_sims, out_ids, np.asarray(own_ids, dtype=np.int64))
        return out_sims, out_ids

    def _raw_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "torch":
            return _torch_search(self.gallery, queries, k)
        index = self._index
        if self.backend == "faiss-gpu" and k > GPU_MAX_K:
            _log_once("gpu-k", "k=%d exceeds faiss GPU limit %d; searching on CPU", k, GPU_MAX_K)
            index = self._cpu_index
        sims, ids = index.search(queries, k)
        return sims, ids.astype(np.int64, copy=False)

    def measure_recall(self, queries: np.ndarray, k: int, sample: int = 1000, seed: int = 0) -> float:
        """Mean fraction of the exact top-k found by this index, over ``sample`` random
        queries (unit float32 rows). 1.0 for exact indexes by construction."""
        k = min(k, self.ntotal)
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(queries), size=min(sample, len(queries)), replace=False)
        subset = np.ascontiguousarray(queries[np.sort(picked)])
        _, approx = self.search(subset, k)
        if faiss is not None:
            _, exact = faiss.knn(subset, self.gallery, k, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            _, exact = _torch_search(self.gallery, subset, k)
        found = [np.intersect1d(a[a >= 0], e).size for a, e in zip(approx, exact, strict=True)]
        return float(np.mean(found) / k)


def _faiss_ivfpq(
    gallery: np.ndarray, nlist: int | None, pq_m: int | None, pq_nbits: int, nprobe: int, seed: int
) -> Any:
    """Train and fill an IVF-PQ inner-product index (Jegou et al. 2011, product quantisation)."""
    n, dim = gallery.shape
    nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
    pq_m = pq_m or next(m for m in (dim // 4, dim // 2, dim, 1) if m >= 1 and dim % m == 0)
    if dim % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the embedding dimension {dim}")
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x{pq_nbits}", faiss.METRIC_INNER_PRODUCT)
    # the factory returns an IndexIVFPQ, typed as its base Index
    index.do_polysemous_training = False  # type: ignore[attr-defined]  # only serves Hamming pre-filtering, which we do not use
    train_size = min(n, max(256 * nlist, 2**pq_nbits * 64))
    rows = np.random.default_rng(seed).choice(n, size=train_size, replace=False)
    index.train(np.ascontiguousarray(gallery[np.sort(rows)]))
    index.add(gallery)
    faiss.extract_index_ivf(index).nprobe = min(nprobe, nlist)
    return index


def _to_gpu(cpu_index: Any, fp16: bool) -> tuple[Any, Any]:
    """Copy a faiss index to all visible GPUs, sharded when several; returns (GPU index,
    resources to keep alive as long as it). Untested here (no GPU on these machines)."""
    if faiss.get_num_gpus() == 1:
        resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = fp16
        return faiss.index_cpu_to_gpu(resources, 0, cpu_index, options), resources
    options = faiss.GpuMultipleClonerOptions()
    options.shard, options.useFloat16 = True, fp16
    return faiss.index_cpu_to_all_gpus(cpu_index, co=options), None


def build_index(
    gallery: Any,
    index: str = "flat",
    *,
    backend: str = "auto",
    use_gpu: bool | None = None,
    fp16: bool = False,
    nlist: int | None = None,
    pq_m: int | None = None,
    pq_nbits: int = 8,
    nprobe: int = 32,
    seed: int = 0,
) -> KnnIndex:
    """Index ``gallery`` (N, D), numpy or torch, for inner-product search of unit rows.

    ``index``: "flat" (exact) or "ivfpq" (approximate: ``nlist`` inverted lists, default
    ~4 sqrt(N); ``pq_m`` sub-quantisers of ``pq_nbits`` bits, default D/4; ``nprobe`` lists
    visited). ``backend``: "auto" (faiss if importable, else torch), "faiss" or "torch".
    ``use_gpu``: None means whenever faiss reports GPUs; ``fp16`` stores the GPU copy in
    half precision. Memory: the gallery as unit float32 (a copy unless already unit float32),
    plus the index's own copy (flat) or codes (IVF-PQ).

    Raises ValueError for an unknown index or backend, or the faiss backend without faiss.
    """
    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    units = as_unit_float32(gallery, "gallery")
    if backend == "faiss" and faiss is None:
        raise ValueError(f"backend='faiss' requested but faiss cannot be imported: {_FAISS_IMPORT_ERROR}")
    if backend == "torch" or faiss is None:
        if faiss is None:
            _log_once(
                "no-faiss",
                "faiss not importable (%s); using exact torch matmul+topk search in batches%s",
                _FAISS_IMPORT_ERROR,
                " (ivfpq served exactly)" if index == "ivfpq" else "",
            )
        return KnnIndex(units, "flat", "torch", None, None)
    if index == "ivfpq":
        cpu_index = _faiss_ivfpq(units, nlist, pq_m, pq_nbits, nprobe, seed)
    else:
        cpu_index = faiss.IndexFlatIP(units.shape[1])
        cpu_index.add(units)
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is not False and gpus > 0:
        try:
            gpu_index, resources = _to_gpu(cpu_index, fp16)
            return KnnIndex(units, index, "faiss-gpu", gpu_index, cpu_index, fp16, resources)
        except (RuntimeError, AttributeError) as error:  # e.g. an IVF-PQ layout the GPU lacks
            _log_once("gpu-fail", "faiss GPU index unavailable (%s); using the CPU index", error)
    elif use_gpu is not False:
        _log_once("no-gpu", "faiss reports no GPU; using the CPU index", level=logging.INFO)
    return KnnIndex(units, index, "faiss-cpu", cpu_index, cpu_index)


def knn_search(
    query: Any,
    gallery: Any = None,
    k: int = 10,
    exclude_self: bool = False,
    batch_size: int = 4096,
    index: str = "flat",
    **index_options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest gallery rows of each query row by cosine similarity.

    Returns (similarities (Nq, k) float32, indices (Nq, k) int64), best first; exact ties
    are ordered by smaller gallery index. ``gallery`` None searches the query set itself.
    ``exclude_self`` (leave-one-out; the query set must be the gallery, row i = row i)
    searches k+1 and drops each query's own index, keeping exact duplicates elsewhere.
    Queries go in batches of ``batch_size``: peak memory is the index's gallery copy plus
    batch x (k+1) x 12 bytes (plus batch x gallery-block scores on the torch fallback),
    plus the returned Nq x k x 12 bytes. IVF-PQ logs its recall@k against exact search on
    1000 sampled queries. Other options go to :func:`build_index`.

    Raises ValueError for a bad batch_size, mismatched dimensions, or exclude_self with another gallery.
    """
    queries = as_unit_float32(query, "query")
    if gallery is None:
        gallery = queries
    elif exclude_self and len(gallery) != len(queries):
        raise ValueError(
            "exclude_self needs the query set to be the gallery (same rows), "
            f"got {len(queries)} queries and {len(gallery)} gallery rows"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    knn = build_index(gallery, index, **index_options)
    if knn.dim != queries.shape[1]:
        raise ValueError(f"query dimension {queries.shape[1]} != gallery dimension {knn.dim}")
    if knn.kind == "ivfpq":
        recall = knn.measure_recall(queries, k)
        log.info("IVF-PQ recall@%d against exact search on sampled queries: %.4f", k, recall)
    sims = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), batch_size):
        stop = min(start + batch_size, len(queries))
        own = np.arange(start, stop) if exclude_self else None
        sims[start:stop], ids[start:stop] = knn.search(queries[start:stop], k, own)
    return sims, ids
