"""Face data made from the real ORL faces for tests and benchmarks: pair lists, eigenface
embeddings, `.bin` verification sets, and the independent reference computation of the
10-fold protocol (scikit-learn's KFold, one threshold at a time)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import KFold

from data_fixtures import SHARED_DATA
from dml.eval.face_verification import ACCURACY_THRESHOLDS, VAL_THRESHOLDS

ORL = SHARED_DATA / "orl_faces"


def orl_path(person: int, image: int) -> Path:
    """``orl_faces/s<person>/<image>.pgm`` (person 1..40, image 1..10)."""
    return ORL / f"s{person}" / f"{image}.pgm"


def orl_pairs(
    people: Iterable[int], pairs_per_fold: int = 30, folds: int = 10, seed: int = 0
) -> list[tuple[tuple[int, int], tuple[int, int], bool]]:
    """Pairs ((person, image), (person, image), same) laid out like LFW's pairs file: each of
    ``folds`` consecutive blocks holds ``pairs_per_fold`` same pairs then as many different
    pairs, so contiguous 10-fold splits each see both kinds."""
    rng = np.random.default_rng(seed)
    people = list(people)
    pairs = []
    for _ in range(folds):
        for _ in range(pairs_per_fold):
            person = int(rng.choice(people))
            a, b = rng.choice(np.arange(1, 11), size=2, replace=False)
            pairs.append(((person, int(a)), (person, int(b)), True))
        for _ in range(pairs_per_fold):
            p, q = rng.choice(people, size=2, replace=False)
            pairs.append(((int(p), int(rng.integers(1, 11))), (int(q), int(rng.integers(1, 11))), False))
    return pairs


def eigenface_table(dim: int = 24, size: tuple[int, int] = (23, 28)) -> np.ndarray:
    """Real embeddings of real faces, (41, 11, dim) indexed [person, image] (1-based): every
    ORL face downscaled to ``size`` and projected on the first ``dim`` principal components
    of all 400 ("eigenfaces")."""
    pixels = np.stack(
        [
            np.asarray(Image.open(orl_path(p, i)).resize(size), np.float64).ravel() / 255.0
            for p in range(1, 41)
            for i in range(1, 11)
        ]
    )
    centred = pixels - pixels.mean(0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    table = np.zeros((41, 11, dim))
    table[1:, 1:] = (centred @ components[:dim].T).reshape(40, 10, dim)
    return table


def eigenface_embeddings(pairs: list, dim: int = 24) -> np.ndarray:
    """Eigenface embeddings of ``pairs`` in the `.bin` layout, (2P, dim)."""
    table = eigenface_table(dim)
    return np.stack([table[side] for a, b, _ in pairs for side in (a, b)])


def jpeg_of(path: Path, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    """An image file re-encoded as RGB JPEG bytes (optionally resized to ``size`` = (w, h))."""
    image = Image.open(path).convert("RGB")
    if size is not None:
        image = image.resize(size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def orl_bin_content(pairs: list, size: tuple[int, int] | None = None) -> tuple[list[bytes], list[bool]]:
    """(images, is_same) of a `.bin` for ``pairs``: JPEG bytes, images 2i / 2i + 1 = pair i."""
    images = [jpeg_of(orl_path(*side), size) for a, b, _ in pairs for side in (a, b)]
    return images, [same for _, _, same in pairs]


def make_pair_sets(
    root: Path, people: int = 6, per_person: int = 4, folds: int = 10, seed: int = 0
) -> tuple[Path, Path, Path]:
    """The same small verification set twice: ``root/faces/<person>/<person>_000i.png`` with
    an LFW-style ``pairs.txt`` (2 pairs per fold: one same, one different) and a ``.bin``
    holding the same files' bytes in pair order. Returns (bin, pairs file, folder)."""
    from data_fixtures import image_bytes

    folder = root / "faces"
    files = {}
    for p in range(people):
        (folder / f"person{p}").mkdir(parents=True, exist_ok=True)
        for i in range(1, per_person + 1):
            files[(p, i)] = folder / f"person{p}" / f"person{p}_{i:04d}.png"
            files[(p, i)].write_bytes(image_bytes(seed * 1000 + p * 10 + i, size=(20, 24)))
    rng = np.random.default_rng(seed)
    lines, images, same = [f"{folds}\t1"], [], []
    for _ in range(folds):
        p = int(rng.integers(people))
        i, j = rng.choice(np.arange(1, per_person + 1), 2, replace=False)
        lines.append(f"person{p}\t{i}\t{j}")
        images += [files[(p, int(i))].read_bytes(), files[(p, int(j))].read_bytes()]
        q, r = rng.choice(people, 2, replace=False)
        k, m = (int(v) for v in rng.integers(1, per_person + 1, 2))
        lines.append(f"person{q}\t{k}\tperson{r}\t{m}")
        images += [files[(int(q), k)].read_bytes(), files[(int(r), m)].read_bytes()]
        same += [True, False]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    from dml.eval.bin_reader import write_verification_bin

    return write_verification_bin(root / "faces.bin", images, same), root / "pairs.txt", folder


# --- the independent reference computation: scikit-learn KFold, one threshold at a time ------


def reference_ten_fold(distances: np.ndarray, same: np.ndarray) -> tuple[list[float], list[float]]:
    """Fold accuracies and thresholds, one threshold and one fold at a time."""
    accuracies, chosen = [], []
    for train, test in KFold(n_splits=10, shuffle=False).split(distances):
        train_accuracy = [np.mean((distances[train] < t) == same[train]) for t in ACCURACY_THRESHOLDS]
        best = ACCURACY_THRESHOLDS[int(np.argmax(train_accuracy))]
        accuracies.append(float(np.mean((distances[test] < best) == same[test])))
        chosen.append(float(best))
    return accuracies, chosen


def reference_val(distances: np.ndarray, same: np.ndarray, target: float) -> tuple[float, float]:
    """Mean val and FAR: FAR on the 9 training folds at every grid threshold, one at a time."""
    vals, fars = [], []
    for train, test in KFold(n_splits=10, shuffle=False).split(distances):
        negatives = ~same[train]
        far = np.array([np.sum((distances[train] < t) & negatives) / negatives.sum() for t in VAL_THRESHOLDS])
        threshold = 0.0
        if far.max() >= target:
            below = np.flatnonzero(far <= target)[-1]
            above = min(below + 1, len(far) - 1)
            threshold = np.interp(target, far[[below, above]], VAL_THRESHOLDS[[below, above]])
        accepted = distances[test] < threshold
        vals.append(np.sum(accepted & same[test]) / same[test].sum())
        fars.append(np.sum(accepted & ~same[test]) / (~same[test]).sum())
    return float(np.mean(vals)), float(np.mean(fars))


def reference_tar_at_far(distances: np.ndarray, same: np.ndarray, target: float) -> float:
    """Highest TAR whose FAR is <= target, from scikit-learn's ROC of the negated distances."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(same, -distances)
    return float(tpr[fpr <= target * (1 + 1e-9)].max())
