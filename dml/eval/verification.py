"""Face verification (TAR at FAR, ROC AUC, EER) and identification (CMC) protocols.

Verification scores a pair by the cosine similarity of its two embeddings and accepts it
when the score is >= a threshold. TAR (true accept rate) and FAR (false accept rate) are
the accepted fractions of same-identity and different-identity pairs. TAR@FAR=f is the
highest TAR over thresholds whose FAR is <= f; a FAR below 1 / (number of negative pairs)
cannot be measured and is reported as None with a note. ROC AUC is the trapezoid area
under the (FAR, TAR) curve, which counts tied scores as half a win (Mann-Whitney). EER is
where FAR = 1 - TAR, linearly interpolated between ROC points.

Pairs come from an explicit list (e.g. an LFW-style pairs file, :func:`read_pairs_file`) or
are all i < j pairs of an evaluation set. All-pairs scores are computed a block of rows at a
time. Up to ``exact_max_pairs`` pairs the scores are kept and the ROC is exact; beyond that
only two histograms (same / different) of ``num_bins`` bins over [-1, 1] are kept (2**20 bins:
width 1.9e-6, 16 MiB), so memory no longer grows with N^2. With histograms the thresholds
are the bin edges: TAR@FAR is then the exact TAR at the best bin-edge threshold, a lower
bound of the exact value that misses at most the positives of one bin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dml.eval.index import as_unit_float32, build_index
from dml.value_rules import check_fars

DEFAULT_FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@dataclass(frozen=True)
class VerificationPair:
    """One line of a pairs file: image ``index1`` of ``name1`` against ``index2`` of ``name2``."""

    name1: str
    index1: int
    name2: str
    index2: int

    @property
    def is_same(self) -> bool:
        """True when both images are of the same person."""
        return self.name1 == self.name2


def read_pairs_file(path: str | Path) -> list[VerificationPair]:
    """Parse an LFW-style pairs file: 'name idx1 idx2' (same person) or
    'name1 idx1 name2 idx2' (different people), whitespace separated. A first line of only
    integers (LFW's 'folds pairs_per_fold') and blank lines are skipped.

    Raises ValueError (file and line) for a line of another layout.
    """
    pairs = []
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens or (number == 1 and len(tokens) <= 2 and all(t.isdigit() for t in tokens)):
            continue
        try:
            if len(tokens) == 3:
                pairs.append(VerificationPair(tokens[0], int(tokens[1]), tokens[0], int(tokens[2])))
            elif len(tokens) == 4:
                pairs.append(VerificationPair(tokens[0], int(tokens[1]), tokens[2], int(tokens[3])))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'name i j' or 'name1 i name2 j', got {line!r}") from None
    return pairs


def pair_rows(
    pairs: Sequence[VerificationPair], row_of: Mapping[tuple[str, int], int]
) -> tuple[np.ndarray, np.ndarray]:
    """Map pairs to embedding rows via ``row_of[(name, index)]``: ((P, 2) int64, is_same (P,) bool).

    Raises ValueError for a pair naming an image with no embedding.
    """
    rows = np.empty((len(pairs), 2), np.int64)
    for i, pair in enumerate(pairs):
        for side, key in enumerate(((pair.name1, pair.index1), (pair.name2, pair.index2))):
            if key not in row_of:
                raise ValueError(f"pair {i} refers to image {key} which has no embedding")
            rows[i, side] = row_of[key]
    return rows, np.array([p.is_same for p in pairs], dtype=bool)


@dataclass
class RocCounts:
    """Pair counts grouped by decision threshold, thresholds descending."""

    thresholds: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray


def roc_from_scores(scores: np.ndarray, is_same: np.ndarray) -> RocCounts:
    """Exact grouping: one group per distinct score."""
    distinct, inverse = np.unique(-np.asarray(scores), return_inverse=True)
    positives = np.bincount(inverse, weights=is_same, minlength=len(distinct))
    negatives = np.bincount(inverse, minlength=len(distinct)) - positives
    return RocCounts(-distinct.astype(np.float64), positives.astype(np.int64), negatives.astype(np.int64))


def _all_pair_blocks(units: np.ndarray, labels: np.ndarray, block_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (scores, is_same) for pairs i < j, a block of rows i at a time (block x N floats)."""
    for start in range(0, len(units) - 1, block_size):
        stop = min(start + block_size, len(units))
        sims = units[start:stop] @ units[start:].T
        upper = np.triu(np.ones(sims.shape, dtype=bool), k=1)  # j > i
        same = labels[start:stop, None] == labels[None, start:]
        yield sims[upper], same[upper]


def _histogram_roc(blocks: Iterator[tuple[np.ndarray, np.ndarray]], num_bins: int) -> RocCounts:
    """Grouping on a fixed grid of ``num_bins`` score bins over [-1, 1]."""
    positives = np.zeros(num_bins, np.int64)
    negatives = np.zeros(num_bins, np.int64)
    for scores, same in blocks:
        bins = np.clip(((scores + 1.0) * (num_bins / 2.0)).astype(np.int64), 0, num_bins - 1)
        positives += np.bincount(bins[same], minlength=num_bins)
        negatives += np.bincount(bins[~same], minlength=num_bins)
    lower_edges = np.arange(num_bins) * (2.0 / num_bins) - 1.0
    used = (positives + negatives) > 0
    return RocCounts(lower_edges[used][::-1], positives[used][::-1], negatives[used][::-1])


def _summarise(roc: RocCounts, fars: Sequence[float], method: str) -> dict[str, Any]:
    num_pos, num_neg = int(roc.positives.sum()), int(roc.negatives.sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"verification needs same and different pairs, got {num_pos} and {num_neg}")
    tar = np.concatenate([[0.0], np.cumsum(roc.positives) / num_pos])
    far = np.concatenate([[0.0], np.cumsum(roc.negatives) / num_neg])
    thresholds = np.concatenate([[np.inf], roc.thresholds])
    result: dict[str, Any] = {"tar_at_far": {}, "threshold_at_far": {}, "notes": []}
    accepted_negatives = np.concatenate([[0], np.cumsum(roc.negatives)])
    for target in fars:
        key = f"{target:.0e}"
        if target * num_neg < 1:
            result["tar_at_far"][key] = result["threshold_at_far"][key] = None
            result["notes"].append(
                f"FAR {key} not resolvable: needs >= {math.ceil(1 / target)} negative pairs, have {num_neg}"
            )
            continue
        allowed = target * num_neg * (1 + 1e-9)  # guard against 1e-3 * 1000 = 0.999..
        point = int(np.searchsorted(accepted_negatives, allowed, side="right")) - 1
        result["tar_at_far"][key] = float(tar[point])
        result["threshold_at_far"][key] = float(thresholds[point])
    result["roc_auc"] = float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))
    gap = far + tar - 1.0  # rises from -1 to +1; EER where it crosses zero
    cross = int(np.argmax(gap >= 0))
    step = gap[cross] - gap[cross - 1]
    frac = -gap[cross - 1] / step if step > 0 else 0.0
    result["eer"] = float(far[cross - 1] + frac * (far[cross] - far[cross - 1]))
    result["eer_threshold"] = float(thresholds[cross])
    result.update(num_positive_pairs=num_pos, num_negative_pairs=num_neg, method=method)
    return result


