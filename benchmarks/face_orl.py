"""Real-data check of the face recipe (configs/face.yaml) on the ORL faces, end to end.

1. ``train.rec`` / ``train.idx`` / ``property`` of ORL people s1..s20 (200 faces, RGB JPEG,
   92 x 112), written by the test-side RecordIO writer (``tests/recordio_writer.py``), with
   insightface's header record; ``--source folder`` uses a folder of the same people instead.
2. ``orl_s21-s40.bin``: an insightface verification set of the held-out people s21..s40, 600
   pairs laid out like LFW's (10 blocks of 30 same + 30 different pairs), JPEG bytes.
3. ``dml prepare`` (recordio source; 8 of each person's 10 faces train, 2 are held out for a
   retrieval check), ``torchrun --nproc_per_node 2 -m dml.cli train`` (gloo, CPU) with the
   .bin as a verification set every ``eval_every`` steps, then ``dml evaluate`` of the best
   model with the .bin (flip test-time augmentation), as the recipe does.
4. Prints and writes (``benchmarks/results/face_orl.json``) the 10-fold accuracy next to
   TAR@FAR, val@FAR and the training curve of the verification accuracy.

The recipe's settings are kept (arcface, partial FC code path, 0.5 normalisation, flip) except
what a few CPU minutes need: a small backbone at 64 x 64, 20 classes, a short run.

Usage: python benchmarks/face_orl.py [--work runs/face_orl] [--steps 120] [--source recordio]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results" / "face_orl.json"

from face_fixtures import ORL, jpeg_of, orl_bin_content, orl_pairs, orl_path  # noqa: E402
from local_group import torchrun_dml  # noqa: E402


def write_sources(work: Path, source: str) -> Path:
    """The training source (a .rec folder or an image folder) of s1..s20."""
    if source == "folder":
        folder = work / "orl_s1-s20"
        for person in range(1, 21):
            shutil.copytree(ORL / f"s{person}", folder / f"s{person}", dirs_exist_ok=True)
        return folder
    from recordio_writer import pack_payload, write_recordio

    faces = [(person - 1, jpeg_of(orl_path(person, image))) for person in range(1, 21) for image in range(1, 11)]
    header = pack_payload([len(faces) + 1.0, len(faces) + 1.0])  # images are records 1 .. label[0] - 1
    payloads = [header] + [pack_payload(label, data, ident=i) for i, (label, data) in enumerate(faces, start=1)]
    write_recordio(work / "orl_rec", payloads, prop="20,112,92")
    return work / "orl_rec"


def write_bin(work: Path) -> Path:
    from dml.eval.bin_reader import write_verification_bin

    images, same = orl_bin_content(orl_pairs(range(21, 41), pairs_per_fold=30, seed=21))
    return write_verification_bin(work / "orl_s21-s40.bin", images, same)


def write_config(work: Path, source_path: Path, source: str, bin_path: Path, steps: int) -> Path:
    config = {
        "extends": str(ROOT / "configs" / "face.yaml"),
        "prepare": {
            "source": {"kind": source, "path": str(source_path)},
            "output_dir": str(work / "shards"),
            "split": {"mode": "sample", "train_fraction": 0.8, "query_fraction": 1.0},
            "workers": 2,
            "shards": {"max_samples": 20},
        },  # several shards per split: every rank gets some
        "data": {
            "shard_dir": str(work / "shards"),
            "image_size": 64,
            "batch_size": 32,
            "num_workers": 0,
            "shuffle_buffer": 200,
        },
        "model": {"backbone": "resnet18", "embedding_dim": 128},
        "loss": {"scale": 32.0, "margin": 0.3, "sample_rate": 1.0},
        "optimizer": {"lr": 0.05},
        "schedule": {"kind": "cosine", "warmup_steps": 20},
        "train": {
            "run_dir": str(work / "run"),
            "epochs": 1000,
            "max_steps": steps,
            "checkpoint_every": 100,
            "log_every": 10,
            "eval_every": max(steps // 6, 1),
            "verification_sets": [str(bin_path)],
            "best_metric": f"ver_{bin_path.stem}_accuracy",
        },
        "evaluate": {
            "model_path": str(work / "run" / "best" / "model.pt"),
            "output_dir": str(work / "eval"),
            "gallery_split": None,
            "fars": [1e-2, 1e-3],
            "verification_sets": [str(bin_path)],
        },
    }
    path = work / "face_orl.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(command: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"face_orl: {' '.join(command[:6])} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "face_orl")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--source", choices=("recordio", "folder"), default="recordio")
    args = parser.parse_args()
    if not ORL.is_dir():
        sys.exit(f"face_orl: ORL faces not found at {ORL}")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    bin_path = write_bin(args.work)
    config = write_config(args.work, write_sources(args.work, args.source), args.source, bin_path, args.steps)
    dml = [sys.executable, "-m", "dml.cli"]
    seconds = {
        "prepare": run([*dml, "prepare", "--config", str(config)], args.work / "prepare.log"),
        "train": run(
            torchrun_dml(2, "train", "--config", str(config)),
            args.work / "train.log",
        ),
        "evaluate": run([*dml, "evaluate", "--config", str(config)], args.work / "evaluate.log"),
    }
    name = bin_path.stem
    report = json.loads((args.work / "eval" / "report.json").read_text())
    face = report["verification_sets"][name]
    records = [json.loads(line) for line in (args.work / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r[f"ver_{name}_accuracy"]) for r in records if f"ver_{name}_accuracy" in r]
    best = json.loads((args.work / "run" / "best" / "best.json").read_text())
    result = {
        "source": args.source,
        "steps": args.steps,
        "seconds": seconds,
        "best": best,
        "verification_accuracy_by_step": curve,
        "pairs": face["num_pairs"],
        "accuracy": face["accuracy"],
        "accuracy_std": face["accuracy_std"],
        "best_threshold_accuracy": face["best_threshold_accuracy"],
        "val_at_far": face["val_at_far"],
        "tar_at_far": face["tar_at_far"],
        "roc_auc": face["roc_auc"],
        "eer": face["eer"],
        "retrieval_held_out_images_s1_s20": {k: report["headline"][k] for k in ("precision_at_1", "map_at_r")},
        "report": str(args.work / "eval" / "report.md"),
    }
    print(
        f"ORL s21..s40 ({face['num_pairs']} pairs), best model of step {best['step']} after {args.steps} steps "
        f"(train {seconds['train']:.0f} s, 2 processes):"
    )
    print(
        f"  10-fold accuracy {face['accuracy']:.4f} ± {face['accuracy_std']:.4f}   "
        f"best-threshold accuracy {face['best_threshold_accuracy']:.4f}"
    )
    print(
        "  "
        + "   ".join(f"TAR@FAR={k} {v:.4f}" for k, v in face["tar_at_far"].items() if v is not None)
        + f"   val@FAR=1e-3 {face['val_at_far']['val']}   ROC AUC {face['roc_auc']:.4f}   EER {face['eer']:.4f}"
    )
    print(f"  verification accuracy by step: {curve}")
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"results -> {RESULTS}; report -> {result['report']}")


if __name__ == "__main__":
    main()
