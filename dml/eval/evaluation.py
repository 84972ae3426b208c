"""Every metric of one evaluation, computed from embeddings alone (no model, no images).

- Retrieval (Musgrave et al., "A Metric Learning Reality Check"): `retrieval_metrics` of the
  query split against the gallery split, or leave-one-out over the query split, with a
  per-class breakdown and a recall@k curve.
- Verification: TAR@FAR, ROC AUC and EER from an explicit pair list (an LFW-style pairs file)
  or from all pairs of the query split, capped at ``max_verification_samples`` samples.
- Identification: the CMC curve of query probes against the gallery, when there is one.

Curves come from the same single pass as the reported numbers: `verification_metrics` is
asked for TAR at the configured FARs plus a log grid of FARs (the plotted TAR@FAR curve),
`retrieval_metrics` for the configured ks plus a few more (the plotted recall@k curve).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dml.config import EvalConfig
from dml.eval.embed import Embeddings
from dml.eval.embedding_store import EmbeddingSet
from dml.eval.metrics import retrieval_metrics
from dml.eval.reranking import nearest_neighbour_gap, reranked_metrics
from dml.eval.verification import cmc_curve, verification_metrics

log = logging.getLogger(__name__)

IVFPQ_MIN_GALLERY = 39 * 256  # faiss wants ~39 training points per PQ centroid (2**8 of them)
CURVE_POINTS = 24  # recall@k curve: at most this many k values
CMC_MIN_RANK = 10
FAR_GRID = (*(m * 10.0**e for e in range(-9, 0) for m in range(1, 10)), 1.0)


@dataclass
class EvaluationMetrics:
    """All numbers of one evaluation. ``retrieval`` holds `retrieval_metrics` keys for the
    configured ks; ``per_class`` maps label -> {num_queries, metric: mean}; ``verification``
    and ``identification`` are None when not computed (reason in ``notes``)."""

    retrieval: dict[str, Any]
    recall_curve: dict[str, list]
    per_class: dict[Any, dict[str, float]]
    verification: dict[str, Any] | None
    identification: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    # re-ranking variant ("dba", "alpha_qe", "k_reciprocal", "dba+alpha_qe", ...) -> its retrieval metrics
    reranking: dict[str, dict[str, Any]] = field(default_factory=dict)


def far_key(far: float) -> str:
    """The key `verification_metrics` files a FAR under (e.g. 0.001 -> "1e-03")."""
    return f"{far:.0e}"


def recall_curve_ks(ks: Sequence[int], searchable: int) -> list[int]:
    """The configured ks plus up to CURVE_POINTS log-spaced k in [1, max(ks)], capped at
    ``searchable`` (the most neighbours a query can have)."""
    top = max(1, min(max(ks), searchable))
    if top <= CURVE_POINTS:
        grid = np.arange(1, top + 1)
    else:
        grid = np.unique(np.round(np.geomspace(1, top, num=CURVE_POINTS)).astype(int))
    return sorted({int(k) for k in grid} | {int(k) for k in ks})


def choose_index(kind: str, gallery_size: int, notes: list[str]) -> str:
    """``kind``, except "ivfpq" on a gallery too small to train it, which is searched exactly
    (cheap at that size, and exact) with a logged note."""
    if kind == "ivfpq" and gallery_size < IVFPQ_MIN_GALLERY:
        note = (
            f"evaluate.index=ivfpq needs >= {IVFPQ_MIN_GALLERY} gallery embeddings to train, have "
            f"{gallery_size}: searched exactly (flat) instead"
        )
        log.info("%s", note)
        notes.append(note)
        return "flat"
    return kind


def retrieval_section(
    query: Embeddings, gallery: Embeddings | None, ks: Sequence[int], index: str
) -> tuple[dict[str, Any], dict[str, list], dict[Any, dict[str, float]]]:
    """(metrics for ``ks``, recall@k curve {"k", "recall"}, per-class table) in one search."""
    searchable = len(query.keys) - 1 if gallery is None else len(gallery.keys)
    all_ks = recall_curve_ks(ks, searchable)
    full = retrieval_metrics(
        query.vectors,
        query.labels,
        None if gallery is None else gallery.vectors,
        None if gallery is None else gallery.labels,
        ks=all_ks,
        per_class=True,
        index=index,
    )
    extra = {f"{name}_at_{k}" for k in all_ks if k not in ks for name in ("recall", "map")}
    per_class = {
        label: {n: v for n, v in row.items() if n not in extra} for label, row in full.pop("per_class").items()
    }
    metrics = {n: v for n, v in full.items() if n not in extra}
    curve = {"k": all_ks, "recall": [full[f"recall_at_{k}"] for k in all_ks]}
    return metrics, curve, per_class


def verification_section(
    embeddings: np.ndarray,
    labels: np.ndarray | None,
    fars: Sequence[float],
    *,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """`verification_metrics` at ``fars`` plus a ``curve`` {"far", "tar"} over a log FAR grid.

    Notes and keys are kept only for the configured ``fars``; grid FARs that collide with a
    configured key are dropped so the configured value is the one reported.
    """
    configured = [far_key(f) for f in fars]
    grid = [f for f in FAR_GRID if far_key(f) not in configured]
    kwargs: dict[str, Any] = {"pairs": pairs[0], "is_same": pairs[1]} if pairs is not None else {}
    result = verification_metrics(embeddings, labels, fars=[*grid, *fars], **kwargs)
    curve = sorted(
        (f, result["tar_at_far"][far_key(f)]) for f in [*grid, *fars] if result["tar_at_far"][far_key(f)] is not None
    )
    result["curve"] = {"far": [f for f, _ in curve], "tar": [t for _, t in curve]}
    for name in ("tar_at_far", "threshold_at_far"):
        result[name] = {key: result[name][key] for key in configured}
    result["notes"] = [note for note in result["notes"] if any(note.startswith(f"FAR {k} ") for k in configured)]
    return result


def sample_rows(count: int, cap: int, seed: int) -> np.ndarray | None:
    """Sorted random rows to keep when ``count`` exceeds ``cap``; None when all are kept."""
    if count <= cap:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, size=cap, replace=False))


def all_pairs_verification(query: Embeddings, config: EvalConfig, seed: int, notes: list[str]) -> dict[str, Any]:
    """Verification over all pairs of the query split, on a seeded sample if it is too large."""
    rows = sample_rows(len(query.keys), config.max_verification_samples, seed)
    vectors, labels = query.vectors, query.labels
    if rows is not None:
        note = (
            f"verification uses {len(rows)} of {len(query.keys)} query samples, drawn at random "
            f"(evaluate.max_verification_samples={config.max_verification_samples}, seed {seed})"
        )
        log.info("%s", note)
        notes.append(note)
        vectors, labels = vectors[rows], labels[rows]
    result = verification_section(vectors, labels, config.fars)
    result["source"] = "all pairs of the query split"
    result["num_samples"] = len(labels)
    return result


def evaluate_embeddings(
    embeddings: EmbeddingSet, config: EvalConfig, *, seed: int = 0, pairs: tuple[np.ndarray, np.ndarray] | None = None
) -> EvaluationMetrics:
    """Retrieval, verification and identification metrics of ``embeddings``.

    ``pairs`` (rows (P, 2) into the query rows followed by the gallery rows, is_same (P,)),
    from an LFW-style pairs file, replaces the all-pairs verification protocol. A protocol
    that cannot be computed (e.g. no same-class pair) is skipped with a note, not an error.
    """
    query, gallery = embeddings.query, embeddings.gallery
    notes: list[str] = []
    index = choose_index(config.index, len((query if gallery is None else gallery).keys), notes)
    retrieval, curve, per_class = retrieval_section(query, gallery, config.ks, index)
    g_vectors, g_labels = (None, None) if gallery is None else (gallery.vectors, gallery.labels)
    retrieval["global_average_precision"] = nearest_neighbour_gap(query.vectors, query.labels, g_vectors, g_labels)
    reranking = reranked_metrics(query.vectors, query.labels, g_vectors, g_labels, config.reranking, config.ks)
    notes.extend(
        f"re-ranking {name} skipped: {scores['skipped']}" for name, scores in reranking.items() if "skipped" in scores
    )
    if retrieval["num_excluded_queries"]:
        notes.append(
            f"{retrieval['num_excluded_queries']} queries have no relevant gallery item and are "
            "left out of the retrieval metrics"
        )
    try:
        if pairs is not None:
            stacked = query.vectors if gallery is None else np.concatenate([query.vectors, gallery.vectors])
            verification = verification_section(stacked, None, config.fars, pairs=pairs)
            verification["source"] = f"pairs file {config.pairs_file}"
        else:
            verification = all_pairs_verification(query, config, seed, notes)
        notes.extend(verification["notes"])
    except ValueError as exc:
        verification = None
        notes.append(f"verification skipped: {exc}")
        log.warning("verification skipped: %s", exc)
    identification = None
    if gallery is not None:
        identification = cmc_curve(
            query.vectors,
            query.labels,
            gallery.vectors,
            gallery.labels,
            max_rank=max(CMC_MIN_RANK, *config.ks),
            index=index,
        )
    return EvaluationMetrics(retrieval, curve, per_class, verification, identification, notes, reranking)


def headline_metrics(metrics: EvaluationMetrics, config: EvalConfig) -> dict[str, float | None]:
    """The numbers a reader looks at first: P@1, MAP@R, R-precision, recall@k, TAR@FAR, AUC, EER,
    CMC rank 1. Values are floats, or None when not computed / not resolvable."""
    retrieval = metrics.retrieval
    headline: dict[str, float | None] = {
        name: retrieval[name] for name in ("precision_at_1", "map_at_r", "r_precision", "global_average_precision")
    }
    headline.update({f"recall_at_{k}": retrieval[f"recall_at_{k}"] for k in config.ks})
    verification = metrics.verification or {}
    for far in config.fars:
        headline[f"tar_at_far_{far_key(far)}"] = verification.get("tar_at_far", {}).get(far_key(far))
    headline["roc_auc"] = verification.get("roc_auc")
    headline["eer"] = verification.get("eer")
    if metrics.identification is not None:
        headline["cmc_rank_1"] = metrics.identification["cmc"][0]
    for variant, scores in metrics.reranking.items():
        if "skipped" in scores:
            continue
        headline[f"map_at_r_{variant}"] = scores["map_at_r"]
        headline[f"precision_at_1_{variant}"] = scores["precision_at_1"]
    return headline
