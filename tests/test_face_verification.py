"""The 10-fold face verification protocol against an independent computation (scikit-learn's
KFold + a brute-force threshold loop) on real embeddings, and its edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.interpolate import interp1d
from sklearn.model_selection import KFold

from dml.eval.face_verification import (
    ACCURACY_THRESHOLDS,
    VAL_THRESHOLDS,
    face_verification_metrics,
    fold_bounds,
    pair_distances,
    ten_fold_accuracy,
    val_at_far,
)
from face_fixtures import (
    ORL,
    eigenface_embeddings,
    orl_pairs,
    reference_tar_at_far,
    reference_ten_fold,
    reference_val,
)

needs_orl = pytest.mark.skipif(not ORL.is_dir(), reason=f"ORL faces not found at {ORL}")


def check_against_reference(embeddings: np.ndarray, same: np.ndarray) -> dict:
    result = face_verification_metrics(embeddings, same, fars=(1e-1, 1e-2))
    distances = pair_distances(embeddings)
    accuracies, chosen = reference_ten_fold(distances, same)
    assert result["fold_accuracies"] == pytest.approx(accuracies, abs=1e-12)
    assert result["fold_thresholds"] == pytest.approx(chosen, abs=1e-12)
    assert result["accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
    assert result["accuracy_std"] == pytest.approx(np.std(accuracies), abs=1e-12)
    overall = [np.mean((distances < t) == same) for t in ACCURACY_THRESHOLDS]
    assert result["best_threshold_accuracy"] == pytest.approx(max(overall), abs=1e-12)
    folds = [same[test] for _, test in KFold(n_splits=10, shuffle=False).split(distances)]
    if all(fold.any() and not fold.all() for fold in folds):
        val, far = reference_val(distances, same, 1e-3)
        assert result["val_at_far"]["val"] == pytest.approx(val, abs=1e-12)
        assert result["val_at_far"]["far"] == pytest.approx(far, abs=1e-12)
    else:  # insightface divides by zero there
        assert result["val_at_far"]["val"] is None and "every fold" in result["notes"][0]
    for target, key in ((1e-1, "1e-01"), (1e-2, "1e-02")):
        if target * (~same).sum() >= 1:
            assert result["tar_at_far"][key] == pytest.approx(reference_tar_at_far(distances, same, target), abs=1e-9)
    return result


@needs_orl
@pytest.mark.parametrize("pairs_per_fold,dim", [(30, 24), (17, 8)])
def test_matches_kfold_reference_on_orl_eigenfaces(pairs_per_fold, dim):
    pairs = orl_pairs(range(1, 41), pairs_per_fold=pairs_per_fold, seed=pairs_per_fold)
    embeddings = eigenface_embeddings(pairs, dim=dim)
    same = np.array([s for _, _, s in pairs])
    result = check_against_reference(embeddings, same)
    assert 0.6 < result["accuracy"] < 1.0  # real faces: thresholds matter, not a trivial set


@pytest.mark.parametrize("num_pairs", [10, 11, 19, 57, 203])
def test_matches_kfold_reference_for_any_pair_count(num_pairs):
    """Fold sizes and threshold choice follow KFold for counts that do not divide by 10,
    including ties (embeddings on a coarse grid give repeated distances)."""
    rng = np.random.default_rng(num_pairs)
    same = rng.random(num_pairs) < 0.5
    same[:2] = [True, False]
    base = rng.normal(size=(num_pairs, 6))
    other = np.where(same[:, None], base + rng.normal(scale=0.6, size=base.shape), rng.normal(size=base.shape))
    embeddings = np.round(np.stack([base, other], 1).reshape(-1, 6), 1)
    check_against_reference(embeddings, same)


@pytest.mark.parametrize("num_pairs", range(10, 45))
def test_fold_bounds_are_kfold_test_splits(num_pairs):
    bounds = fold_bounds(num_pairs)
    expected = [(test[0], test[-1] + 1) for _, test in KFold(n_splits=10, shuffle=False).split(np.arange(num_pairs))]
    assert list(itertools.pairwise(bounds)) == expected


def test_val_matches_scipy_interp1d_when_far_is_strictly_increasing():
    """Where insightface's own interpolation call (interp1d slinear) accepts the FAR curve
    (strictly increasing: a different pair in every 0.001 bin of every training set), the
    val threshold is the one it gives."""
    bins = np.arange(4000)
    negatives = np.concatenate([bins, bins]) * 0.001 + 0.0005  # each bin twice, 4000 pairs apart
    distances = np.insert(negatives, np.arange(0, len(negatives), 40), 0.3)  # a same pair every 41
    same = np.zeros(len(distances), bool)
    same[np.arange(0, len(distances), 41)] = True
    result = val_at_far(distances, same, far_target=0.3)
    for fold, (train, _) in enumerate(KFold(n_splits=10, shuffle=False).split(distances)):
        negatives_train = distances[train][~same[train]]
        far = np.array([np.mean(negatives_train < t) for t in VAL_THRESHOLDS])
        assert np.all(np.diff(far) > 0)
        expected = float(interp1d(far, VAL_THRESHOLDS, kind="slinear")(0.3))
        assert result["fold_thresholds"][fold] == pytest.approx(expected, abs=1e-12)


def test_distance_equal_to_threshold_is_not_accepted():
    """d < t, strictly: a pair at exactly d = 1.0 is rejected at t = 1.0."""
    a = np.array([0.5, 0.5, 0.5, 0.5])
    half = np.array([0.5, 0.5, 0.5, -0.5])  # difference (0, 0, 0, 1): d = 1 exactly
    b = np.array([0.5, -0.5, 0.5, -0.5])  # orthogonal: d = 2
    embeddings = np.stack([a, half, a, b] * 10)
    same = np.array([True, False] * 10)
    result = ten_fold_accuracy(pair_distances(embeddings), same)
    assert result["accuracy"] == 1.0
    assert all(1.0 < t <= 2.0 for t in result["fold_thresholds"])


def test_too_few_pairs_and_mismatched_flags_are_errors():
    with pytest.raises(ValueError, match="at least 10 pairs"):
        face_verification_metrics(np.ones((18, 4)), np.ones(9, bool))
    with pytest.raises(ValueError, match="same/different flags"):
        face_verification_metrics(np.ones((20, 4)), np.ones(11, bool))


def test_one_kind_only_reports_val_and_tar_as_unavailable():
    embeddings = np.random.default_rng(0).normal(size=(40, 4))
    result = face_verification_metrics(embeddings, np.ones(20, bool))
    assert result["val_at_far"]["val"] is None and result["tar_at_far"] is None
    assert len(result["notes"]) == 2 and 0.0 <= result["accuracy"] <= 1.0
