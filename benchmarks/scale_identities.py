"""Benchmark: a million identities through `dml prepare` and `dml train`, checkpoint and resume.

Made here, deterministically, so nothing is downloaded: ``--identities`` classes x 2 grey
16 x 16 images (each identity a seeded random pattern, its second image the pattern with
seeded noise), written as one MNIST-style IDX pair and turned into shards by `dml prepare`.
Then `dml train` under ``torchrun --nproc_per_node 2`` (resnet18, 512-d embeddings, ArcFace
partial FC at sample rate 0.1, 128 images per rank) runs ``--steps`` steps and writes one
checkpoint, and the run is resumed on 1 and on 3 processes for ``--resume-steps`` more steps
with the learning rate set to ~0 (1e-30: a resume may change the lr), so that the centres
a resumed run saves must equal, bit for bit, the ones the 2-process run saved, whatever the
number of processes that read and rewrote them.

Measured: prepare images/s; train ms/step and images/s (median of logged steps after the
first); peak RSS of every process (VmHWM, polled; loader workers and torchrun included) and
of each rank just before and after the checkpoint write; checkpoint size; save and load
seconds (from the checkpoint's log lines); the step each resumed run continues from; and the
head alone (benchmarks/partial_fc.py's worker, same classes, rate and batch) against its
matrix-multiply floor on this machine: its three GEMMs, with their shapes, done bare in the
same processes right after each step (so both see the same load of the shared machine), and,
as in partial_fc.py, their FLOPs at the best square-GEMM rate.

    python benchmarks/scale_identities.py [--identities 1000000] [--steps 12] [--work DIR]

Needs ~8 GiB of memory at 1M identities and ~7 GiB of disk in ``--work``. Prints a table and
writes benchmarks/results/scale_identities.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
import partial_fc as head_bench  # noqa: E402

from dml.distributed import barrier  # noqa: E402
from dml.train.checkpoint import latest_checkpoint, read_head_rows  # noqa: E402
from local_group import spawn_local_group, torchrun_dml  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scale_identities.json"
SIDE, DIM, PER_RANK, RATE = 16, 512, 128, 0.1
GIB = 1024**3


def write_idx(folder: Path, identities: int, seed: int = 0, chunk: int = 65536) -> int:
    """``train-images-idx3-ubyte`` (2 x identities, 16, 16) uint8 and int32 labels; returns images."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 2 * identities
    with (
        open(folder / "train-images-idx3-ubyte", "wb") as images,
        open(folder / "train-labels-idx1-ubyte", "wb") as labels,
    ):
        images.write(bytes([0, 0, 0x08, 3]) + np.array([count, SIDE, SIDE], ">u4").tobytes())
        labels.write(bytes([0, 0, 0x0C, 1]) + np.array([count], ">u4").tobytes())
        for first in range(0, identities, chunk):
            ids = np.arange(first, min(identities, first + chunk))
            rng = np.random.default_rng([seed, first])
            base = rng.integers(0, 256, (len(ids), SIDE, SIDE), dtype=np.int16)
            noisy = np.clip(base + rng.integers(-24, 25, base.shape, dtype=np.int16), 0, 255)
            pair = np.stack([base, noisy], axis=1).astype(np.uint8)  # (ids, 2, 16, 16)
            images.write(pair.reshape(-1, SIDE, SIDE).tobytes())
            labels.write(np.repeat(ids, 2).astype(">i4").tobytes())
    return count


def base_config(work: Path, steps: int) -> dict:
    return {
        "seed": 0,
        "prepare": {
            "source": {"kind": "idx", "path": str(work / "raw")},
            "split": {"mode": "source"},
            "shards": {"max_samples": 100_000},
            "output_dir": str(work / "shards"),
            "workers": 2,
        },
        "data": {
            "shard_dir": str(work / "shards"),
            "image_size": SIDE,
            "channels": 1,
            "batch_size": PER_RANK,
            "num_workers": 1,
            "shuffle_buffer": 1000,
            "augment": {"horizontal_flip": False},
        },
        "model": {"backbone": "resnet18", "embedding_dim": DIM},
        "loss": {"kind": "arcface", "scale": 64.0, "margin": 0.5, "sample_rate": RATE},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "train": {
            "run_dir": str(work / "run"),
            "epochs": 1,
            "max_steps": steps,
            "checkpoint_every": steps,
            "log_every": 1,
            "keep_last": 5,
            "eval_every": None,
            "eval_split": "none",
        },
    }


