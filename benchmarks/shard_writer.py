"""Samples per second of `dml prepare` writing shards with dml's tar writer
(`dml.data.tar_members.DeterministicTarWriter`) and with webdataset's own `TarWriter`
(pinned webdataset, ``mtime=0``, empty user/group: byte-reproducible tars too).

The quickstart's Fashion-MNIST set (`configs/quickstart.yaml`, 600 images a class, 1 worker)
goes through `dml.data.shards.write_shards` twice a round, once per writer, in turn; only the
writer differs. Small images make the writer's per-member cost visible, as in the quickstart.

    .venv/bin/python benchmarks/shard_writer.py [--rounds 2] [--per-class 600]

Prints one line per run and writes benchmarks/results/shard_writer.json (median of the rounds).
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import webdataset as wds  # noqa: E402

import dml.data.shards as shards  # noqa: E402
from dml.config import load_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class WebDatasetWriter:
    """`DeterministicTarWriter`'s interface (``add(name, data)``) over webdataset's `TarWriter`:
    members of one sample are collected and written as one sample dict."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")  # noqa: SIM115 - closed by __exit__
        self._writer = wds.TarWriter(self._file, user="", group="", mtime=0, encoder=False)
        self._sample: dict[str, Any] | None = None

    def __enter__(self) -> WebDatasetWriter:
        return self

    def add(self, name: str, data: bytes) -> None:
        key, _, ext = name.partition(".")
        if self._sample is not None and self._sample["__key__"] != key:
            self._writer.write(self._sample)
            self._sample = None
        self._sample = self._sample or {"__key__": key}
        self._sample[ext] = data

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            if self._sample is not None:
                self._writer.write(self._sample)
            self._writer.close()
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()


def prepare_once(writer: type, per_class: int) -> tuple[int, float]:
    """(samples written, seconds) of one `write_shards` run with ``writer``."""
    shards.DeterministicTarWriter = writer  # type: ignore[misc,assignment]  # the name write_one_shard looks up
    out = tempfile.mkdtemp(prefix="shard-writer-")
    try:
        config = load_config(
            ROOT / "configs" / "quickstart.yaml",
            [f"prepare.output_dir={out}", "prepare.workers=1", f"prepare.max_per_class={per_class}"],
            check_backbones=False,
        )
        start = time.perf_counter()
        manifest = shards.write_shards(config.prepare)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(out)
    return sum(split["count"] for split in manifest["splits"].values()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=600)
    args = parser.parse_args()
    writers = {"dml": shards.DeterministicTarWriter, "webdataset": WebDatasetWriter}
    rates: dict[str, list[float]] = {name: [] for name in writers}
    for _ in range(args.rounds):
        for name, writer in writers.items():
            samples, seconds = prepare_once(writer, args.per_class)
            rates[name].append(samples / seconds)
            print(f"{name}: {samples} samples in {seconds:.1f} s ({samples / seconds:.0f} samples/s)", flush=True)
    result = {
        "samples_per_s": {name: round(statistics.median(values), 1) for name, values in rates.items()},
        "rounds": args.rounds,
        "per_class": args.per_class,
        "webdataset": wds.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shard_writer.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
