"""Benchmark: leave-one-out retrieval metrics, dml.eval vs pytorch-metric-learning.

Claim checked: on clustered synthetic embeddings (N x 128, L2-normalised) dml.eval's
``retrieval_metrics`` gives the same precision_at_1, r_precision and map_at_r as PML's
``AccuracyCalculator`` (faiss flat search, k="max_bin_count"), at least 1.5x faster, and the
1M case stays within 8 GiB peak resident memory.

Data: N // 20 classes, labels drawn uniformly (class sizes ~Poisson(20), some classes of
size 1 are left out by both as having no relevant item), unit class centres plus Gaussian
noise whose scale varies per class (0.06..0.16 per dimension), so metrics are well below 1.
Every measurement runs in a fresh subprocess that builds the same data from the seed, so
``ru_maxrss`` (peak RSS) is that contender's own; RSS after building the data is reported
too. Wall time covers the metric call only.

Exact-search floor: N * N * D * 2 FLOPs (one N x N x D product) divided by this machine's
fp32 GEMM rate, measured with numpy and torch on 4096 x D x 4096 products (best of both).
That is the floor of a per-query search (PML's). dml's leave-one-out uses the symmetry of
the score matrix and computes each score once (dml.eval.self_search): half of that product,
so its own floor is half the printed one.

Values: dml ranks by the exact inner product (float64 re-check of near-ties, ties by index).
PML ranks by faiss' float32 L2 distance, whose rounding (~2.4e-7 absolute) can swap
near-tied neighbours, so on continuous data the two can differ around 1e-7..1e-6. When they
differ at all (> 1e-12) an extra PML run is made whose knn function re-sorts faiss' L2
candidates by the exact inner product; it should then equal dml (``pml_exact_order``).

The machine is shared and noisy: contenders run alternately in one invocation, the load
average is recorded, and with --repeats the fastest run of each is kept. Results of sizes
not run this time are kept in the JSON file (each row records its own GEMM rate and time).

Usage: python benchmarks/eval_knn.py [--sizes 100000 1000000] [--skip-pml-above 200000]
       [--repeats 1] [--dim 128]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "eval_knn.json"
GIB = 1024**3
METRICS = ("precision_at_1", "r_precision", "map_at_r")
PML_NAMES = dict(zip(METRICS, ("precision_at_1", "r_precision", "mean_average_precision_at_r")))


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def clustered_embeddings(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit rows and int64 labels, built in chunks to keep RSS near n*dim*4."""
    rng = np.random.default_rng(seed)
    classes = max(2, n // 20)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.06, 0.16, classes).astype(np.float32)
    labels = rng.integers(0, classes, n)
    data = np.empty((n, dim), np.float32)
    for start in range(0, n, 65536):
        part = labels[start : start + 65536]
        rows = centres[part] + spread[part, None] * rng.standard_normal((len(part), dim), dtype=np.float32)
        data[start : start + len(part)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return data, labels


def gemm_gflops(dim: int) -> float:
    """Best fp32 GEMM rate of numpy and torch on 4096 x dim x 4096 products.

    The product goes into a preallocated output: allocating 64 MiB per call maps and
    page-faults fresh memory each time, which nearly halved the rate measured here.
    """
    import torch

    a = np.random.default_rng(0).standard_normal((4096, dim), dtype=np.float32)
    out = np.empty((4096, 4096), np.float32)
    a_t, out_t = torch.from_numpy(a), torch.from_numpy(out)
    best = 0.0
    for multiply in (lambda: np.matmul(a, a.T, out=out), lambda: torch.mm(a_t, a_t.T, out=out_t)):
        multiply()
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(5):
                multiply()
            best = max(best, 5 * 4096 * 4096 * dim * 2 / (time.perf_counter() - start) / 1e9)
    return best


def exact_order_knn(query, k, reference, ref_includes_query):
    """A PML knn_func: faiss L2 candidates (k + 16) re-sorted by exact float64 inner product."""
    import torch
    from pytorch_metric_learning.utils.inference import FaissKNN

    _, ids = FaissKNN()(query, k + 16, reference, ref_includes_query)
    q, ref, ids = query.numpy(), reference.numpy(), ids.numpy()
    scores = np.empty(ids.shape)
    for s in range(0, len(ids), 2048):  # chunks bound the gathered (rows, k, D) float64 block
        scores[s : s + 2048] = np.einsum("bd,bkd->bk", q[s : s + 2048].astype(np.float64),
                                         ref[ids[s : s + 2048]].astype(np.float64))
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    ids = np.take_along_axis(ids, order, 1)
    return torch.from_numpy(np.take_along_axis(scores, order, 1)), torch.from_numpy(ids)


def run_worker(contender: str, n: int, dim: int, seed: int, progress_log: Path | None = None) -> dict:
    """Build the data, time one metric computation, report values and memory."""
    import logging

    import torch

    if progress_log is not None:  # dml logs each searched batch at DEBUG level
        logging.basicConfig(filename=progress_log, level=logging.DEBUG, format="%(asctime)s %(message)s")
        logging.getLogger("dml.eval.metrics").setLevel(logging.DEBUG)

    data, labels = clustered_embeddings(n, dim, seed)
    rss_data = peak_rss_bytes()
    if contender == "dml":
        from dml.eval import retrieval_metrics

        start = time.perf_counter()
        result = retrieval_metrics(data, labels)
        seconds = time.perf_counter() - start
        values = {m: result[m] for m in METRICS}
        extra = {"num_queries": result["num_queries"], "num_excluded_queries": result["num_excluded_queries"]}
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        knn = {"knn_func": exact_order_knn} if contender == "pml_exact_order" else {}
        calculator = AccuracyCalculator(include=tuple(PML_NAMES.values()), k="max_bin_count",
                                        device=torch.device("cpu"), **knn)
        start = time.perf_counter()
        result = calculator.get_accuracy(torch.from_numpy(data), torch.from_numpy(labels))
        seconds = time.perf_counter() - start
        values = {m: result[PML_NAMES[m]] for m in METRICS}
        extra = {}
    return {"contender": contender, "n": n, "dim": dim, "seconds": seconds, "values": values,
            "peak_rss_gib": peak_rss_bytes() / GIB, "rss_after_data_gib": rss_data / GIB, **extra}


def measure(contender: str, n: int, dim: int, seed: int, progress_log: Path | None = None) -> dict:
    """Run one contender in a fresh subprocess so its peak RSS is its own."""
    command = [sys.executable, __file__, "--worker", contender, "--sizes", str(n), "--dim", str(dim),
               "--seed", str(seed)]
    if progress_log is not None:
        command += ["--progress-log", str(progress_log)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:  # negative: killed by that signal (e.g. -9 from an OOM killer)
        raise RuntimeError(f"{contender} N={n} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["load_average"] = os.getloadavg()[0]
    return record


def best_of(records: list[dict]) -> dict:
    best = dict(min(records, key=lambda r: r["seconds"]))
    best["all_seconds"] = [round(r["seconds"], 2) for r in records]
    best["peak_rss_gib"] = max(r["peak_rss_gib"] for r in records)
    return best


def benchmark_size(n: int, args) -> dict:
    gflops = gemm_gflops(args.dim)  # re-measured per size: the machine's load drifts
    runs: dict[str, list[dict]] = {"dml": [], "pml": []}
    run_pml = n <= args.skip_pml_above
    for repeat in range(args.repeats):  # alternate the order to share the machine's moods
        order = ["dml", "pml"] if repeat % 2 == 0 else ["pml", "dml"]
        for contender in order:
            if contender == "dml" or run_pml:
                runs[contender].append(measure(contender, n, args.dim, args.seed, args.progress_log))
    row = {"n": n, "dim": args.dim, "gemm_gflops": gflops, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
           "floor_seconds": n * n * args.dim * 2 / (gflops * 1e9),
           "symmetric_floor_seconds": n * n * args.dim / (gflops * 1e9),
           "dml": best_of(runs["dml"])}
    if run_pml:
        row["pml"] = best_of(runs["pml"])
        row["speedup"] = row["pml"]["seconds"] / row["dml"]["seconds"]
        row["max_abs_diff"] = max(abs(row["dml"]["values"][m] - row["pml"]["values"][m]) for m in METRICS)
        if row["max_abs_diff"] > 1e-12:  # explain any difference beyond float64 summation noise
            row["pml_exact_order"] = measure("pml_exact_order", n, args.dim, args.seed)
            row["max_abs_diff_exact_order"] = max(
                abs(row["dml"]["values"][m] - row["pml_exact_order"]["values"][m]) for m in METRICS)
    else:
        row["pml"] = f"skipped (--skip-pml-above {args.skip_pml_above})"
    return row


def print_table(rows: list[dict]) -> None:
    print("floor = N*N*D*2 / fp32 GEMM rate (best of numpy / torch, measured before each size)")
    header = f"{'N':>9} {'who':>5} {'time s':>8} {'peak GiB':>9} {'data GiB':>9} {'P@1':>8} {'R-prec':>8} {'MAP@R':>8}"
    print(header + f" {'vs floor':>9}")
    for row in rows:
        for who in ("dml", "pml"):
            rec = row[who]
            if isinstance(rec, str):
                print(f"{row['n']:>9} {who:>5} {rec}")
                continue
            vals = rec["values"]
            print(f"{row['n']:>9} {who:>5} {rec['seconds']:>8.1f} {rec['peak_rss_gib']:>9.2f} "
                  f"{rec['rss_after_data_gib']:>9.2f} {vals['precision_at_1']:>8.5f} "
                  f"{vals['r_precision']:>8.5f} {vals['map_at_r']:>8.5f} "
                  f"{rec['seconds'] / row['floor_seconds']:>8.2f}x")
        summary = (f"{row['n']:>9} floor {row['floor_seconds']:.1f} s at {row['gemm_gflops']:.1f} GFLOP/s "
                   f"(symmetric: {row['symmetric_floor_seconds']:.1f} s)")
        if "speedup" in row:
            summary += f"; dml {row['speedup']:.2f}x faster than PML; max |diff| {row['max_abs_diff']:.2e}"
        if "max_abs_diff_exact_order" in row:
            summary += f"; vs PML with exact-order knn {row['max_abs_diff_exact_order']:.2e}"
        print(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-pml-above", type=int, default=200_000)
    parser.add_argument("--worker", choices=["dml", "pml", "pml_exact_order"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--progress-log", type=Path, help="file for the workers' progress lines (dml: per batch)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.sizes[0], args.dim, args.seed, args.progress_log)))
        return
    rows = []
    for n in args.sizes:  # each size is printed and saved as soon as it is done
        rows.append(benchmark_size(n, args))
        print(f"done N={n} ({time.strftime('%H:%M:%S')})", flush=True)
        print_table(rows[-1:])
        write_report(args, rows)
    print("\nall sizes of this run:")
    print_table(rows)
    print(f"wrote {args.out}")


def write_report(args, rows: list[dict]) -> None:
    """Write the JSON report; rows of sizes not run this time are kept from the old file."""
    kept = []
    if args.out.exists():
        kept = [r for r in json.loads(args.out.read_text()).get("results", []) if r["n"] not in {x["n"] for x in rows}]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"cpus": os.cpu_count(),
              "load_average_now": os.getloadavg(), "seed": args.seed, "repeats": args.repeats,
              "skip_pml_above": args.skip_pml_above,
              "results": sorted(kept + rows, key=lambda r: r["n"])}
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
