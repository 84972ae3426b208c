"""dml.eval.verification: pairs files, TAR@FAR / AUC / EER (exact and histogram), CMC."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from dml.eval import cmc_curve, pair_rows, pair_scores, read_pairs_file, verification_metrics
from dml.eval.verification import VerificationPair
from exact_reference import exact_inner_products


def unit_rows(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def face_like_set(identities: int, per_identity: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(identities), per_identity)
    centres = rng.standard_normal((identities, 32))
    return unit_rows(centres[labels] + noise * rng.standard_normal((len(labels), 32))), labels


def all_pairs(embeddings: np.ndarray, labels: np.ndarray):
    """Brute-force reference: every i < j pair's exact cosine (integer arithmetic, no BLAS)
    and same-identity flag."""
    i, j = np.triu_indices(len(labels), k=1)
    return exact_inner_products(embeddings, embeddings)[i, j], labels[i] == labels[j]


def reference_tar_at_far(scores, same, far):
    """Best TAR over thresholds whose FAR <= far, from sklearn's full ROC curve."""
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    return tpr[fpr <= far].max()


def test_read_lfw_style_pairs_file(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("2\t2\nAbel_Pacheco\t1\t4\n\nAkhmed_Zakayev 1 Aaron_Peirsol 3\nZico 2 2\n")
    pairs = read_pairs_file(path)
    assert pairs == [
        VerificationPair("Abel_Pacheco", 1, "Abel_Pacheco", 4),
        VerificationPair("Akhmed_Zakayev", 1, "Aaron_Peirsol", 3),
        VerificationPair("Zico", 2, "Zico", 2),
    ]
    assert [p.is_same for p in pairs] == [True, False, True]
    row_of = {
        ("Abel_Pacheco", 1): 0,
        ("Abel_Pacheco", 4): 1,
        ("Akhmed_Zakayev", 1): 2,
        ("Aaron_Peirsol", 3): 3,
        ("Zico", 2): 4,
    }
    rows, same = pair_rows(pairs, row_of)
    np.testing.assert_array_equal(rows, [[0, 1], [2, 3], [4, 4]])
    np.testing.assert_array_equal(same, [True, False, True])
    with pytest.raises(ValueError, match="no embedding"):
        pair_rows(pairs, {("Zico", 2): 0})


def test_bad_pairs_line_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("Abel_Pacheco 1 4\nonly_two 1\n")
    with pytest.raises(ValueError, match=r"pairs.txt:2: expected"):
        read_pairs_file(path)
    path.write_text("Abel_Pacheco one 4\n")
    with pytest.raises(ValueError, match=r"pairs.txt:1"):
        read_pairs_file(path)


def test_hand_computed_scores():
    # unit vectors at angles: cosines of the three pairs are exactly cos(0)=1, cos(60)=0.5, cos(90)=0
    points = unit_rows([[1, 0], [1, 0], [0.5, np.sqrt(3) / 2], [0, 1]])
    pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 3]])
    np.testing.assert_allclose(pair_scores(points, pairs), [1.0, 0.5, 0.0, 0.0], atol=1e-6)
    # same: scores 1.0 and 0.5; different: 0.0 and 0.0 -> perfect separation
    result = verification_metrics(points, pairs=pairs, is_same=[True, True, False, False], fars=(0.5,))
    assert result["tar_at_far"]["5e-01"] == 1.0 and result["roc_auc"] == 1.0 and result["eer"] == 0.0
    # swap one: same {1.0, 0.0}, different {0.5, 0.0}: at FAR 0.5 accept >= 0.5 -> TAR 0.5
    result = verification_metrics(points, pairs=pairs, is_same=[True, False, True, False], fars=(0.5,))
    assert result["tar_at_far"]["5e-01"] == 0.5
    assert result["threshold_at_far"]["5e-01"] == pytest.approx(0.5)
    # AUC by Mann-Whitney: (1>0.5) + (1>0) + (0<0.5: 0) + (0=0: 1/2) over 4 -> 0.625
    assert result["roc_auc"] == pytest.approx(0.625)
    assert result["eer"] == pytest.approx(0.5)


