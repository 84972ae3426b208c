"""Benchmark: leave-one-out retrieval metrics, dml.eval vs pytorch-metric-learning, across
class sizes.

Claim checked: on clustered synthetic embeddings (N x 128, L2-normalised) dml.eval's
``retrieval_metrics`` gives the same precision_at_1, r_precision and map_at_r as PML's
``AccuracyCalculator`` (faiss flat search, k="max_bin_count") and is at least 1.5x faster on
every shape of class sizes: mean 2, 5, 20, 100 and 500 items per class (labels drawn
uniformly over N // mean classes, so sizes ~Poisson(mean) and some classes of 1 item that
both leave out), and a long-tailed mix like identity data (``longtail``: sizes ~Pareto(1.1)
from 1, capped at 1000: most classes have 1-3 items, most items are in classes of hundreds).
The 1M case (mean 20) stays within 8 GiB peak resident memory.

Data: unit class centres plus Gaussian noise whose scale varies per class (0.06..0.16 per
dimension), so metrics are well below 1. Every measurement runs in a fresh subprocess that
builds the same data from the seed, so ``ru_maxrss`` (peak RSS) is that contender's own.
Times cover the metric call only: wall seconds, and CPU seconds of the process (all its
threads), which on a machine shared with other work says more about the work done.

Exact-search floor, per row: ``floor``, a bare faiss ``IndexFlatIP`` search of every row at
the depth PML's metrics need (the largest class), without metrics; and from this machine's
fp32 GEMM rate (numpy and torch on 4096 x D x 4096 products, best of both) the time of one
N x N x D product (``gemm_floor``, the bound of any per-query exact search) and of half of it
(``symmetric_floor``: dml's leave-one-out scores each pair once, dml.eval.self_search).

Values: dml ranks by the exact inner product (float64 re-check of near-ties, ties by index).
PML ranks by faiss' float32 L2 distance, whose rounding (~2.4e-7 absolute) can swap
near-tied neighbours, so on continuous data the two can differ around 1e-7..1e-6. A row
whose values differ by more than 1e-6 is marked failed (``values_equal`` false). With
``--exact-order-check`` a difference above 1e-12 gets an extra PML run whose knn function
re-sorts faiss' L2 candidates by the exact inner product; it should then equal dml.

The machine is shared and noisy: contenders run alternately in one invocation, the load
average is recorded, and with --repeats the fastest run of each is kept (all are listed).
Rows not run this time are kept in the JSON file.

Usage: python benchmarks/eval_knn.py [--workloads mean2 mean5 mean20 mean100 mean500 longtail]
       [--sizes 100000] [--repeats 1] [--skip-pml-above 200000] [--dim 128]
       (the 1M memory check: --workloads mean20 --sizes 1000000)
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
PML_NAMES = dict(zip(METRICS, ("precision_at_1", "r_precision", "mean_average_precision_at_r"), strict=True))


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


WORKLOADS = ("mean2", "mean5", "mean20", "mean100", "mean500", "longtail")
LONGTAIL_ALPHA, LONGTAIL_CAP = 1.1, 1000


def draw_labels(workload: str, n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels of ``n`` rows for a workload (see the module docstring)."""
    if workload != "longtail":
        return rng.integers(0, classes, n)
    sizes = np.minimum(np.floor(rng.random(n) ** (-1 / LONGTAIL_ALPHA)), LONGTAIL_CAP).astype(np.int64)
    used = int(np.searchsorted(np.cumsum(sizes), n)) + 1
    sizes = sizes[:used]
    sizes[-1] -= sizes.sum() - n  # the last class takes what is left
    return rng.permutation(np.repeat(np.arange(used), sizes))


