"""Benchmark: partial FC on 2 gloo ranks vs a single-process full-FC ArcFace head.

Claim checked: at 1M classes, partial FC with sample_rate 0.1 takes >= 5x less time per step
and <= 1/3 of the peak resident memory per process of a full FC head, 2M classes fit in
24 GiB, and 4M classes (``--classes 4000000 --rates 0.1``) in 20 GiB for both processes. A step
is forward + backward + the head's optimizer step (SGD, momentum 0.9, weight
decay 5e-4) on synthetic L2-normalised embeddings (D=512, 128 per rank = global batch 256);
no backbone. Every variant runs in fresh processes so ``ru_maxrss`` is its own peak.

- partial FC: `dml.losses.PartialFC` with ArcFace(s=64, m=0.5), 2 gloo ranks x 1 thread.
- full FC: pytorch-metric-learning's ``ArcFaceLoss`` (the same margin and scale) with
  ``torch.optim.SGD``, one process x 2 threads, the same global batch of 256.
- dense: `PartialFC` itself in one process (world 1, sample_rate 1) x 2 threads, a leaner
  full-FC baseline that isolates what sharding and sampling buy.

Workers raise their own ``oom_score_adj`` so that, on this shared machine, the kernel's OOM
killer would pick a benchmark process rather than someone else's; variants whose estimated
peak does not fit in the available memory are skipped and reported as such.

The matmul lower bound of a step is its GEMM FLOPs (3 products of N x D x k: logits, grad
w.r.t. embeddings, grad w.r.t. centres, 2 FLOPs per multiply-add) divided by this machine's
measured fp32 GEMM rate for the variant's thread count. The machine is shared, so numbers
move with the load of other jobs; the load average is recorded.

Usage: python benchmarks/partial_fc.py [--quick] [--classes 100000 1000000] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import contextlib

from dml.distributed import DistInfo, barrier
from local_group import spawn_local_group

DIM, PER_RANK, WORLD = 512, 128, 2
GLOBAL_BATCH = PER_RANK * WORLD
RESULTS = Path(__file__).parent / "results" / "partial_fc.json"
GIB = 1024**3


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_batch(step: int, rows: int, num_classes: int, offset: int = 0):
    gen = torch.Generator().manual_seed(10_000 + step)
    embeddings = torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=gen), dim=1)
    labels = torch.randint(0, num_classes, (GLOBAL_BATCH,), generator=gen)
    return embeddings[offset : offset + rows].clone().requires_grad_(True), labels[offset : offset + rows]


def volunteer_for_oom_killer() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def partial_fc_worker(info: DistInfo, num_classes: int, rate: float, warmup: int, steps: int) -> dict:
    from dml.losses.margins import ArcFace
    from dml.losses.partial_fc import PartialFC

    volunteer_for_oom_killer()
    started = time.perf_counter()
    head = PartialFC(DIM, num_classes, ArcFace(s=64.0, m=0.5), sample_rate=rate)
    optimizer = head.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    setup_s = time.perf_counter() - started
    times, scored = [], []
    for step in range(warmup + steps):
        rows = GLOBAL_BATCH // info.world_size  # 128 on each of 2 ranks, or 256 in one process
        x, y = synthetic_batch(step, rows, num_classes, offset=info.rank * rows)
        barrier()
        tic = time.perf_counter()
        optimizer.zero_grad()
        head(x, y).backward()
        optimizer.step()
        barrier()
        if step >= warmup:
            times.append(time.perf_counter() - tic)
            scored.append(head.shard_size if head.sampled_index is None else head.sampled_index.numel())
    return {"times": times, "scored_rows": statistics.mean(scored), "setup_s": setup_s, "peak_rss": peak_rss_bytes()}


def full_fc_worker(info: DistInfo, num_classes: int, warmup: int, steps: int) -> dict:
    from pytorch_metric_learning.losses import ArcFaceLoss

    volunteer_for_oom_killer()
    started = time.perf_counter()
    loss_fn = ArcFaceLoss(num_classes=num_classes, embedding_size=DIM, margin=math.degrees(0.5), scale=64)
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    setup_s = time.perf_counter() - started
    times = []
    for step in range(warmup + steps):
        x, y = synthetic_batch(step, GLOBAL_BATCH, num_classes)
        tic = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(x, y).backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - tic)
    return {"times": times, "scored_rows": num_classes, "setup_s": setup_s, "peak_rss": peak_rss_bytes()}


def gemm_flops_per_s(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 rate of one (size x size) @ (size x size) product."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - tic)
    torch.set_num_threads(previous)
    return 2 * size**3 / best


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def estimated_peak_bytes(variant: str, num_classes: int, rate: float) -> float:
    """Rough peak over all processes of a variant, to skip what cannot fit on this machine.

    Fitted to 100k/500k-class runs: every process ~0.7 GiB of torch. PML full FC: centres,
    their normalised copy, gradient and momentum (4 C x D floats) plus ~7 (N x C) temporaries.
    PartialFC: centres, gradient (rate 1 only) and momentum plus ~7 (N x k) temporaries and,
    when sampling, a few (k x D) copies of the sampled rows per process.
    """
    base, c_d = 0.7 * GIB, num_classes * DIM * 4
    if variant == "full":
        return base + 4 * c_d + 7 * GLOBAL_BATCH * num_classes * 4
    if variant == "dense":
        return base + 3 * c_d + 5 * GLOBAL_BATCH * num_classes * 4
    scored = rate * num_classes / WORLD
    copies = 0 if rate == 1.0 else 3 * scored * DIM * 4
    per_rank = (3 if rate == 1.0 else 2) * c_d / WORLD + 7 * GLOBAL_BATCH * scored * 4 + copies
    return WORLD * (base + per_rank)


def run_variant(variant: str, num_classes: int, rate: float, args, rates: dict) -> dict:
    row = {"variant": variant, "classes": num_classes, "sample_rate": rate}
    need, have = estimated_peak_bytes(variant, num_classes, rate), mem_available_bytes()
    if need > have - 1.5 * GIB and not args.force:
        return {**row, "skipped": f"needs ~{need / GIB:.1f} GiB, {have / GIB:.1f} GiB available"}
    if variant in ("full", "dense"):
        worker, worker_args = (
            (full_fc_worker, (num_classes, args.warmup, args.steps))
            if variant == "full"
            else (partial_fc_worker, (num_classes, 1.0, args.warmup, args.steps))
        )
        results = spawn_local_group(worker, 1, args=worker_args, threads_per_worker=WORLD)
        flops, gemm = 6 * GLOBAL_BATCH * DIM * num_classes, rates[WORLD]
    else:
        results = spawn_local_group(partial_fc_worker, WORLD, args=(num_classes, rate, args.warmup, args.steps))
        scored = max(r["scored_rows"] for r in results)
        flops, gemm = 6 * GLOBAL_BATCH * DIM * scored, rates[1]  # per rank, ranks run side by side
    step_times = [max(ts) for ts in zip(*(r["times"] for r in results), strict=True)]
    median_s = statistics.median(step_times)
    bound_s = flops / gemm
    return {
        **row,
        "ms_per_step": 1000 * median_s,
        "step_times_ms": [1000 * t for t in step_times],
        "processes": len(results),
        "peak_rss_gib_per_process": max(r["peak_rss"] for r in results) / GIB,
        "peak_rss_gib_total": sum(r["peak_rss"] for r in results) / GIB,
        "setup_s": max(r["setup_s"] for r in results),
        "estimated_peak_gib_total": need / GIB,
        "gemm_gflop_per_rank": flops / 1e9,
        "matmul_bound_ms": 1000 * bound_s,
        "actual_over_bound": median_s / bound_s,
    }


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'variant':<8}{'classes':>10}{'rate':>6}{'ms/step':>10}{'peak GiB/proc':>15}"
        f"{'total GiB':>11}{'bound ms':>10}{'x bound':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "skipped" in r:
            print(f"{r['variant']:<8}{r['classes']:>10}{r['sample_rate']:>6}  skipped: {r['skipped']}")
            continue
        print(
            f"{r['variant']:<8}{r['classes']:>10}{r['sample_rate']:>6}{r['ms_per_step']:>10.0f}"
            f"{r['peak_rss_gib_per_process']:>15.2f}{r['peak_rss_gib_total']:>11.2f}"
            f"{r['matmul_bound_ms']:>10.0f}{r['actual_over_bound']:>9.1f}"
        )


def find_row(rows: list[dict], variant: str, classes: int, rate: float) -> dict | None:
    return next(
        (
            r
            for r in rows
            if (r["variant"], r["classes"], r["sample_rate"]) == (variant, classes, rate) and "skipped" not in r
        ),
        None,
    )


def extrapolated_baseline(rows: list[dict], variant: str, classes: int) -> dict | None:
    """A baseline that did not fit, extrapolated linearly in C from its two largest measured runs.

    Time (GEMMs and elementwise passes over N x C and C x D) and memory (C x D and N x C
    tensors above a fixed per-process base) both grow linearly with C.
    """
    measured = sorted((r for r in rows if r["variant"] == variant and "skipped" not in r), key=lambda r: r["classes"])
    if len(measured) < 2 or measured[-1]["classes"] >= classes:
        return None
    a, b = measured[-2], measured[-1]

    def line(key):
        slope = (b[key] - a[key]) / (b["classes"] - a["classes"])
        return b[key] + slope * (classes - b["classes"])

    return {
        "variant": variant,
        "classes": classes,
        "sample_rate": 1.0,
        "extrapolated_from": [a["classes"], b["classes"]],
        "ms_per_step": line("ms_per_step"),
        "peak_rss_gib_per_process": line("peak_rss_gib_per_process"),
    }


def claims(rows: list[dict]) -> dict:
    """The targets at 1M (speed-up, memory ratio) and whether 2M ran within 24 GiB."""
    out = {}
    sparse = find_row(rows, "partial", 1_000_000, 0.1)
    for name in ("full", "dense"):
        baseline = find_row(rows, name, 1_000_000, 1.0) or extrapolated_baseline(rows, name, 1_000_000)
        if baseline and sparse:
            speedup = baseline["ms_per_step"] / sparse["ms_per_step"]
            memory = sparse["peak_rss_gib_per_process"] / baseline["peak_rss_gib_per_process"]
            out[f"vs_{name}_1m"] = {
                "speedup_rate_0.1": speedup,
                "memory_ratio_rate_0.1": memory,
                "meets_targets": speedup >= 5 and memory <= 1 / 3,
                "baseline_extrapolated_from": baseline.get("extrapolated_from"),
            }
    big = find_row(rows, "partial", 2_000_000, 0.1)
    if big:
        out["total_gib_2m_rate_0.1"] = big["peak_rss_gib_total"]
        out["2m_within_24_gib"] = big["peak_rss_gib_total"] <= 24
    huge = find_row(rows, "partial", 4_000_000, 0.1)
    if huge:
        out["total_gib_4m_rate_0.1"] = huge["peak_rss_gib_total"]
        out["4m_within_20_gib"] = huge["peak_rss_gib_total"] <= 20
    return out


def run_baselines(num_classes: int, args, rates: dict, rows: list[dict]) -> None:
    """Both single-process baselines at ``num_classes``; one that does not fit is also run at
    half the classes (if not measured yet) so `extrapolated_baseline` has two points."""
    for baseline in ("dense", "full"):
        rows.append(run_variant(baseline, num_classes, 1.0, args, rates))
        print(f"  {baseline} C={num_classes}: {rows[-1].get('ms_per_step', rows[-1].get('skipped'))}", flush=True)
        half = num_classes // 2
        if "skipped" in rows[-1] and not any(r["variant"] == baseline and r["classes"] == half for r in rows):
            rows.append({**run_variant(baseline, half, 1.0, args, rates), "stand_in_for": num_classes})
            print(f"  {baseline} C={half}: {rows[-1].get('ms_per_step', rows[-1].get('skipped'))}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k classes only")
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--full-fc-max-classes",
        type=int,
        default=1_000_000,
        help="largest C for the single-process baselines (PML needs ~4 C x D floats plus ~7 N x C)",
    )
    parser.add_argument(
        "--no-thp",
        action="store_true",
        help="do not set THP_MEM_ALLOC_ENABLE=1 (transparent huge pages for torch CPU tensors)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="run rows the memory estimate would skip (it is conservative: 2M classes, rate 0.1 "
        "estimated 11.5 GiB, measured 10.7); the kernel may kill a row that does not fit",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.no_thp:
        # Read by every worker's torch at start-up. Without it each fresh multi-MB temporary
        # costs a 4 KiB page fault per page, which on this VM is ~2 ms per MiB: a large share
        # of a step for both heads. Applied to every variant alike.
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    classes = [100_000] if args.quick else args.classes
    rates = {threads: gemm_flops_per_s(threads) for threads in (1, WORLD)}
    print(
        f"fp32 GEMM: {rates[1] / 1e9:.1f} GFLOP/s on 1 thread, {rates[WORLD] / 1e9:.1f} on {WORLD}; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for num_classes in classes:
        for rate in sorted(args.rates):
            rows.append(run_variant("partial", num_classes, rate, args, rates))
            print(
                f"  partial C={num_classes} rate={rate}: {rows[-1].get('ms_per_step', rows[-1].get('skipped'))}",
                flush=True,
            )
        if num_classes <= args.full_fc_max_classes:
            run_baselines(num_classes, args, rates, rows)
    print_table(rows)
    summary = claims(rows)
    for name in ("full", "dense"):
        guess = None if find_row(rows, name, 1_000_000, 1.0) else extrapolated_baseline(rows, name, 1_000_000)
        if guess and 1_000_000 in classes:
            print(
                f"{name} at 1M did not fit next to the other jobs; linear from C={guess['extrapolated_from']}: "
                f"~{guess['ms_per_step']:.0f} ms/step, ~{guess['peak_rss_gib_per_process']:.1f} GiB"
            )
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "gemm_gflops": {str(k): v / 1e9 for k, v in rates.items()},
        "load_average": os.getloadavg(),
        "thp_mem_alloc": not args.no_thp,
        "world": WORLD,
        "per_rank_batch": PER_RANK,
        "dim": DIM,
        "warmup": args.warmup,
        "steps": args.steps,
        "rows": rows,
        "claims": summary,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
