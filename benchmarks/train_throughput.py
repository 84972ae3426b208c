"""Training throughput of the quickstart model with 1 and 2 processes (gloo, CPU).

Runs `dml train` under torchrun for a fixed number of steps on the quickstart data
(Fashion-MNIST shards, prepared first if missing) and reads images/s from metrics.jsonl
(median over logged windows after the first). Threads per process = cores / processes, so
both runs use the whole machine.

    .venv/bin/python benchmarks/train_throughput.py [--steps 30]

Prints a table and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dml.config import load_config  # noqa: E402
from dml.data.manifest import MANIFEST  # noqa: E402
from dml.prepare import run_prepare  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = ROOT / "configs" / "quickstart.yaml"


def ensure_shards(shard_dir: Path) -> None:
    if (shard_dir / MANIFEST).exists():
        return
    config = load_config(CONFIG, [f"prepare.output_dir={shard_dir}"])
    run_prepare(config)


def run(nproc: int, steps: int, shard_dir: Path, work: Path) -> dict:
    run_dir = work / f"run-{nproc}"
    threads = max(1, (os.cpu_count() or 2) // nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "dml.cli", "train", "--config", str(CONFIG), f"data.shard_dir={shard_dir}",
           f"train.run_dir={run_dir}", f"train.max_steps={steps}", "train.epochs=100", "train.log_every=5",
           f"train.checkpoint_every={steps}", "train.eval_every=null", "train.eval_split=none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    return {"processes": nproc, "threads_per_process": threads, "steps": steps,
            "images_per_s": statistics.median(rates), "wall_s": wall,
            "peak_rss_mb_rank0": max(r.get("max_rss_mb", 0) for r in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dml-train-bench-"))
    shard_dir = ROOT / "runs" / "bench-shards"
    ensure_shards(shard_dir)
    rows = [run(n, args.steps, shard_dir, work) for n in (1, 2)]
    model = load_config(CONFIG).model
    print(f"model {model.backbone} (dim {model.embedding_dim}), global batch = processes x batch")
    print(f"{'processes':>9} {'threads':>7} {'images/s':>9} {'wall s':>7} {'rss MiB':>8}")
    for r in rows:
        print(f"{r['processes']:>9} {r['threads_per_process']:>7} {r['images_per_s']:>9.1f} {r['wall_s']:>7.1f} "
              f"{r['peak_rss_mb_rank0']:>8.0f}")
    speedup = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    print(f"2-process / 1-process images/s: {speedup:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    payload = {"rows": rows, "speedup_2_vs_1": speedup, "model": model.model_dump(), "cpus": os.cpu_count(),
               "machine": platform.machine(), "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])}
    (RESULTS / "train_throughput.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {RESULTS / 'train_throughput.json'}")


if __name__ == "__main__":
    main()