def clustered_embeddings(n: int, dim: int, seed: int, workload: str = "mean20") -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit rows and int64 labels, built in chunks to keep RSS near n*dim*4.
    ``mean20`` draws the same data as this benchmark did before it swept class sizes."""
    rng = np.random.default_rng(seed)
    classes = n if workload == "longtail" else max(2, n // int(workload.removeprefix("mean")))
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.06, 0.16, classes).astype(np.float32)
    labels = draw_labels(workload, n, classes, rng)
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
        scores[s : s + 2048] = np.einsum(
            "bd,bkd->bk", q[s : s + 2048].astype(np.float64), ref[ids[s : s + 2048]].astype(np.float64)
        )
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    ids = np.take_along_axis(ids, order, 1)
    return torch.from_numpy(np.take_along_axis(scores, order, 1)), torch.from_numpy(ids)


def run_worker(contender: str, workload: str, n: int, dim: int, seed: int, progress_log: Path | None = None) -> dict:
    """Build the data, time one metric computation (or the bare search), report values and memory."""
    import logging

    import torch

    if progress_log is not None:  # dml logs each searched batch at DEBUG level
        logging.basicConfig(filename=progress_log, level=logging.DEBUG, format="%(asctime)s %(message)s")
        logging.getLogger("dml.eval").setLevel(logging.DEBUG)

    data, labels = clustered_embeddings(n, dim, seed, workload)
    rss_data = peak_rss_bytes()
    values: dict = {}
    extra: dict = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    if contender == "dml":
        from dml.eval import retrieval_metrics

        result = retrieval_metrics(data, labels)
        values = {m: result[m] for m in METRICS}
        extra = {"num_queries": result["num_queries"], "num_excluded_queries": result["num_excluded_queries"]}
    elif contender == "floor":  # what PML's search does, without its metrics
        import faiss

        index = faiss.IndexFlatIP(dim)
        index.add(data)
        depth = int(np.bincount(labels).max())
        index.search(data, depth)
        extra = {"depth": depth}
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        knn = {"knn_func": exact_order_knn} if contender == "pml_exact_order" else {}
        calculator = AccuracyCalculator(
            include=tuple(PML_NAMES.values()), k="max_bin_count", device=torch.device("cpu"), **knn
        )
        result = calculator.get_accuracy(torch.from_numpy(data), torch.from_numpy(labels))
        values = {m: result[PML_NAMES[m]] for m in METRICS}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "contender": contender,
        "workload": workload,
        "n": n,
        "dim": dim,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "values": values,
        "peak_rss_gib": peak_rss_bytes() / GIB,
        "rss_after_data_gib": rss_data / GIB,
        **extra,
    }


def measure(contender: str, workload: str, n: int, args) -> dict:
    """Run one contender in a fresh subprocess so its peak RSS is its own."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        contender,
        "--workloads",
        workload,
        "--sizes",
        str(n),
        "--dim",
        str(args.dim),
        "--seed",
        str(args.seed),
    ]
    if args.progress_log is not None:
        command += ["--progress-log", str(args.progress_log)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0 and contender != "dml":
        # e.g. PML's label-match count allocates classes x N bools: 34.6 GB at N=100k, mean 2
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"contender": contender, "failed": f"exited with {done.returncode}: {reason[-300:]}"}
    if done.returncode != 0:  # negative: killed by that signal (e.g. -9 from an OOM killer)
        raise RuntimeError(f"{contender} {workload} N={n} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["load_average"] = os.getloadavg()[0]
    return record


def best_of(records: list[dict]) -> dict:
    best = dict(min(records, key=lambda r: r["seconds"]))
    best["all_seconds"] = [round(r["seconds"], 2) for r in records]
    best["all_cpu_seconds"] = [round(r["cpu_seconds"], 2) for r in records]
    best["peak_rss_gib"] = max(r["peak_rss_gib"] for r in records)
    return best


def class_shape(workload: str, n: int, dim: int, seed: int) -> dict:
    sizes = np.bincount(clustered_embeddings(n, dim, seed, workload)[1])
    sizes = sizes[sizes > 0]
    return {
        "classes": len(sizes),
        "mean_size": float(sizes.mean()),
        "max_size": int(sizes.max()),
        "singleton_classes": int((sizes == 1).sum()),
    }


def benchmark_row(workload: str, n: int, args) -> dict:
    gflops = gemm_gflops(args.dim)  # re-measured per row: the machine's load drifts
    run_pml = n <= args.skip_pml_above
    contenders = ["dml", "pml", "floor"] if run_pml else ["dml"]
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for repeat in range(args.repeats):  # rotate the order to share the machine's moods
        for contender in contenders[repeat % len(contenders) :] + contenders[: repeat % len(contenders)]:
            runs[contender].append(measure(contender, workload, n, args))
    row = {
        "workload": workload,
        "n": n,
        "dim": args.dim,
        **class_shape(workload, n, args.dim, args.seed),
        "gemm_gflops": gflops,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gemm_floor_seconds": n * n * args.dim * 2 / (gflops * 1e9),
        "symmetric_floor_seconds": n * n * args.dim / (gflops * 1e9),
    }
    failed = {c: x["failed"] for c, records in runs.items() for x in records if "failed" in x}
    row.update({c: best_of(runs[c]) for c in contenders if c not in failed})
    row.update({c: f"failed: {reason}" for c, reason in failed.items()})
    if run_pml and failed:
        print(f"  {workload} N={n}: {', '.join(f'{c} {r}' for c, r in failed.items())}", flush=True)
    elif run_pml:
        row["speedup"] = row["pml"]["seconds"] / row["dml"]["seconds"]
        row["speedup_cpu"] = row["pml"]["cpu_seconds"] / row["dml"]["cpu_seconds"]
        row["max_abs_diff"] = max(abs(row["dml"]["values"][m] - row["pml"]["values"][m]) for m in METRICS)
        row["values_equal"] = row["max_abs_diff"] <= 1e-6
        if args.exact_order_check and row["max_abs_diff"] > 1e-12:
            row["pml_exact_order"] = measure("pml_exact_order", workload, n, args)
            row["max_abs_diff_exact_order"] = max(
                abs(row["dml"]["values"][m] - row["pml_exact_order"]["values"][m]) for m in METRICS
            )
    if not run_pml:
        row["pml"] = f"skipped (--skip-pml-above {args.skip_pml_above})"
    return row


def time_cell(record) -> str:
    if not isinstance(record, dict):
        return f"{'-':>13}"
    cpu = f"({record['cpu_seconds']:5.1f})" if "cpu_seconds" in record else f"{'':7}"
    return f"{record['seconds']:6.1f} {cpu}"


def print_table(rows: list[dict]) -> None:
    print(
        "time: best wall s of the repeats (cpu s of that run); floor: bare faiss IndexFlatIP search at "
        "depth max class size; x floor = time / floor time"
    )
    print(
        f"{'workload':>9} {'N':>8} {'classes':>7} {'max':>5} {'dml s':>13} {'pml s':>13} {'floor s':>13} "
        f"{'dml/pml':>7} {'cpu':>5} {'dml xfl':>7} {'pml xfl':>7} {'|diff|':>8} {'MAP@R':>7} {'dml GiB':>7}"
    )
    for row in rows:
        line = (
            f"{row.get('workload', 'mean20'):>9} {row['n']:>8} {row.get('classes', 0):>7} "
            f"{row.get('max_size', 0):>5} {time_cell(row.get('dml'))} {time_cell(row.get('pml'))} "
            f"{time_cell(row.get('floor'))}"
        )
        if "speedup" in row and isinstance(row.get("floor"), dict):
            floor = row["floor"]["seconds"]
            line += (
                f" {row['speedup']:>6.2f}x {row['speedup_cpu']:>4.2f}x {row['dml']['seconds'] / floor:>6.2f}x "
                f"{row['pml']['seconds'] / floor:>6.2f}x {row['max_abs_diff']:>8.1e}"
            )
        else:
            line += f" {'':>7} {'':>5} {'':>7} {'':>7} {'':>8}"
        line += f" {row['dml']['values']['map_at_r']:>7.4f} {row['dml']['peak_rss_gib']:>7.2f}"
        print(line)
        print(
            f"{'':>9} GEMM {row.get('gemm_gflops', 0):.0f} GFLOP/s: N*N*D product "
            f"{row.get('gemm_floor_seconds', row.get('floor_seconds', 0)):.1f} s, symmetric half "
            f"{row.get('symmetric_floor_seconds', 0):.1f} s; all wall s dml {row['dml'].get('all_seconds')}"
            + (f" pml {row['pml'].get('all_seconds')}" if isinstance(row.get("pml"), dict) else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-pml-above", type=int, default=200_000)
    parser.add_argument("--exact-order-check", action="store_true")
    parser.add_argument("--worker", choices=["dml", "pml", "pml_exact_order", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--progress-log", type=Path, help="file for the workers' progress lines (dml: per batch)")
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(
                run_worker(args.worker, args.workloads[0], args.sizes[0], args.dim, args.seed, args.progress_log)
            )
        )
        return
    rows = []
    for n in args.sizes:
        for workload in args.workloads:  # each row is printed and saved as soon as it is done
            rows.append(benchmark_row(workload, n, args))
            print(f"done {workload} N={n} ({time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f})", flush=True)
            print_table(rows[-1:])
            write_report(args, rows)
    print("\nall rows of this run:")
    print_table(rows)
    print(f"wrote {args.out}")


def write_report(args, rows: list[dict]) -> None:
    """Write the JSON report; rows (workload, N) not run this time are kept from the old file."""

    def key(row: dict) -> tuple[str, int]:
        return row.get("workload", "mean20"), row["n"]

    kept = []
    if args.out.exists():
        kept = [r for r in json.loads(args.out.read_text()).get("results", []) if key(r) not in {key(x) for x in rows}]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "cpus": os.cpu_count(),
        "load_average_now": os.getloadavg(),
        "seed": args.seed,
        "repeats": args.repeats,
        "skip_pml_above": args.skip_pml_above,
        "command": "python benchmarks/eval_knn.py " + " ".join(sys.argv[1:]),
        "results": sorted(kept + rows, key=lambda r: (r["n"], WORKLOADS.index(key(r)[0]))),
    }
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