class RssWatch:
    """Polls every descendant of a process: peak RSS (VmHWM) per pid, and each pid's VmHWM
    when a checkpoint's ``.tmp`` folder first appears and when its final folder appears."""

    def __init__(self, proc: subprocess.Popen, checkpoints: Path, interval: float = 0.2):
        self.root, self.checkpoints, self.interval = psutil.Process(proc.pid), checkpoints, interval
        self.peak: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.before_save: dict[int, int] = {}
        self.after_save: dict[int, int] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _hwm(self) -> dict[int, int]:
        out: dict[int, int] = {}
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return out
        for proc in procs:
            try:
                text = Path(f"/proc/{proc.pid}/status").read_text()
                found = re.search(r"VmHWM:\s+(\d+) kB", text)
                if found is None:
                    continue
                out[proc.pid] = int(found.group(1)) * 1024
                self.names.setdefault(proc.pid, " ".join(proc.cmdline()[-4:])[-60:])
            except (OSError, AttributeError, psutil.Error):
                continue
        return out

    def _run(self) -> None:
        while not self.done.is_set():
            hwm = self._hwm()
            for pid, value in hwm.items():
                self.peak[pid] = max(self.peak.get(pid, 0), value)
            saving = any(self.checkpoints.glob("step-*.tmp")) if self.checkpoints.exists() else False
            if saving and not self.before_save:
                self.before_save = dict(hwm)
            if self.before_save and not self.after_save and not saving:
                self.after_save = dict(hwm)
            time.sleep(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def run_logged(
    cmd: list[str], log_path: Path, checkpoints: Path | None = None, env: dict | None = None
) -> tuple[float, RssWatch | None, str]:
    """Run ``cmd`` with its output in ``log_path``; (seconds, watch, output). Raises on failure."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        watch = RssWatch(proc, checkpoints) if checkpoints is not None else None
        code = proc.wait()
    if watch:
        watch.stop()
    output = log_path.read_text()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({code}); see {log_path}:\n{output[-2000:]}")
    return time.perf_counter() - started, watch, output


def dml(*args: str) -> list[str]:
    return [sys.executable, "-m", "dml.cli", *args]


def rank_peaks(watch: RssWatch) -> list[dict]:
    """Peak RSS of each process that trained (the dml.cli ranks), with before/after-save peaks."""
    rows = []
    for pid, peak in sorted(watch.peak.items()):
        row = {"pid": pid, "what": watch.names.get(pid, "?"), "peak_rss_gib": peak / GIB}
        if pid in watch.before_save and pid in watch.after_save:
            row["peak_before_save_gib"] = watch.before_save[pid] / GIB
            row["peak_after_save_gib"] = watch.after_save[pid] / GIB
            row["save_over_train"] = watch.after_save[pid] / max(watch.before_save[pid], 1)
        rows.append(row)
    return rows


def step_times(run_dir: Path, skip_first: int = 1) -> tuple[list[int], float, float]:
    """(logged steps, median ms/step, median images/s) from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "images_per_s" in r]
    rates = [r["images_per_s"] for r in records][skip_first:] or [r["images_per_s"] for r in records]
    images_per_s = statistics.median(rates)
    return [r["step"] for r in records], 1000 * 2 * PER_RANK / images_per_s, images_per_s


def seconds_in(output: str, pattern: str) -> float | None:
    found = re.findall(pattern, output)
    return float(found[-1]) if found else None


