"""Benchmark: a fair ArcFace search with `dml tune` on Omniglot, then tuned vs default (issue 17).

Claim checked: `dml tune` runs the "A Metric Learning Reality Check" protocol end to end on real
data within a fixed budget, and the values it picks for ArcFace's scale s, margin m and the
learning rate are compared with the product's default ArcFace config on classes the search
never saw.

Protocol:
- data: Omniglot (`../shared/data/omniglot`), prepared by `dml prepare` (source kind
  ``omniglot``, split mode ``source``): the 964 background characters are the training
  classes, the 659 evaluation characters the test classes (leave-one-out retrieval over
  their 13,180 drawings, R = 19). Images 28x28 grey.
- search: `dml tune` with 4 class-disjoint folds of the background characters, TPE
  sampler, median pruner on the folds' intermediate validation MAP@R, 2 trials at a time,
  ``--trials`` trials; each fold trains ``--steps`` optimizer steps (batch 64) and is validated
  once at its end (leave-one-out MAP@R on its held-out characters).
  Space: loss.scale 4..64 (log), loss.margin 0.05..0.6, optimizer.lr 0.005..0.5 (log).
- model and budget, the same for both configs: timm ``test_resnet`` (0.39M parameters, random
  init), 64-d embedding, avg pooling, SGD with momentum 0.9, weight decay 5e-4, cosine
  schedule, no augmentation, ``--steps`` steps.
- default config: the product's ArcFace defaults (`dml.config.LossConfig` /
  `OptimizerConfig`: s=30, m=0.3, SGD lr 0.05). Tuned config: the study's ``best.yaml``.
- test: both retrained on all background characters with seeds 0..4 and tested once on
  the evaluation characters: mean MAP@R, P@1, R-precision with 95% Student-t intervals; also
  the tuned trial's four fold models' concatenated embedding.

Each training process uses one intra-op thread (2 trials share 2 cores). The wall time, and
the load average at start and end (the machine is shared), are recorded. Usage:
    python benchmarks/tune_arcface.py [--trials 6] [--steps 100] [--work runs/tune_arcface]
``--quick`` (2 trials, 2 folds, 4 steps, 2 seeds; prints only) checks the script end to end.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dml.tune.final import mean_and_interval

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"
RESULTS = ROOT / "benchmarks" / "results" / "tune_arcface.json"
SPACE = {
    "loss.scale": {"low": 4, "high": 64, "log": True},
    "loss.margin": {"low": 0.05, "high": 0.6},
    "optimizer.lr": {"low": 0.005, "high": 0.5, "log": True},
}


def run_config(work: Path, steps: int) -> dict:
    """The run config both arms share; loss and optimizer values are the product's defaults."""
    return {
        "seed": 0,
        "prepare": {
            "source": {"kind": "omniglot", "path": str(OMNIGLOT)},
            "split": {"mode": "source", "query_fraction": 1.0},
            "shards": {"max_samples": 4000},
            "output_dir": str(work / "shards"),
            "workers": 2,
        },
        "data": {
            "shard_dir": str(work / "shards"),
            "image_size": 28,
            "channels": 1,
            "batch_size": 64,
            "num_workers": 0,
            "shuffle_buffer": 2000,
            "augment": {"horizontal_flip": False},
        },
        "model": {"backbone": "test_resnet", "embedding_dim": 64, "pooling": "avg"},
        "loss": {"kind": "arcface"},
        "train": {
            "run_dir": str(work / "default_run"),
            "epochs": 50,
            "max_steps": steps,
            "checkpoint_every": steps,
            "keep_last": 1,
            "log_every": 25,
            "eval_split": "query",
            "eval_gallery_split": None,
        },
        "evaluate": {"query_split": "query", "gallery_split": None, "plots": False},
    }


def run(argv: list[str], log_path: Path) -> None:
    with log_path.open("w") as log:
        code = __import__("subprocess").call(argv, stdout=log, stderr=log)
    if code != 0:
        sys.exit(f"tune_arcface: {' '.join(argv[2:4])} failed ({code}); see {log_path}")


