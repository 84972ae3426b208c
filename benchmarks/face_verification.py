"""Benchmark: the face verification protocol, dml.eval vs a scikit-learn reference computation.

Claim checked: `dml.eval.face_verification` gives the same 10-fold accuracy (mean, std,
fold thresholds), val@FAR=1e-3 and TAR@FAR as the reference, and is much faster per 1,000
pairs. The reference is the one the tests use (``tests/face_fixtures.py``): scikit-learn's
``KFold(n_splits=10, shuffle=False)`` with one threshold at a time (400 accuracy thresholds,
4,000 val thresholds, each a pass over the pairs) and scikit-learn's ``roc_curve`` for
TAR@FAR.

Data: real embeddings of real faces: ORL faces (``../shared/data/orl_faces``, 400 images)
projected on their first 24 principal components ("eigenfaces"), pairs drawn like LFW's
pairs file (10 blocks, each half same-person, half different-person pairs); P pairs for each
size. Timed: dml's ``ten_fold_accuracy`` + ``val_at_far`` (the protocol) and the project's
``verification_metrics`` over the pairs (TAR@FAR), best of ``--repeats``; the reference runs
once (it is slow). The machine is shared: the load average is recorded.

Usage: python benchmarks/face_verification.py [--sizes 6000 60000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results" / "face_verification.json"
FARS = (1e-2, 1e-3)

from dml.eval.face_verification import (  # noqa: E402
    pair_distances,
    ten_fold_accuracy,
    unit_rows,
    val_at_far,
)
from dml.eval.verification import verification_metrics  # noqa: E402
from face_fixtures import (  # noqa: E402
    ORL,
    eigenface_table,
    orl_pairs,
    reference_tar_at_far,
    reference_ten_fold,
    reference_val,
)


def pair_embeddings(num_pairs: int, table: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(2P, D) eigenface embeddings of LFW-style ORL pairs and their (P,) same flags."""
    pairs = orl_pairs(range(1, 41), pairs_per_fold=num_pairs // 20, seed=seed)
    embeddings = np.stack([table[side] for a, b, _ in pairs for side in (a, b)])
    return embeddings, np.array([same for _, _, same in pairs])


def dml_numbers(embeddings: np.ndarray, same: np.ndarray) -> dict:
    distances = pair_distances(embeddings)
    protocol = ten_fold_accuracy(distances, same)
    val = val_at_far(distances, same)
    rows = np.arange(len(embeddings)).reshape(-1, 2)
    tar = verification_metrics(unit_rows(embeddings), pairs=rows, is_same=same, fars=FARS)["tar_at_far"]
    return {
        "accuracy": protocol["accuracy"],
        "accuracy_std": protocol["accuracy_std"],
        "fold_thresholds": protocol["fold_thresholds"],
        "val": val["val"],
        "val_far": val["far"],
        **{f"tar_at_far_{f:.0e}": tar[f"{f:.0e}"] for f in FARS},
    }


def reference_numbers(embeddings: np.ndarray, same: np.ndarray) -> dict:
    distances = pair_distances(embeddings)
    accuracies, thresholds = reference_ten_fold(distances, same)
    val, far = reference_val(distances, same, 1e-3)
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "fold_thresholds": thresholds,
        "val": val,
        "val_far": far,
        **{f"tar_at_far_{f:.0e}": reference_tar_at_far(distances, same, f) for f in FARS},
    }


def timed(function, *args, repeats: int = 1) -> tuple[dict, float]:
    best, result = float("inf"), {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - start)
    return result, best


def largest_difference(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k], float) - np.asarray(b[k], float)))) for k in a)


def run(sizes: list[int], repeats: int) -> list[dict]:
    table = eigenface_table()
    rows = []
    for size in sizes:
        embeddings, same = pair_embeddings(size, table, seed=size)
        ours, our_s = timed(dml_numbers, embeddings, same, repeats=repeats)
        ref, ref_s = timed(reference_numbers, embeddings, same)
        rows.append(
            {
                "pairs": len(same),
                "dml_s": our_s,
                "reference_s": ref_s,
                "dml_ms_per_1000_pairs": 1000 * our_s / len(same) * 1000,
                "reference_ms_per_1000_pairs": 1000 * ref_s / len(same) * 1000,
                "speedup": ref_s / our_s,
                "max_abs_difference": largest_difference(ours, ref),
                "dml": {k: v for k, v in ours.items() if k != "fold_thresholds"},
                "load_average": os.getloadavg()[0],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[6000, 60000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not ORL.is_dir():
        sys.exit(f"face_verification benchmark: ORL faces not found at {ORL}")
    rows = run(args.sizes, args.repeats)
    print(
        f"{'pairs':>7} {'dml ms/1k pairs':>16} {'sklearn ref ms/1k':>18} {'speedup':>8} {'max |diff|':>11} "
        f"{'10-fold acc':>12} {'val@1e-3':>9} {'TAR@1e-3':>9}"
    )
    for row in rows:
        d = row["dml"]
        print(
            f"{row['pairs']:>7} {row['dml_ms_per_1000_pairs']:>16.2f} {row['reference_ms_per_1000_pairs']:>18.1f} "
            f"{row['speedup']:>7.0f}x {row['max_abs_difference']:>11.1e} "
            f"{d['accuracy']:>6.4f}±{d['accuracy_std']:.3f} {d['val']:>9.4f} {d['tar_at_far_1e-03']:>9.4f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "face_verification",
                "fars": FARS,
                "rows": rows,
                "command": "python benchmarks/face_verification.py " + " ".join(sys.argv[1:]),
            },
            indent=1,
        )
    )
    print(f"results -> {RESULTS}")


if __name__ == "__main__":
    main()
