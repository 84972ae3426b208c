"""Global Average Precision (GAP), the metric of the Google Landmark Recognition challenges.

Each query gets one prediction (a label) and a confidence. Sorting all N predictions by
confidence, highest first, GAP = (1/M) sum_{i=1..N} P(i) rel(i), where rel(i) is 1 when the
i-th prediction is correct, P(i) is the precision of the first i predictions, and M is the
number of queries that have a correct answer at all. Queries without one (non-landmark
distractors, or in retrieval a query whose label has no gallery item) are still ranked and
count against P of every later prediction, so a model is rewarded for giving them low
confidence (Weyand et al., "Google Landmarks Dataset v2", CVPR 2020, section 5).
Equal confidences are ordered by query position, so the value is deterministic.
"""

from __future__ import annotations

import numpy as np


def global_average_precision(
    predicted: np.ndarray, confidence: np.ndarray, truth: np.ndarray, answerable: np.ndarray
) -> float:
    """GAP of ``predicted`` labels (N,) with ``confidence`` (N,) against ``truth`` (N,).

    ``answerable`` (N,) bool marks queries that have a correct answer (M = its sum); a
    prediction for any other query is wrong whatever it says. Returns a float in [0, 1], NaN
    when M = 0. Raises ValueError when the four arrays differ in length or a confidence is NaN.
    """
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    confidence, answerable = np.asarray(confidence, dtype=np.float64), np.asarray(answerable, dtype=bool)
    if not len(predicted) == len(confidence) == len(truth) == len(answerable):
        raise ValueError(
            "predicted, confidence, truth and answerable must have one entry per query, got "
            f"{len(predicted)}, {len(confidence)}, {len(truth)}, {len(answerable)}"
        )
    if np.isnan(confidence).any():
        raise ValueError("confidence contains NaN")
    total = int(answerable.sum())
    if total == 0:
        return float("nan")
    order = np.lexsort((np.arange(len(confidence)), -confidence))
    correct = ((predicted == truth) & answerable)[order]
    precision = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    return float((precision * correct).sum() / total)
