"""Training throughput: `dml train` against a bare PyTorch loop on the same JPEGs, and 1 vs 2
processes (gloo, CPU).

Data: the ORL faces (../shared/data/orl_faces, 400 grey PGMs, credit the Olivetti Research
Laboratory) re-encoded as 64 x 64 JPEGs (quality 90), each face 20 times with a different
1-3 pixel crop, so 8,000 distinct files; `dml prepare` packs them into shards.

Contenders (images/s of ResNet-18, 128-d embedding, ArcFace through partial FC, SGD, batch 128
per process, 64 px RGB, horizontal flip, one loader worker per process):
- ``dml``: `dml train` under torchrun; images/s read from metrics.jsonl.
- ``bare``: the same model, objective and optimizer (built by the same dml functions, with
  the same gradient clipping) fed by a plain ``torch.utils.data.DataLoader`` that decodes the
  same JPEG files with the same transforms, batch and worker count, in a plain ``for`` loop:
  forward, loss, backward, clip, step.
Threads per process come from ``OMP_NUM_THREADS`` (cores / processes unless --threads).
Each rate is the median of 5-step windows after the first window (warm-up). Contenders run
alternately, --repeats times, in one invocation; ratios are formed within a repeat and their
spread is reported. The machine is shared: load averages are recorded per run.

    python benchmarks/train_throughput.py [--steps 30] [--repeats 2]

Prints a table and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dml.config import load_config  # noqa: E402
from dml.distributed import torchrun_argv  # noqa: E402
from dml.train.metrics_log import read_metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = ROOT / "configs" / "quickstart.yaml"
ORL = ROOT.parent / "shared" / "data" / "orl_faces"
COPIES, SIZE, WINDOW = 20, 64, 5


def make_jpegs(source: Path, out: Path) -> int:
    """Each ORL face as COPIES 64 px JPEGs (crops shifted by 0-3 px); returns the count."""
    from PIL import Image

    count = 0
    for pgm in sorted(source.glob("s*/*.pgm")):
        with Image.open(pgm) as image:
            face = image.convert("L")
        (out / pgm.parent.name).mkdir(parents=True, exist_ok=True)
        for copy in range(COPIES):
            dx, dy = copy % 4, (copy // 4) % 4
            crop = face.crop((dx, dy, face.width - 3 + dx, face.height - 3 + dy)).resize(
                (SIZE, SIZE), Image.Resampling.BILINEAR
            )
            crop.save(out / pgm.parent.name / f"{pgm.stem}_{copy:02d}.jpg", quality=90)
            count += 1
    return count


def overrides(work: Path, steps: int) -> list[str]:
    return [
        f"data.shard_dir={work / 'shards'}",
        f"data.image_size={SIZE}",
        "data.channels=3",
        "data.batch_size=128",
        "data.num_workers=1",
        "data.mean=[0.5]",
        "data.std=[0.5]",
        "model.backbone=resnet18",
        "model.embedding_dim=128",
        "loss.kind=arcface",
        "optimizer.name=sgd",
        f"train.max_steps={steps}",
        "train.epochs=100",
        f"train.log_every={WINDOW}",
        f"train.checkpoint_every={steps}",
        "train.eval_every=null",
        "train.eval_split=none",
        "schedule.warmup_steps=0",
    ]


def prepare(work: Path) -> int:
    from dml.prepare import run_prepare

    count = make_jpegs(ORL, work / "jpegs")
    config = load_config(
        CONFIG,
        [
            f"prepare.source.path={work / 'jpegs'}",
            "prepare.source.kind=folder",
            "prepare.split.mode=sample",
            "prepare.split.train_fraction=1.0",
            "prepare.split.train_classes=null",
            "prepare.max_per_class=null",
            f"prepare.output_dir={work / 'shards'}",
            "prepare.shards.max_samples=1000",
        ],
    )
    run_prepare(config)
    return count


def window_rates(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def run_dml(nproc: int, threads: int, steps: int, work: Path, tag: str) -> dict:
    run_dir = work / f"run-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl of an earlier run would be read too
    cmd = torchrun_argv(nproc, ["train", "--config", str(CONFIG), f"train.run_dir={run_dir}", *overrides(work, steps)])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dml train ({nproc} processes) failed:\n{done.stderr[-3000:]}")
    rates = [r["images_per_s"] for r in read_metrics(run_dir) if "images_per_s" in r]
    return result_row("dml", nproc, threads, steps, rates, start)


def run_bare(threads: int, steps: int, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--steps", str(steps), "--work", str(work)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bare loop failed:\n{done.stderr[-3000:]}")
    rates = json.loads(done.stdout.strip().splitlines()[-1])
    return result_row("bare", 1, threads, steps, rates, start)


def result_row(contender: str, processes: int, threads: int, steps: int, rates: list[float], start: float) -> dict:
    """One contender's run: its windowed images/s (see `window_rates`), wall time since ``start``."""
    return {
        "contender": contender,
        "processes": processes,
        "threads_per_process": threads,
        "steps": steps,
        "images_per_s": window_rates(rates),
        "windows": [round(r, 1) for r in rates],
        "wall_s": time.perf_counter() - start,
        "load_average": os.getloadavg()[0],
    }


