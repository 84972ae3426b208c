"""The checks behind benchmarks/gpu_check.sh (run that; it skips cleanly without a GPU).

Each check is one row: name, ``ok`` / ``FAIL`` / ``skipped``, its measured value, and a detail
line. A failing check does not stop the others. Tiny data (64 classes x 10 grey 32 x 32
images, made here) keeps the whole run under a few minutes. Untested: no GPU has been lent
to the project's development machines yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from local_group import torchrun_dml  # noqa: E402

STEPS = 6


def tiny_idx(folder: Path, classes: int = 64, per_class: int = 10, side: int = 32) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (classes, 1, side, side), dtype=np.int16)
    images = np.clip(base + rng.integers(-20, 21, (classes, per_class, side, side)), 0, 255).astype(np.uint8)
    count = classes * per_class
    (folder / "train-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + np.array([count, side, side], ">u4").tobytes() + images.tobytes()
    )
    (folder / "train-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 0x0C, 1])
        + np.array([count], ">u4").tobytes()
        + np.repeat(np.arange(classes), per_class).astype(">i4").tobytes()
    )


def config(work: Path) -> dict:
    return {
        "seed": 0,
        "prepare": {
            "source": {"kind": "idx", "path": str(work / "raw")},
            "split": {"mode": "class", "train_fraction": 0.75, "query_fraction": 0.5},
            "output_dir": str(work / "shards"),
        },
        "data": {
            "shard_dir": str(work / "shards"),
            "image_size": 32,
            "channels": 1,
            "batch_size": 32,
            "num_workers": 1,
        },
        "model": {"backbone": "resnet18", "embedding_dim": 128},
        "loss": {"kind": "arcface", "scale": 32.0, "margin": 0.3, "sample_rate": 0.5},
        "train": {
            "run_dir": str(work / "run"),
            "epochs": 50,
            "max_steps": STEPS,
            "checkpoint_every": STEPS,
            "log_every": 1,
            "eval_every": None,
            "eval_split": "none",
        },
        "export": {
            "model_path": str(work / "run-fp32" / "model.pt"),
            "output_dir": str(work / "export"),
            "formats": ["onnx"],
            "parity_images": 16,
        },
    }


def run(cmd: list[str], log: Path, timeout: int = 150) -> str:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout + done.stderr


def train(work: Path, precision: str) -> dict[str, Any]:
    """`dml train` under torchrun, one process per GPU (NCCL), ``precision`` autocast."""
    gpus = torch.cuda.device_count()
    run_dir = work / f"run-{precision}"
    output = run(
        [
            *torchrun_dml(gpus, "train", "--config", str(work / "config.yaml")),
            f"train.run_dir={run_dir}",
            f"train.precision={precision}",
        ],
        work / f"train-{precision}.log",
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_main"] for r in records if "loss_main" in r]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    if len(losses) < STEPS or not all(np.isfinite(losses)):
        raise RuntimeError(f"{len(losses)} logged steps, losses {losses}")
    device = "cuda" if "device cuda" in output else "not cuda (see log)"
    return {
        "value": f"{statistics.median(rates):.0f} img/s",
        "detail": f"{gpus} proc(s), {device}, loss {losses[0]:.2f} -> {losses[-1]:.2f}",
        "ok": device == "cuda",
    }


def faiss_gpu_vs_cpu(work: Path) -> dict[str, Any]:
    """Exact search (flat index) on faiss GPU and CPU: the same neighbours, and how fast."""
    from dml.eval.index import build_index

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((50_000, 128)).astype(np.float32)
    queries = gallery[:2000] + 0.1 * rng.standard_normal((2000, 128)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    found = {}
    for use_gpu in (True, False):
        index = build_index(gallery, use_gpu=use_gpu)
        started = time.perf_counter()
        sims, ids = index.search(queries, 10)
        found[use_gpu] = (index.backend, np.asarray(ids), np.asarray(sims), time.perf_counter() - started)
    same = float((found[True][1] == found[False][1]).mean())
    gap = float(np.abs(found[True][2] - found[False][2]).max())
    return {
        "value": f"{same:.4f} of ids equal",
        "ok": found[True][0] == "faiss-gpu" and same > 0.999,
        "detail": f"{found[True][0]} {1000 * found[True][3]:.0f} ms vs {found[False][0]} "
        f"{1000 * found[False][3]:.0f} ms (2000 x 50000, k 10); max |sim gap| {gap:.1e}",
    }


def onnx_cuda(work: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from dml.export.onnx_export import open_onnx_session

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"status": "skipped", "detail": f"onnxruntime offers {ort.get_available_providers()}"}
    run([sys.executable, "-m", "dml.cli", "export", "--config", str(work / "config.yaml")], work / "export.log")
    path = next((work / "export").rglob("*.onnx"))
    cuda, cpu = open_onnx_session(path, "CUDAExecutionProvider"), open_onnx_session(path)
    name, shape = cuda.get_inputs()[0].name, cuda.get_inputs()[0].shape
    out = {}
    for batch in (1, 64):
        feed = {
            name: np.random.default_rng(batch)
            .random((batch, *[d if isinstance(d, int) else 32 for d in shape[1:]]))
            .astype(np.float32)
        }
        for _ in range(5):
            cuda.run(None, feed)
        times = []
        for _ in range(30):
            started = time.perf_counter()
            cuda.run(None, feed)
            times.append(time.perf_counter() - started)
        diff = float(np.abs(cuda.run(None, feed)[0] - cpu.run(None, feed)[0]).max())
        out[batch] = (1000 * statistics.median(times), diff)
    return {
        "value": f"{out[1][0]:.2f} ms (b1), {out[64][0]:.2f} ms (b64)",
        "ok": cuda.get_providers()[0] == "CUDAExecutionProvider" and max(d for _, d in out.values()) < 1e-2,
        "detail": f"providers {cuda.get_providers()}; max |CUDA - CPU| {max(d for _, d in out.values()):.1e}",
    }


def head_1m(work: Path, classes: int = 1_000_000, batch: int = 256, steps: int = 10) -> dict[str, Any]:
    from dml.losses import ArcFace, PartialFC

    device = torch.device("cuda")
    head = PartialFC(512, classes, ArcFace(), sample_rate=0.1).to(device)
    optimizer = head.configure_optimizer("sgd", lr=0.1)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 3):
        x = torch.nn.functional.normalize(torch.randn(batch, 512, device=device), dim=1).requires_grad_(True)
        y = torch.randint(0, classes, (batch,), device=device)
        torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.zero_grad()
        head(x, y).backward()
        optimizer.step()
        torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {
        "value": f"{1000 * statistics.median(times):.1f} ms/step, {peak:.2f} GiB peak",
        "ok": True,
        "detail": f"{classes:,} classes x 512, rate 0.1, batch {batch}, SGD momentum, 1 GPU",
    }


def check(rows: list[dict], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    started = time.perf_counter()
    try:
        row = fn()
        row.setdefault("status", "ok" if row.pop("ok", True) else "FAIL")
    except Exception as exc:  # noqa: BLE001 - one failing path must not hide the others
        row = {"status": "FAIL", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    rows.append({"check": name, "seconds": round(time.perf_counter() - started, 1), "value": "", **row})
    print(f"  {name}: {rows[-1]['status']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = args.work
    tiny_idx(work / "raw")
    (work / "config.yaml").write_text(yaml.safe_dump(config(work)))
    run([sys.executable, "-m", "dml.cli", "prepare", "--config", str(work / "config.yaml")], work / "prepare.log")
    rows: list[dict] = []
    check(rows, "dml train, NCCL, fp32", lambda: train(work, "fp32"))
    check(rows, "dml train, bf16 autocast + partial FC", lambda: train(work, "bf16"))
    check(rows, "dml train, fp16 autocast + partial FC", lambda: train(work, "fp16"))
    check(rows, "faiss GPU vs CPU", lambda: faiss_gpu_vs_cpu(work))
    check(rows, "ONNX Runtime CUDA latency", lambda: onnx_cuda(work))
    check(rows, "partial-FC head, 1M classes", lambda: head_1m(work))
    width = max(len(r["check"]) for r in rows)
    print(f"\n{'check':<{width}}  {'status':<7}  {'s':>5}  value / detail")
    for r in rows:
        print(f"{r['check']:<{width}}  {r['status']:<7}  {r['seconds']:>5}  {r['value']}  {r.get('detail', '')}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "gpu": torch.cuda.get_device_name(0),
                "gpus": torch.cuda.device_count(),
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