def test_exact_all_pairs_matches_brute_force_and_sklearn():
    embeddings, labels = face_like_set(30, 6, noise=1.0, seed=0)
    scores, same = all_pairs(embeddings, labels)
    result = verification_metrics(embeddings, labels, fars=(1e-1, 1e-2, 1e-3), block_size=37)
    assert result["method"] == "exact"
    assert result["num_positive_pairs"] == int(same.sum()) == 30 * 15
    assert result["num_negative_pairs"] == int((~same).sum())
    assert result["roc_auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-9)
    for far in (1e-1, 1e-2, 1e-3):
        assert result["tar_at_far"][f"{far:.0e}"] == pytest.approx(reference_tar_at_far(scores, same, far), abs=1e-9)
    # EER: at the reported threshold FAR and FRR bracket the EER
    threshold = result["eer_threshold"]
    far_at, frr_at = (scores[~same] >= threshold).mean(), (scores[same] < threshold).mean()
    assert min(far_at, frr_at) - 1e-9 <= result["eer"] <= max(far_at, frr_at) + 1e-9
    assert 0.0 < result["eer"] < 0.5


def test_unresolvable_far_is_none_with_a_note():
    embeddings, labels = face_like_set(10, 5, noise=0.8, seed=1)
    result = verification_metrics(embeddings, labels)  # 1225 pairs, 1125 negative
    assert result["num_negative_pairs"] == 1125
    assert result["tar_at_far"]["1e-03"] is not None
    assert result["tar_at_far"]["1e-04"] is None and result["tar_at_far"]["1e-06"] is None
    assert result["notes"] == [
        f"FAR {far} not resolvable: needs >= {need} negative pairs, have 1125"
        for far, need in (("1e-04", 10000), ("1e-05", 100000), ("1e-06", 1000000))
    ]


def test_histogram_mode_is_a_close_lower_bound_of_exact():
    embeddings, labels = face_like_set(60, 8, noise=1.2, seed=2)
    exact = verification_metrics(embeddings, labels, fars=(1e-1, 1e-2, 1e-3))
    binned = verification_metrics(
        embeddings, labels, fars=(1e-1, 1e-2, 1e-3), exact_max_pairs=0, num_bins=2**14, block_size=100
    )
    coarse = verification_metrics(
        embeddings, labels, fars=(1e-1, 1e-2, 1e-3), exact_max_pairs=0, num_bins=2**4, block_size=100
    )
    assert exact["method"] == "exact" and binned["method"] == "histogram"
    assert binned["num_negative_pairs"] == exact["num_negative_pairs"]
    for key, value in exact["tar_at_far"].items():
        assert value - 5e-3 <= binned["tar_at_far"][key] <= value
        assert coarse["tar_at_far"][key] <= value
    assert binned["roc_auc"] == pytest.approx(exact["roc_auc"], abs=1e-4)
    assert binned["eer"] == pytest.approx(exact["eer"], abs=2e-3)
    # 16 bins are visibly worse: the test would notice a histogram that ignored num_bins
    assert abs(coarse["roc_auc"] - exact["roc_auc"]) > abs(binned["roc_auc"] - exact["roc_auc"])


def test_explicit_pairs_equal_all_pairs():
    embeddings, labels = face_like_set(12, 4, noise=0.9, seed=3)
    i, j = np.triu_indices(len(labels), k=1)
    from_pairs = verification_metrics(embeddings, labels, pairs=np.stack([i, j], 1), fars=(1e-1, 1e-2))
    from_labels = verification_metrics(embeddings, labels, fars=(1e-1, 1e-2))
    assert from_pairs["roc_auc"] == pytest.approx(from_labels["roc_auc"], abs=1e-12)
    assert from_pairs["tar_at_far"] == from_labels["tar_at_far"]


def test_verification_input_errors():
    embeddings, labels = face_like_set(3, 2, noise=0.5, seed=4)
    with pytest.raises(ValueError, match="same and different"):
        verification_metrics(embeddings, np.zeros(6, int))
    with pytest.raises(ValueError, match="labels must have shape"):
        verification_metrics(embeddings, labels[:4])
    with pytest.raises(ValueError, match="pairs must be"):
        verification_metrics(embeddings, pairs=[[0, 9]], is_same=[True])
    with pytest.raises(ValueError, match="is_same or labels"):
        verification_metrics(embeddings, pairs=[[0, 1]])


def test_cmc_hand_computed_and_against_brute_force():
    gallery = unit_rows([[1, 0], [0, 1], [-1, 0]])  # identities 10, 11, 12
    probes = unit_rows([[1, 0.1], [1, 0.8], [-0.2, -1], [0, 1]])
    # probe 0 (id 10) ranks 10 first; probe 1 (id 11) ranks 10, 11: rank 2; probe 2 (id 11)
    # ranks 12 (cos 0.196), 10 (-0.196), 11 (-0.98): rank 3; probe 3 (id 99) is excluded
    result = cmc_curve(probes, [10, 11, 11, 99], gallery, [10, 11, 12], max_rank=3)
    assert result["num_probes"] == 3 and result["num_excluded_probes"] == 1
    assert result["ranks"] == [1, 2, 3]
    assert result["cmc"] == pytest.approx([1 / 3, 2 / 3, 1.0])

    embeddings, labels = face_like_set(40, 3, noise=1.5, seed=5)
    gallery_rows, probe_rows = np.arange(0, 120, 3), np.setdiff1d(np.arange(120), np.arange(0, 120, 3))
    result = cmc_curve(
        embeddings[probe_rows],
        labels[probe_rows],
        embeddings[gallery_rows],
        labels[gallery_rows],
        max_rank=5,
        batch_size=7,
    )
    scores = exact_inner_products(embeddings[probe_rows], embeddings[gallery_rows])
    correct = scores[np.arange(len(probe_rows)), labels[probe_rows]]  # gallery row c has identity c
    rank = (scores > correct[:, None]).sum(1) + 1
    assert result["cmc"] == pytest.approx([(rank <= r).mean() for r in range(1, 6)])
    assert result["cmc"][0] < result["cmc"][-1] < 1.0