def bare_gemms_s(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> float:
    """Time of the head's own three products with its shapes: logits (N x D)(D x k), grad
    w.r.t. embeddings (N x k)(k x D), grad w.r.t. centres (k x N)(N x D); nothing else."""
    started = time.perf_counter()
    x @ w.t(), g @ w, g.t() @ x
    return time.perf_counter() - started


def head_worker(info, classes: int, warmup: int, steps: int) -> dict:
    """benchmarks/partial_fc.py's head step, each one followed by its three GEMMs done bare in
    the same process, so step and floor are timed under the same load of the shared machine."""
    from dml.losses.margins import ArcFace
    from dml.losses.partial_fc import PartialFC

    head_bench.volunteer_for_oom_killer()
    head = PartialFC(DIM, classes, ArcFace(s=64.0, m=0.5), sample_rate=RATE)
    optimizer = head.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    rows = 2 * PER_RANK
    x, g = torch.randn(rows, DIM), None
    step_s, floor_s = [], []
    for step in range(warmup + steps):
        emb, labels = head_bench.synthetic_batch(step, PER_RANK, classes, offset=info.rank * PER_RANK)
        barrier()
        started = time.perf_counter()
        optimizer.zero_grad()
        head(emb, labels).backward()
        optimizer.step()
        barrier()
        elapsed = time.perf_counter() - started
        assert head.sampled_index is not None  # sample_rate < 1 samples rows
        k = head.sampled_index.numel()
        w = head.weight.detach()[:k]
        g = torch.randn(rows, k) if g is None or g.shape[1] != k else g
        if step >= warmup:
            step_s.append(elapsed)
            floor_s.append(bare_gemms_s(x, w, g))
    return {"step_s": step_s, "floor_s": floor_s, "scored": k}


def head_floor(identities: int, steps: int) -> dict:
    """The head alone at these classes on 2 gloo ranks x 1 thread against its matrix-multiply
    floor (its three GEMMs, same shapes, same processes, right after each step); also the
    FLOPs at the best square-GEMM rate, partial_fc.py's floor."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as benchmarks/partial_fc.py runs its workers
    results = spawn_local_group(head_worker, 2, args=(identities, 1, steps))
    step_s = statistics.median(max(ts) for ts in zip(*(r["step_s"] for r in results), strict=True))
    floor = statistics.median(max(ts) for ts in zip(*(r["floor_s"] for r in results), strict=True))
    scored = max(r["scored"] for r in results)
    rate_1 = head_bench.gemm_flops_per_s(1)
    peak_floor = 6 * 2 * PER_RANK * DIM * scored / rate_1
    return {
        "head_ms_per_step": 1000 * step_s,
        "matmul_floor_ms": 1000 * floor,
        "ratio": step_s / floor,
        "peak_rate_floor_ms": 1000 * peak_floor,
        "ratio_to_peak_rate_floor": step_s / peak_floor,
        "gemm_gflops_1_thread": rate_1 / 1e9,
        "scored_rows_per_rank": scored,
        "load_average": os.getloadavg(),
    }


def head_comparison(saved: torch.Tensor, after: torch.Tensor) -> dict:
    """Whether the resumed run's centres are the saved ones. At lr 1e-30 an update changes no
    element of ordinary size, but an element that is exactly 0.0 moves to ~1e-35 (seen at 1M
    identities: 2 of 5e8 elements); those are counted apart rather than called a mismatch."""
    differ = saved != after
    moved_zeros = differ & (saved == 0) & ((after - saved).abs() < 1e-25)
    return {
        "head_weight_equal_bitwise": bool(not differ.any()),
        "head_elements_differing": int(differ.sum()),
        "head_differing_only_zeros_moved_by_lr": bool(torch.equal(differ, moved_zeros)),
        "head_max_abs_difference": float((after - saved).abs().max()),
        "head_weight_equal": bool(torch.equal(differ, moved_zeros)),
    }


def resume(work: Path, config_path: Path, nproc: int, steps: int, resume_steps: int) -> dict:
    """Resume a hard-linked copy of the 2-process run on ``nproc`` processes at lr ~0."""
    run_dir = work / f"run-resume-{nproc}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()  # checkpoint files are never rewritten in place, so hard links are safe copies
    subprocess.run(["cp", "-al", str(work / "run" / "checkpoints"), str(run_dir / "checkpoints")], check=True)
    shutil.copy(work / "run" / "config.yaml", run_dir / "config.yaml")
    overrides = [
        f"train.run_dir={run_dir}",
        f"train.max_steps={steps + resume_steps}",
        f"train.checkpoint_every={resume_steps}",
        "optimizer.lr=1e-30",
    ]
    seconds, watch, output = run_logged(
        torchrun_dml(nproc, "train", "--config", str(config_path), "--resume", *overrides),
        work / f"resume-{nproc}.log",
        run_dir / "checkpoints",
    )
    assert watch is not None  # run_logged watches when given a checkpoints folder
    logged, _, _ = step_times(run_dir, skip_first=0)
    saved = read_head_rows(work / "run" / "checkpoints" / f"step-{steps:08d}")
    latest = latest_checkpoint(run_dir)
    assert latest is not None, f"no checkpoint in {run_dir}"
    after = read_head_rows(latest)
    return {
        "processes": nproc,
        "first_step_after_resume": min(s for s in logged if s > 0),
        "resumed_from_step": int(re.findall(r"resumed from \S+ \(step (\d+)\)", output)[-1]),
        "load_s": seconds_in(output, r"checkpoint: loaded \S+ in ([\d.]+) s"),
        "save_s": seconds_in(output, r"checkpoint: step \d+ -> \S+ \(([\d.]+) s\)"),
        **head_comparison(saved, after),
        "wall_s": seconds,
        "processes_rss": rank_peaks(watch),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--resume-steps", type=int, default=2)
    parser.add_argument("--head-steps", type=int, default=3, help="timed steps of the head alone")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="only generate and prepare (implies --keep; run again with the same --work)",
    )
    parser.add_argument("--head-only", action="store_true", help="only the head alone against its floors")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.head_only:
        report: dict | None = head_floor(args.identities, args.head_steps)
        print(json.dumps(report, indent=1))
        args.out.write_text(json.dumps({"identities": args.identities, "head_alone": report}, indent=2))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="scale_identities_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = measure(args, work)
    finally:
        if not (args.keep or args.prepare_only):
            shutil.rmtree(work, ignore_errors=True)
    if report is None:
        print(f"prepared shards kept in {work}")
        return
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def prepare(args, work: Path, config_path: Path) -> dict:
    """Generate the images and run `dml prepare`; kept in ``work/prepare.json`` so a later call
    with the same ``--work`` (e.g. after ``--prepare-only``) reuses the shards."""
    done = work / "prepare.json"
    if done.is_file() and json.loads(done.read_text())["identities"] == args.identities:
        return json.loads(done.read_text())
    started = time.perf_counter()
    images = write_idx(work / "raw", args.identities)
    generate_s = time.perf_counter() - started
    prepare_s, watch, _ = run_logged(
        dml("prepare", "--config", str(config_path)), work / "prepare.log", work / "no-checkpoints"
    )
    assert watch is not None  # run_logged watches when given a checkpoints folder
    print(f"prepare: {images} images in {prepare_s:.0f} s", flush=True)
    result = {
        "identities": args.identities,
        "images": images,
        "generate_s": generate_s,
        "seconds": prepare_s,
        "images_per_s": images / prepare_s,
        "peak_rss_gib": max(watch.peak.values()) / GIB,
        "peak_rss_gib_all_processes": sum(watch.peak.values()) / GIB,
        "load_average": os.getloadavg(),
    }
    done.write_text(json.dumps(result))
    return result


def measure(args, work: Path) -> dict | None:
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(base_config(work, args.steps)))
    prepared = prepare(args, work, config_path)
    if args.prepare_only:
        return None
    train_s, watch, output = run_logged(
        torchrun_dml(2, "train", "--config", str(config_path)), work / "train.log", work / "run" / "checkpoints"
    )
    logged, ms_per_step, images_per_s = step_times(work / "run")
    checkpoint = latest_checkpoint(work / "run")
    assert watch is not None and checkpoint is not None, f"no checkpoint in {work / 'run'}"
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    print(f"train: {len(logged)} steps, {ms_per_step:.0f} ms/step", flush=True)
    report = {
        "identities": args.identities,
        "images": prepared["images"],
        "image": f"{SIDE}x{SIDE} grey",
        "dim": DIM,
        "sample_rate": RATE,
        "per_rank_batch": PER_RANK,
        "backbone": "resnet18",
        "steps": args.steps,
        "load_average_start": os.getloadavg(),
        "prepare": prepared,
        "train_2": {
            "wall_s": train_s,
            "ms_per_step": ms_per_step,
            "images_per_s": images_per_s,
            "save_s": seconds_in(output, r"checkpoint: step \d+ -> \S+ \(([\d.]+) s\)"),
            "checkpoint": checkpoint.name,
            "checkpoint_gib": size / GIB,
            "processes_rss": rank_peaks(watch),
            "peak_rss_gib_all_processes": sum(watch.peak.values()) / GIB,
        },
    }
    report["resume"] = [resume(work, config_path, n, args.steps, args.resume_steps) for n in (1, 3)]
    report["head_alone"] = head_floor(args.identities, args.head_steps)
    report["load_average_end"] = os.getloadavg()
    return report


def print_report(r: dict) -> None:
    t = r["train_2"]
    print(
        f"\n{r['identities']:,} identities x 2 images ({r['image']}), D {r['dim']}, rate {r['sample_rate']}, "
        f"{r['per_rank_batch']}/rank, {r['backbone']}"
    )
    print(
        f"prepare            {r['prepare']['images_per_s']:.0f} images/s ({r['prepare']['seconds']:.0f} s), "
        f"peak RSS {r['prepare']['peak_rss_gib']:.2f} GiB"
    )
    print(f"train (2 procs)    {t['ms_per_step']:.0f} ms/step, {t['images_per_s']:.1f} images/s")
    print(f"checkpoint         {t['checkpoint_gib']:.2f} GiB, save {t['save_s']} s")
    print(f"peak RSS all procs {t['peak_rss_gib_all_processes']:.2f} GiB (target < 20)")
    for p in t["processes_rss"]:
        extra = (
            f", before save {p['peak_before_save_gib']:.2f}, after {p['peak_after_save_gib']:.2f} "
            f"(x{p['save_over_train']:.2f})"
            if "save_over_train" in p
            else ""
        )
        print(f"  pid {p['pid']:<8} {p['peak_rss_gib']:.2f} GiB{extra}  [{p['what']}]")
    for res in r["resume"]:
        print(
            f"resume on {res['processes']}: from step {res['resumed_from_step']} -> first step "
            f"{res['first_step_after_resume']}, load {res['load_s']} s, save {res['save_s']} s, "
            f"head equal: bitwise {res['head_weight_equal_bitwise']}, {res['head_elements_differing']} elements "
            f"differ (all exact zeros moved by the 1e-30 lr: {res['head_differing_only_zeros_moved_by_lr']}, "
            f"max {res['head_max_abs_difference']:.1e}), peak RSS max "
            f"{max(p['peak_rss_gib'] for p in res['processes_rss']):.2f} GiB"
        )
    h = r["head_alone"]
    print(
        f"head alone         {h['head_ms_per_step']:.0f} ms/step; its GEMMs alone {h['matmul_floor_ms']:.0f} ms: "
        f"ratio {h['ratio']:.2f} (target <= 2); at the best GEMM rate ({h['gemm_gflops_1_thread']:.1f} GFLOP/s, "
        f"1 thread) {h['peak_rate_floor_ms']:.0f} ms: ratio {h['ratio_to_peak_rate_floor']:.2f}"
    )


if __name__ == "__main__":
    main()