def pair_scores(embeddings: Any, rows: np.ndarray, block_size: int = 65536) -> np.ndarray:
    """Cosine similarity of each pair of embedding rows, (P, 2) -> (P,) float32, in blocks.

    Raises ValueError unless ``rows`` is (P, 2) row indices into ``units``.
    """
    units = as_unit_float32(embeddings)
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 2 or rows.shape[1] != 2 or (rows.size and (rows.min() < 0 or rows.max() >= len(units))):
        raise ValueError(f"pairs must be (P, 2) row indices into {len(units)} embeddings")
    scores = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), block_size):
        part = rows[start : start + block_size]
        scores[start : start + len(part)] = np.einsum("ij,ij->i", units[part[:, 0]], units[part[:, 1]])
    return scores


def verification_metrics(
    embeddings: Any,
    labels: Any = None,
    *,
    pairs: Any = None,
    is_same: Any = None,
    fars: Sequence[float] = DEFAULT_FARS,
    exact_max_pairs: int = 2**23,
    num_bins: int = 2**20,
    block_size: int = 1024,
) -> dict[str, Any]:
    """TAR@FAR, ROC AUC and EER of cosine-similarity verification.

    Either ``pairs`` ((P, 2) row indices) with ``is_same`` (P,) (or ``labels`` to derive it),
    or ``labels`` alone for all N(N-1)/2 pairs. Returns ``tar_at_far`` and
    ``threshold_at_far`` dicts keyed like "1e-03" (None when not resolvable, with a line in
    ``notes``), ``roc_auc``, ``eer``, ``eer_threshold``, ``num_positive_pairs``,
    ``num_negative_pairs`` and ``method`` ("exact" or "histogram", see module docstring).
    Peak memory: all-pairs uses block_size x N x ~10 bytes per block, plus ~30 bytes per pair
    when exact (<= ``exact_max_pairs`` = 2**23 pairs, N ~ 4096: ~250 MB) or 16 bytes x
    ``num_bins`` (16 MiB) with histograms.

    Raises ValueError when neither labels nor pairs with is_same are given, their shapes do not
    match the rows, or a FAR is outside (0, 1].
    """
    check_fars(fars)
    units = as_unit_float32(embeddings)
    if labels is not None:
        labels = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
        if labels.shape != (len(units),):
            raise ValueError(f"labels must have shape ({len(units)},), got {labels.shape}")
    if pairs is not None:
        rows = np.asarray(pairs, np.int64)
        scores = pair_scores(units, rows)
        if is_same is None:
            if labels is None:
                raise ValueError("explicit pairs need is_same or labels")
            is_same = labels[rows[:, 0]] == labels[rows[:, 1]]
        is_same = np.asarray(is_same, bool)
        if is_same.shape != (len(rows),):
            raise ValueError(f"is_same must have one flag per pair ({len(rows)}), got {is_same.shape}")
        return _summarise(roc_from_scores(scores, is_same), fars, "exact")
    if labels is None:
        raise ValueError("give labels (all pairs) or pairs with is_same")
    blocks = _all_pair_blocks(units, labels, block_size)
    if len(units) * (len(units) - 1) // 2 <= exact_max_pairs:
        parts = list(blocks)
        scores = np.concatenate([p[0] for p in parts])
        same = np.concatenate([p[1] for p in parts])
        return _summarise(roc_from_scores(scores, same), fars, "exact")
    return _summarise(_histogram_roc(blocks, num_bins), fars, "histogram")