def bare_loop(steps: int, work: Path) -> list[float]:
    """The plain loop (runs in its own process): images/s per window of WINDOW steps."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from dml.models.model_file import build_model
    from dml.train.engine import build_optimizer
    from dml.train.objective import Objective

    config = load_config(CONFIG, overrides(work, steps))
    files = sorted((work / "jpegs").glob("s*/*.jpg"))
    classes = sorted({f.parent.name for f in files})
    labels = [classes.index(f.parent.name) for f in files]
    transform = T.Compose(
        [
            T.Resize((SIZE, SIZE), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )

    class Jpegs(Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int):
            with Image.open(files[i]) as image:
                return transform(image.convert("RGB")), labels[i]

    torch.manual_seed(0)
    loader = DataLoader(
        Jpegs(),
        batch_size=config.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.data.num_workers,
        persistent_workers=True,
    )
    model = build_model(config)
    objective = Objective(config, len(classes), torch.device("cpu"))
    optimizer = build_optimizer(model, config.optimizer)
    model.train()
    rates, done, start = [], 0, time.perf_counter()
    while done < steps:
        for images, batch_labels in loader:
            loss, _ = objective(model(images), batch_labels)
            loss.backward()
            if config.optimizer.grad_clip:  # dml's default clips the backbone's gradient norm
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
            for each in (optimizer, *objective.optimizers.values()):
                each.step()
                each.zero_grad(set_to_none=True)
            done += 1
            if done % WINDOW == 0:
                rates.append(WINDOW * len(images) / (time.perf_counter() - start))
                start = time.perf_counter()
            if done >= steps:
                break
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help="reuse this folder's JPEGs and shards")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(bare_loop(args.steps, args.work)))
        return
    cores = os.cpu_count() or 2
    work = args.work or Path(tempfile.mkdtemp(prefix="dml-train-bench-"))
    count = len(list((work / "jpegs").glob("s*/*.jpg"))) if (work / "shards").exists() else prepare(work)
    plan = [
        ("dml-1p", lambda: run_dml(1, cores, args.steps, work, "1p")),
        ("bare-1p", lambda: run_bare(cores, args.steps, work)),
        ("dml-2p", lambda: run_dml(2, max(1, cores // 2), args.steps, work, "2p")),
        ("dml-1p-1t", lambda: run_dml(1, max(1, cores // 2), args.steps, work, "1p1t")),
        ("bare-1p-1t", lambda: run_bare(max(1, cores // 2), args.steps, work)),
    ]
    repeats = []
    for repeat in range(args.repeats):  # rotate the order so no contender always runs first
        shift = repeat % len(plan)
        rows: dict[str, Any] = {name: run() for name, run in plan[shift:] + plan[:shift]}
        rows["ratio_dml_vs_bare"] = rows["dml-1p"]["images_per_s"] / rows["bare-1p"]["images_per_s"]
        rows["ratio_2p_vs_1p"] = rows["dml-2p"]["images_per_s"] / rows["dml-1p"]["images_per_s"]
        # with other work on the cores, 2 OpenMP threads per process can stall at every op's
        # barrier (one thread descheduled): the 1-thread pair shows the loop without that
        rows["ratio_dml_vs_bare_1t"] = rows["dml-1p-1t"]["images_per_s"] / rows["bare-1p-1t"]["images_per_s"]
        repeats.append(rows)
        print(
            f"repeat {repeat + 1}: "
            + ", ".join(f"{n} {rows[n]['images_per_s']:.1f}" for n, _ in plan)
            + f"; dml/bare {rows['ratio_dml_vs_bare']:.3f}, 2p/1p {rows['ratio_2p_vs_1p']:.2f}",
            flush=True,
        )
    print(f"{count} JPEGs of {SIZE} px, batch 128 per process, {args.steps} steps, windows of {WINDOW}")
    print(f"{'run':>10} {'procs':>5} {'threads':>7} {'images/s (each repeat)':>30} {'load':>5}")
    for name, _ in plan:
        runs = [r[name] for r in repeats]
        print(
            f"{name:>10} {runs[0]['processes']:>5} {runs[0]['threads_per_process']:>7} "
            f"{' '.join(format(r['images_per_s'], '.1f') for r in runs):>30} {runs[-1]['load_average']:>5.1f}"
        )
    for key in ("ratio_dml_vs_bare", "ratio_dml_vs_bare_1t", "ratio_2p_vs_1p"):
        values = [r[key] for r in repeats]
        print(f"{key}: median {statistics.median(values):.3f} (range {min(values):.3f}-{max(values):.3f})")
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "repeats": repeats,
        "jpegs": count,
        "cpus": cores,
        "machine": platform.machine(),
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
    }
    (RESULTS / "train_throughput.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {RESULTS / 'train_throughput.json'} (work folder {work})")


if __name__ == "__main__":
    main()
