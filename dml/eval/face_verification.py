"""Face verification as face papers report it: insightface's 10-fold protocol on a pair list.

A verification set is P pairs (image a, image b, same person or not) in file order; its
embeddings come as (2P, D) with pair i in rows 2i and 2i + 1 (the `.bin` layout). A pair is
scored by the squared L2 distance of the two L2-normalised embeddings (d = 2 - 2 cos, in
[0, 4]) and called "same" when d < t.

- 10-fold accuracy (the LFW / CFP-FP / AgeDB-30 number): the pairs are cut into 10
  contiguous folds in file order, without shuffling (scikit-learn ``KFold(10, shuffle=False)``:
  the first P % 10 folds hold one pair more). For each fold, the threshold of
  `ACCURACY_THRESHOLDS` (0, 0.01, ..., 3.99) with the best accuracy on the other 9 folds (the
  smallest such threshold on ties) is applied to the fold. Reported: mean and population
  standard deviation of the 10 fold accuracies.
- best-threshold accuracy: the best accuracy of one threshold over all pairs, chosen on the
  pairs it is measured on (an optimistic bound of the 10-fold number).
- val@far (insightface's ``calculate_val``): per fold, the threshold at which the other 9
  folds reach FAR = target, read off the `VAL_THRESHOLDS` grid (step 0.001) by linear
  interpolation between the last grid threshold whose FAR is <= target and the next one
  (0 when no threshold reaches the target); TAR ("val") and FAR measured on the fold at it.
  Mean and standard deviation of val, mean FAR.
- TAR@FAR (the project's own, `dml.eval.verification.verification_metrics`): exact over all
  pairs, the highest TAR of a threshold whose FAR is <= target; plus ROC AUC and EER.
- ROC curve: TPR and FPR of each held-out fold at every accuracy threshold, averaged over
  folds (insightface's ``calculate_roc`` curve).

Every threshold is evaluated at once: each fold's same and different distances are sorted
once and counted against the whole grid with ``searchsorted``, so the cost is
O(P log P + folds x thresholds) instead of O(P x thresholds).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

N_FOLDS = 10
ACCURACY_THRESHOLDS = np.arange(0.0, 4.0, 0.01)
VAL_THRESHOLDS = np.arange(0.0, 4.0, 0.001)
VAL_FAR = 1e-3


def unit_rows(embeddings: Any) -> np.ndarray:
    """Rows divided by their L2 norm, in float64 (rows of norm 0 are left as they are).

    Raises ValueError for an array that is not 2-D.
    """
    values = np.asarray(embeddings.detach().cpu() if hasattr(embeddings, "detach") else embeddings, np.float64)
    if values.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {values.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", values, values))
    norms[norms == 0.0] = 1.0
    return values / norms[:, None]


def pair_distances(embeddings: Any) -> np.ndarray:
    """Squared L2 distance of each pair of L2-normalised rows, (2P, D) -> (P,) float64.

    Raises ValueError for an odd number of rows.
    """
    units = unit_rows(embeddings)
    if len(units) % 2:
        raise ValueError(f"pair embeddings need an even number of rows (2 per pair), got {len(units)}")
    return np.sum(np.square(units[0::2] - units[1::2]), axis=1)


def fold_bounds(num_pairs: int, n_folds: int = N_FOLDS) -> np.ndarray:
    """Start of each fold and the end, (n_folds + 1,): contiguous folds in file order, the
    first ``num_pairs % n_folds`` one pair larger (scikit-learn KFold without shuffling).

    Raises ValueError for fewer than 2 folds or fewer pairs than folds.
    """
    if n_folds < 2 or num_pairs < n_folds:
        raise ValueError(f"{n_folds}-fold verification needs at least {max(n_folds, 2)} pairs, got {num_pairs}")
    sizes = np.full(n_folds, num_pairs // n_folds, np.int64)
    sizes[: num_pairs % n_folds] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


@dataclass
class FoldCounts:
    """Per fold and threshold: how many same / different pairs have d < threshold.

    ``accepted_same``, ``accepted_different``: (folds, thresholds) int64; ``same``,
    ``different``: pairs of each kind per fold, (folds,) int64.
    """

    accepted_same: np.ndarray
    accepted_different: np.ndarray
    same: np.ndarray
    different: np.ndarray

    def train(self) -> FoldCounts:
        """The counts of all folds but each one (row f: every fold except f)."""
        return FoldCounts(
            self.accepted_same.sum(0) - self.accepted_same,
            self.accepted_different.sum(0) - self.accepted_different,
            self.same.sum() - self.same,
            self.different.sum() - self.different,
        )


def fold_counts(distances: np.ndarray, is_same: np.ndarray, bounds: np.ndarray, thresholds: np.ndarray) -> FoldCounts:
    """Count accepted pairs of every fold at every threshold (one sort per fold and kind)."""
    folds = len(bounds) - 1
    accepted = np.zeros((2, folds, len(thresholds)), np.int64)
    totals = np.zeros((2, folds), np.int64)
    for fold in range(folds):
        dist, same = distances[bounds[fold] : bounds[fold + 1]], is_same[bounds[fold] : bounds[fold + 1]]
        for kind, chosen in enumerate((dist[same], dist[~same])):
            accepted[kind, fold] = np.searchsorted(np.sort(chosen), thresholds, side="left")  # count of d < t
            totals[kind, fold] = len(chosen)
    return FoldCounts(accepted[0], accepted[1], totals[0], totals[1])


def _rate(count: np.ndarray, total: np.ndarray) -> np.ndarray:
    """count / total, 0 where total is 0 (insightface's convention for TPR and FPR)."""
    total = np.broadcast_to(total, count.shape)
    return np.divide(count, total, out=np.zeros(count.shape, np.float64), where=total > 0)


def ten_fold_accuracy(
    distances: np.ndarray, is_same: np.ndarray, n_folds: int = N_FOLDS, thresholds: np.ndarray = ACCURACY_THRESHOLDS
) -> dict[str, Any]:
    """Cross-validated accuracy (see module docstring) of (P,) distances and same flags.

    Returns ``accuracy``, ``accuracy_std``, ``fold_accuracies`` and ``fold_thresholds``
    (lists of n_folds), ``best_threshold_accuracy`` / ``best_threshold`` (all pairs, one
    threshold) and ``roc`` {"threshold", "tpr", "fpr"} averaged over held-out folds.
    Raises ValueError with fewer than ``n_folds`` pairs.
    """
    bounds = fold_bounds(len(distances), n_folds)
    counts = fold_counts(distances, is_same, bounds, thresholds)
    correct = counts.accepted_same + (counts.different[:, None] - counts.accepted_different)  # (F, T)
    train_correct = correct.sum(0) - correct  # same denominator per fold: argmax on counts
    best = np.argmax(train_correct, axis=1)  # first maximum: the smallest best threshold
    fold_accuracy = correct[np.arange(n_folds), best] / np.diff(bounds)
    overall = correct.sum(0)
    return {
        "accuracy": float(np.mean(fold_accuracy)),
        "accuracy_std": float(np.std(fold_accuracy)),
        "fold_accuracies": fold_accuracy.tolist(),
        "fold_thresholds": thresholds[best].tolist(),
        "best_threshold_accuracy": float(overall.max() / len(distances)),
        "best_threshold": float(thresholds[int(np.argmax(overall))]),
        "roc": {
            "threshold": thresholds.tolist(),
            "tpr": np.mean(_rate(counts.accepted_same, counts.same[:, None]), 0).tolist(),
            "fpr": np.mean(_rate(counts.accepted_different, counts.different[:, None]), 0).tolist(),
        },
    }


def threshold_at_far(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """The threshold where a non-decreasing FAR(threshold) curve reaches ``target``: linear
    between the last grid threshold with FAR <= target and the next one; 0 when the curve
    never reaches ``target``; the last threshold when it reaches it only there."""
    if far.max() < target:
        return 0.0
    last = int(np.searchsorted(far, target, side="right")) - 1
    if last + 1 >= len(far):
        return float(thresholds[last])
    low, high = far[last], far[last + 1]
    return float(thresholds[last] + (target - low) / (high - low) * (thresholds[last + 1] - thresholds[last]))


def val_at_far(
    distances: np.ndarray,
    is_same: np.ndarray,
    far_target: float = VAL_FAR,
    n_folds: int = N_FOLDS,
    thresholds: np.ndarray = VAL_THRESHOLDS,
) -> dict[str, Any]:
    """insightface's val@far (see module docstring): {"far_target", "val", "val_std",
    "far", "fold_thresholds"}; val and far are None (with "note") when a fold or its
    complement lacks same or different pairs, where insightface divides by zero."""
    bounds = fold_bounds(len(distances), n_folds)
    counts = fold_counts(distances, is_same, bounds, thresholds)
    train = counts.train()
    result: dict[str, Any] = {"far_target": far_target}
    if min(counts.same.min(), counts.different.min(), train.same.min(), train.different.min()) == 0:
        return {
            **result,
            "val": None,
            "val_std": None,
            "far": None,
            "fold_thresholds": None,
            "note": "val@far needs same and different pairs in every fold",
        }
    train_far = train.accepted_different / train.different[:, None]
    chosen = np.array([threshold_at_far(train_far[f], thresholds, far_target) for f in range(n_folds)])
    val, far = np.empty(n_folds), np.empty(n_folds)
    for fold in range(n_folds):
        dist, same = distances[bounds[fold] : bounds[fold + 1]], is_same[bounds[fold] : bounds[fold + 1]]
        accepted = dist < chosen[fold]
        val[fold] = np.count_nonzero(accepted & same) / counts.same[fold]
        far[fold] = np.count_nonzero(accepted & ~same) / counts.different[fold]
    return {
        **result,
        "val": float(np.mean(val)),
        "val_std": float(np.std(val)),
        "far": float(np.mean(far)),
        "fold_thresholds": chosen.tolist(),
    }


def face_verification_metrics(
    embeddings: Any, is_same: Any, *, fars: Sequence[float] = (1e-3,), val_far: float = VAL_FAR, n_folds: int = N_FOLDS
) -> dict[str, Any]:
    """Every verification number of a pair list: 10-fold accuracy, val@far, TAR@FAR, AUC, EER.

    Args:
        embeddings: (2P, D), pair i in rows 2i and 2i + 1 (normalised here; any scale).
        is_same: (P,) bool, in file order.
        fars: FAR targets of the project's TAR@FAR.
    Returns the keys of `ten_fold_accuracy`, ``val_at_far`` (the dict of `val_at_far`),
    ``tar_at_far`` / ``threshold_at_far`` (cosine thresholds) keyed like "1e-03", ``roc_auc``,
    ``eer``, ``num_pairs``, ``num_same``, ``num_different``, ``n_folds`` and ``notes``.
    Raises ValueError on mismatched shapes or fewer than ``n_folds`` pairs.
    """
    from dml.eval.verification import verification_metrics

    distances = pair_distances(embeddings)
    same = np.asarray(is_same, bool).reshape(-1)
    if same.shape != distances.shape:
        raise ValueError(f"{len(distances)} pairs of embeddings but {len(same)} same/different flags")
    result = {
        "num_pairs": len(same),
        "num_same": int(same.sum()),
        "num_different": int((~same).sum()),
        "n_folds": n_folds,
        **ten_fold_accuracy(distances, same, n_folds),
    }
    result["val_at_far"] = val_at_far(distances, same, val_far, n_folds)
    notes = [result["val_at_far"]["note"]] if "note" in result["val_at_far"] else []
    if result["num_same"] and result["num_different"]:
        rows = np.arange(2 * len(same)).reshape(-1, 2)
        project = verification_metrics(unit_rows(embeddings), pairs=rows, is_same=same, fars=fars)
        result.update({key: project[key] for key in ("tar_at_far", "threshold_at_far", "roc_auc", "eer")})
        notes += project["notes"]
    else:
        result.update(tar_at_far=None, threshold_at_far=None, roc_auc=None, eer=None)
        notes.append("TAR@FAR, ROC AUC and EER need same and different pairs")
    result["notes"] = notes
    return result