def cmc_curve(
    probe: Any,
    probe_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    max_rank: int = 10,
    batch_size: int = 4096,
    **index_options: Any,
) -> dict[str, Any]:
    """Closed-set identification: cumulative match characteristic of probes against a gallery.

    ``cmc[r - 1]`` is the fraction of probes whose first gallery item of the same identity
    is ranked r or better (r = 1..max_rank, cosine similarity, ties by smaller gallery
    index). Probes whose identity is absent from the gallery are left out and counted.
    Returns {"ranks", "cmc", "num_probes", "num_excluded_probes"}. Peak memory: the index's
    gallery copy plus batch_size x max_rank x 13 bytes.

    Raises ValueError for ``max_rank`` < 1 or labels not one per row.
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    probes = as_unit_float32(probe, "probe")
    knn = build_index(gallery, **index_options)
    p_labels = np.asarray(probe_labels.detach().cpu() if hasattr(probe_labels, "detach") else probe_labels)
    g_labels = np.asarray(gallery_labels.detach().cpu() if hasattr(gallery_labels, "detach") else gallery_labels)
    if p_labels.shape != (len(probes),) or g_labels.shape != (knn.ntotal,):
        raise ValueError("probe_labels and gallery_labels need one label per embedding row")
    present = np.isin(p_labels, g_labels)
    rows = np.flatnonzero(present)
    depth = min(max_rank, knn.ntotal)
    hits_by_rank = np.zeros(max_rank, np.int64)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        _, ids = knn.search(np.ascontiguousarray(probes[batch]), depth)
        matches = (g_labels[ids] == p_labels[batch][:, None]) & (ids >= 0)
        first = np.where(matches.any(axis=1), matches.argmax(axis=1), max_rank)
        hits_by_rank += np.bincount(first, minlength=max_rank + 1)[:max_rank]
    cmc = np.cumsum(hits_by_rank) / max(len(rows), 1)
    return {
        "ranks": list(range(1, max_rank + 1)),
        "cmc": cmc.tolist(),
        "num_probes": len(rows),
        "num_excluded_probes": int(len(probes) - len(rows)),
    }
