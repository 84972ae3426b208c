"""Data throughput: writing shards with 1 vs 2 workers, and reading shards vs ImageFolder.

The images are real: Fashion-MNIST (Debian package `dataset-fashion-mnist`) upscaled to
96x96 RGB and saved as JPEG files in class folders, so both readers decode the same JPEGs
with the same transforms and worker count.

    .venv/bin/python benchmarks/data_throughput.py [--images 12000] [--workers 2] [--rounds 3]

Each round runs all four measurements one after the other, so a burst of load from other
jobs on this shared machine hits both sides of a ratio; the table reports the median round.
Prints a table and writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dml.config import DataConfig, DMLConfig
from dml.data.loader import TrainLoader
from dml.data.shards import write_shards
from dml.data.sources import read_idx
from dml.data.transforms import build_train_transform

FASHION = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results"


def make_jpeg_folder(root: Path, count: int) -> None:
    images = read_idx(FASHION / "train-images-idx3-ubyte.gz")[:count]
    labels = read_idx(FASHION / "train-labels-idx1-ubyte.gz")[:count]
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.stack([pixels] * 3, axis=-1)).resize((96, 96), Image.Resampling.BILINEAR)
        image.save(folder / f"{i:06d}.jpg", quality=90)


def time_write(src: Path, out: Path, workers: int, count: int) -> float:
    config = DMLConfig.model_validate(
        {
            "prepare": {
                "source": {"path": str(src)},
                "output_dir": str(out),
                "workers": workers,
                "split": {"mode": "sample", "train_fraction": 1.0},
                "shards": {"max_samples": 250},
            }
        }
    ).prepare
    start = time.perf_counter()
    manifest = write_shards(config)
    elapsed = time.perf_counter() - start
    assert manifest["counts"]["written"] == count
    return count / elapsed


def data_config(shards: Path, workers: int) -> DataConfig:
    return DataConfig(
        shard_dir=str(shards),
        batch_size=64,
        num_workers=workers,
        image_size=64,
        channels=3,
        shuffle_buffer=1000,
        augment={"horizontal_flip": True, "random_resized_crop": True},
    )


def time_shards(shards: Path, workers: int) -> float:
    loader = TrainLoader(data_config(shards, workers), seed=0)
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def time_imagefolder(src: Path, shards: Path, workers: int) -> float:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(src), transform=build_train_transform(data_config(shards, workers)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers, drop_last=True)
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="worker count for the read comparison")
    args = parser.parse_args()
    if not FASHION.exists():
        sys.exit(f"needs {FASHION}: apt-get install dataset-fashion-mnist")
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="dml-bench-"))
    rounds: list[dict[str, float]] = []
    try:
        make_jpeg_folder(tmp / "jpeg", args.images)
        for r in range(args.rounds):
            row = {
                "write_1_worker": time_write(tmp / "jpeg", tmp / f"s1-{r}", 1, args.images),
                "write_2_workers": time_write(tmp / "jpeg", tmp / f"s2-{r}", 2, args.images),
            }
            row["read_shards"] = time_shards(tmp / f"s1-{r}", args.workers)
            row["read_imagefolder"] = time_imagefolder(tmp / "jpeg", tmp / f"s1-{r}", args.workers)
            row["write_speedup_2_vs_1"] = row["write_2_workers"] / row["write_1_worker"]
            row["read_shards_vs_imagefolder"] = row["read_shards"] / row["read_imagefolder"]
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
            rounds.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    median = {k: statistics.median(row[k] for row in rounds) for k in rounds[0]}
    rows = {k: median[k] for k in ("write_1_worker", "write_2_workers", "read_shards", "read_imagefolder")}
    ratios = {k: median[k] for k in ("write_speedup_2_vs_1", "read_shards_vs_imagefolder")}
    print(f"median of {args.rounds} rounds (ratios: median of the per-round ratios)")
    print(f"{'measurement':<22}{'images/s':>12}")
    for name, value in rows.items():
        print(f"{name:<22}{value:>12.0f}")
    for name, value in ratios.items():
        print(f"{name:<28}{value:>6.2f}x")
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "images": args.images,
        "image_size": "96x96 JPEG -> 64x64 crop",
        "read_workers": args.workers,
        "images_per_second": rows,
        "ratios": ratios,
        "rounds": rounds,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "command": "python benchmarks/data_throughput.py " + " ".join(sys.argv[1:]),
    }
    (RESULTS / "data_throughput.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {RESULTS / 'data_throughput.json'}")


if __name__ == "__main__":
    main()
