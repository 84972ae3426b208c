"""Where training time goes: `dml train` and the bare PyTorch loop of `train_throughput.py`,
each sampled by py-spy, the samples sorted into parts of a step.

Both run the same work as `train_throughput.py` (ORL faces as 8,000 64 px JPEGs, ResNet-18,
ArcFace, SGD, batch 128, one loader worker, one process) with one OpenMP thread, so the main
thread's samples are its CPU time and nothing waits at a barrier. py-spy (``pip install
py-spy``; not a project dependency) samples every thread of the process and of its loader
worker at --rate Hz; the share of each part is its samples over all samples of the run
(startup included). A part is the first rule below that a sample's stack matches, read in
the innermost process (a forked worker's stack starts with its parent's frames).

    python benchmarks/train_profile.py [--steps 40] [--rate 50] [--work DIR]

Prints a table and writes benchmarks/results/train_profile.json; the raw stacks (for a flame
graph) stay in the work folder as ``profile_<contender>.txt``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_throughput  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = [  # (part, pattern over the stack's frames): first match wins
    ("imports", r"_find_and_load|exec_module"),
    ("backward", r"\bbackward \("),
    ("optimizer step", r"\bstep \(.*(optim|dml/train/optimizers)|_single_tensor_sgd|_multi_tensor_sgd"),
    ("JPEG decode", r"decode|PIL/|Image\.py|ImageFile"),
    ("collate, normalise, augment", r"collate|Collate|Normalize|transform|augment"),
    ("reading shards", r"tarfile|tar_members|webdataset|shards\.py"),
    ("waiting for batches", r"_next_data|_get_data|_try_get_data|queues\.py|connection\.py"),
    ("forward and loss", r"forward|_call_impl"),
    ("checkpoint", r"checkpoint|save"),
]


def part_of(frames: list[str]) -> tuple[str, str]:
    """(process role, part) of one sampled stack: py-spy's raw format roots each stack at
    ``process PID:"argv"`` frames, a child's under its parent's."""
    innermost = max(i for i, frame in enumerate(frames) if frame.startswith("process "))
    role = "main process" if innermost == 0 else "loader worker"
    body = ";".join(frames[innermost + 1 :])
    return role, next((name for name, pattern in PARTS if re.search(pattern, body)), "other")


def shares(raw: Path) -> dict[str, float]:
    """Percent of all samples per "role: part", from py-spy's raw (collapsed) output."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        role, part = part_of(stack.split(";"))
        counts[f"{role}: {part}"] += int(count)
    total = sum(counts.values())
    return {key: 100.0 * value / total for key, value in sorted(counts.items())}


def record(argv: list[str], raw: Path, rate: int) -> None:
    """Run ``argv`` under py-spy (child processes too), raw stacks into ``raw``."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("train_profile: py-spy is not on PATH (pip install py-spy)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [spy, "record", "--subprocesses", "--rate", str(rate), "--format", "raw", "-o", str(raw), "--", *argv]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"train_profile: {' '.join(argv[:4])} failed under py-spy:\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument("--work", type=Path, help="reuse this folder's JPEGs and shards")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dml-train-profile-"))
    if not (work / "shards").exists():
        train_throughput.prepare(work)
    run_dir = work / "run-profile"
    shutil.rmtree(run_dir, ignore_errors=True)
    contenders = {
        "dml": [
            *[sys.executable, "-m", "dml.cli", "train", "--config", str(train_throughput.CONFIG)],
            *[f"train.run_dir={run_dir}", *train_throughput.overrides(work, args.steps)],
        ],
        "bare": [sys.executable, train_throughput.__file__, "--worker", f"--steps={args.steps}", f"--work={work}"],
    }
    RESULTS.mkdir(exist_ok=True)
    table = {}
    for name, argv in contenders.items():
        raw = work / f"profile_{name}.txt"
        record(argv, raw, args.rate)
        table[name] = shares(raw)
    keys = sorted({key for parts in table.values() for key in parts})
    print(f"share of py-spy samples (%), 1 process, 1 thread, {args.steps} steps, {args.rate} Hz")
    print(f"{'part':>45} {'dml':>6} {'bare':>6}")
    for key in keys:
        print(f"{key:>45} {table['dml'].get(key, 0.0):6.1f} {table['bare'].get(key, 0.0):6.1f}")
    payload = {
        "shares_percent": table,
        "steps": args.steps,
        "rate_hz": args.rate,
        "load_average": os.getloadavg()[0],
        "command": "python benchmarks/train_profile.py " + " ".join(sys.argv[1:]),
    }
    (RESULTS / "train_profile.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {RESULTS / 'train_profile.json'} (raw stacks in {work})")


if __name__ == "__main__":
    main()
