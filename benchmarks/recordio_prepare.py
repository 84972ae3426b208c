"""Records per second of `dml prepare` reading an insightface RecordIO set.

The set is the shared known-good ORL set (`../shared/data/recordio_orl`, 100 JPEG faces of
92 x 112) with its image records repeated to ``--records`` records (frames copied byte for
byte, a new index, no header record). Times the listing alone (`RecordIOSource.records`) and
the whole `dml prepare` command (a subprocess, as a user runs it) with 1 and 2 workers.

    .venv/bin/python benchmarks/recordio_prepare.py [--records 5000] [--rounds 3]

Prints a table and writes benchmarks/results/recordio_prepare.json (median of the rounds).
"""

from __future__ import annotations

import argparse
import itertools
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

from dml.data.recordio import RecordIOSource, read_index  # noqa: E402

ORL_REC = ROOT.parent / "shared" / "data" / "recordio_orl"
RESULTS = Path(__file__).resolve().parent / "results"


def make_repeated_set(folder: Path, records: int) -> None:
    """Copy the ORL image frames (records 1..100) in turn until ``records`` frames are written."""
    keys, offsets = read_index(ORL_REC / "train.idx")
    blob = (ORL_REC / "train.rec").read_bytes()
    bounds = [int(offsets[keys == k][0]) for k in range(1, 102)]
    frames = [blob[start:end] for start, end in itertools.pairwise(bounds)]
    folder.mkdir(parents=True)
    with open(folder / "train.rec", "wb") as rec, open(folder / "train.idx", "w") as idx:
        for i in range(records):
            idx.write(f"{i}\t{rec.tell()}\n")
            rec.write(frames[i % len(frames)])


def time_prepare(folder: Path, out: Path, workers: int) -> float:
    command = [
        sys.executable,
        "-m",
        "dml.cli",
        "prepare",
        f"prepare.source.path={folder}",
        "prepare.source.kind=recordio",
        f"prepare.output_dir={out}",
        f"prepare.workers={workers}",
        "prepare.split.mode=sample",
        "prepare.split.train_fraction=1.0",
        "prepare.shards.max_samples=500",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not ORL_REC.is_dir():
        sys.exit(f"needs the shared RecordIO set at {ORL_REC}")
    rows: dict[str, list[float]] = {"listing": [], "prepare_w1": [], "prepare_w2": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "rec"
        make_repeated_set(folder, args.records)
        for r in range(args.rounds):
            start = time.perf_counter()
            assert len(RecordIOSource(folder).records()) == args.records
            rows["listing"].append(time.perf_counter() - start)
            for workers in (1, 2):
                rows[f"prepare_w{workers}"].append(time_prepare(folder, Path(tmp) / f"out{r}_{workers}", workers))
    result = {
        "records": args.records,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "seconds": {k: statistics.median(v) for k, v in rows.items()},
        "records_per_s": {k: args.records / statistics.median(v) for k, v in rows.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recordio_prepare.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, rate in result["records_per_s"].items():
        print(f"{name:12s} {result['seconds'][name]:8.3f} s  {rate:10.0f} records/s")
    print(f"written to {RESULTS / 'recordio_prepare.json'}")


if __name__ == "__main__":
    main()