def table(rows: dict[str, dict]) -> list[str]:
    lines = [f"{'config':<9} {'s':>6} {'m':>6} {'lr':>7}  {'MAP@R (95% CI)':<24} {'P@1':<22} {'R-prec':<22}"]
    for name, row in rows.items():
        p = row["params"]
        cells = [mean_and_interval(row[k]) for k in ("map_at_r", "precision_at_1", "r_precision")]
        lines.append(
            f"{name:<9} {p['loss.scale']:>6.2f} {p['loss.margin']:>6.3f} {p['optimizer.lr']:>7.4f}  "
            f"{cells[0]:<24} {cells[1]:<22} {cells[2]:<22}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "tune_arcface")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not OMNIGLOT.is_dir():
        sys.exit(f"tune_arcface: Omniglot not found at {OMNIGLOT}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by every training process
    load_start = os.getloadavg()
    trials, steps, folds, seeds = (2, 4, 2, 2) if args.quick else (args.trials, args.steps, 4, 5)
    args.work.mkdir(parents=True, exist_ok=True)
    study_dir = args.work / ("study-quick" if args.quick else "study")
    config = run_config(args.work, steps)
    config_path = args.work / "run.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    space_path = args.work / "space.yaml"
    space_path.write_text(
        yaml.safe_dump(
            {
                **SPACE,
                "study": {
                    "study_dir": str(study_dir),
                    "name": "tune_arcface",
                    "n_trials": trials,
                    "folds": folds,
                    "parallel": 2,
                    "sampler": "tpe",
                    "pruner": "median",
                    "startup_trials": 2,
                    "seeds": seeds,
                },
            },
            sort_keys=False,
        )
    )
    dml = [sys.executable, "-m", "dml.cli"]
    if not (args.work / "shards" / "manifest.json").exists():
        run([*dml, "prepare", "--config", str(config_path)], args.work / "prepare.log")
    prepared = time.perf_counter()
    resume = ["--resume"] if (study_dir / "study.db").exists() else []
    run([*dml, "tune", "--config", str(config_path), "--space", str(space_path), *resume], args.work / "tune.log")
    tuned_at = time.perf_counter()

    from dml.tune.final import retrain_and_test

    default = retrain_and_test(config, seeds, args.work / ("default-quick" if args.quick else "default"), parallel=2)
    report = json.loads((study_dir / "report.json").read_text())
    defaults = {"loss.scale": 30.0, "loss.margin": 0.3, "optimizer.lr": 0.05}
    rows = {"default": {"params": defaults, **default}, "tuned": {"params": report["best"]["params"], **report["test"]}}
    lines = table(rows)
    wall = time.perf_counter() - PROCESS_START
    result = {
        "command": "python benchmarks/tune_arcface.py" + (" --quick" if args.quick else ""),
        "protocol": "Omniglot: search on 964 background characters (class-disjoint folds, mean validation "
        "MAP@R); test: 659 evaluation characters, leave-one-out, retrained with each seed",
        "budget": {
            "trials": trials,
            "folds": folds,
            "parallel": 2,
            "steps_per_training": steps,
            "batch_size": 64,
            "seeds": seeds,
            "sampler": "tpe",
            "pruner": "median",
        },
        "space": SPACE,
        "model": config["model"],
        "trials": [
            {k: t[k] for k in ("number", "state", "value", "params", "fold_map_at_r")} for t in report["trials"]
        ],
        "best": report["best"],
        "default": rows["default"],
        "tuned": rows["tuned"],
        "tuned_fold_models_concatenated": report.get("concatenated"),
        "seconds": {
            "prepare": round(prepared - PROCESS_START, 1),
            "tune": round(tuned_at - prepared, 1),
            "default_retrain_and_test": round(time.perf_counter() - tuned_at, 1),
            "total": round(wall, 1),
        },
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "study_dir": str(study_dir),
    }
    print("\n".join(lines))
    print(f"wall {wall / 60:.1f} min; load average start {load_start[0]:.1f}, end {os.getloadavg()[0]:.1f}")
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
