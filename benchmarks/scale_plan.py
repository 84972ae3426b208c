"""The partial-FC head past this machine, on paper: per-GPU memory and step time at 10M and
100M identities on 8, 64 and 512 GPUs (H100 SXM and H200), from a cost model whose memory
side is checked against the peaks measured here (benchmarks/results/partial_fc.json).

Every figure printed is computed; the measured inputs are named. Model, per GPU and step,
with G GPUs, C classes, D = 512, b = 128 images per GPU, rate r = 0.1 (the insightface
recipe), N = b G global batch, R = C / G centre rows, k = r R sampled rows:

- memory = R D (4 + 4) (fp32 centres + SGD momentum) + N k L + k D S, with L bytes per
  logit element and S bytes per sampled-row element of temporaries (counted in
  `dml.losses.partial_fc` / `sparse_optim`: L = 20, S = 16), plus a fixed reserve for the
  backbone, its activations and NCCL buffers (30 GB assumed);
- compute = 6 N D k FLOPs (three GEMMs) at fp32 (the head's dtype; TF32 is off in torch by
  default) and 70 % of peak; elementwise work = 12 passes over N k fp32 values + 10 over
  k D, at 80 % of HBM bandwidth;
- communication = the embedding all-gather forward and its reduce-scatter backward, each
  moving (G - 1) / G x N D x 4 bytes per GPU at NCCL bus bandwidth (NVLink within 8 GPUs,
  400 Gb/s InfiniBand per GPU beyond), plus 3 small all-reduces of N floats.

N k = r b C does not depend on G: the logits block per GPU grows with C only, so past some
C more GPUs no longer help and the sample rate (or the per-GPU batch) must go down.

    python benchmarks/scale_plan.py       # prints the table, writes benchmarks/results/scale_plan.json
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
D, PER_GPU, RATE = 512, 128, 0.1
LOGIT_BYTES, ROW_BYTES, STATE_BYTES = 20, 16, 8
LOGIT_PASSES, ROW_PASSES = 12, 10
RESERVE_GB = 30.0
# Published figures (NVIDIA H100/H200 SXM datasheets): memory GB, HBM TB/s, dense FP32 TFLOPS.
GPUS = {
    "H100 SXM": {"memory_gb": 80, "hbm_tb_s": 3.35, "fp32_tflops": 67},
    "H200 SXM": {"memory_gb": 141, "hbm_tb_s": 4.8, "fp32_tflops": 67},
}
# NCCL bus bandwidth assumed: ~360 GB/s all-gather on NVLink4 within a DGX/HGX node of 8;
# one 400 Gb/s NDR port per GPU across nodes, ~45 GB/s achieved. Latency per collective.
NVLINK_GB_S, IB_GB_S, LATENCY_S = 360.0, 45.0, {8: 20e-6, 64: 60e-6, 512: 120e-6}


def per_gpu(classes: int, gpus: int, gpu: dict) -> dict:
    rows = classes / gpus
    k = RATE * rows
    n = PER_GPU * gpus
    state = rows * D * STATE_BYTES / 1e9
    temps = (n * k * LOGIT_BYTES + k * D * ROW_BYTES) / 1e9
    flops = 6 * n * D * k
    gemm_s = flops / (0.7 * gpu["fp32_tflops"] * 1e12)
    hbm_s = (n * k * 4 * LOGIT_PASSES + k * D * 4 * ROW_PASSES) / (0.8 * gpu["hbm_tb_s"] * 1e12)
    bandwidth = NVLINK_GB_S if gpus <= 8 else IB_GB_S
    comm_s = 2 * (gpus - 1) / gpus * n * D * 4 / (bandwidth * 1e9) + 5 * LATENCY_S[gpus]
    total = state + temps
    return {
        "classes": classes,
        "gpus": gpus,
        "rows_per_gpu": rows,
        "sampled_rows": k,
        "global_batch": n,
        "state_gb": state,
        "temporaries_gb": temps,
        "head_gb": total,
        "fits": total <= gpu["memory_gb"] - RESERVE_GB,
        "gemm_ms": 1e3 * gemm_s,
        "elementwise_ms": 1e3 * hbm_s,
        "comm_ms": 1e3 * comm_s,
        "step_ms": 1e3 * (gemm_s + hbm_s + comm_s),
    }


def check_against_measured() -> list[dict]:
    """The memory model on this machine's measured runs (2 ranks, 128 per rank, rate 0.1):
    model = 0.9 GiB process base + the terms above, against each rank's measured peak RSS."""
    path = RESULTS / "partial_fc.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())["rows"]
    out = []
    for row in rows:
        if row.get("variant") != "partial" or row.get("sample_rate") != RATE or "skipped" in row:
            continue
        shard, n = row["classes"] / 2, 256
        k = RATE * shard
        model = 0.9 * 2**30 + shard * D * STATE_BYTES + n * k * LOGIT_BYTES + k * D * ROW_BYTES
        out.append(
            {
                "classes": row["classes"],
                "measured_gib": row["peak_rss_gib_per_process"],
                "model_gib": model / 2**30,
                "model_over_measured": model / 2**30 / row["peak_rss_gib_per_process"],
                "measured_ms": row["ms_per_step"],
                "measured_over_matmul_floor": row["actual_over_bound"],
            }
        )
    return out


def main() -> None:
    table = [
        {"gpu": name, **per_gpu(c, g, spec)}
        for name, spec in GPUS.items()
        for c in (10_000_000, 100_000_000)
        for g in (8, 64, 512)
    ]
    checks = check_against_measured()
    print("memory model vs measured peak RSS per rank on this machine (2 gloo ranks, rate 0.1):")
    for c in checks:
        print(
            f"  {c['classes']:>9,} classes: measured {c['measured_gib']:.2f} GiB, model {c['model_gib']:.2f} GiB "
            f"(x{c['model_over_measured']:.2f}); step {c['measured_ms']:.0f} ms = "
            f"{c['measured_over_matmul_floor']:.1f}x its matmul floor"
        )
    print(
        "\n| GPU | identities | GPUs | rows/GPU | head GB/GPU (state + temporaries) "
        f"| fits (<= mem - {RESERVE_GB:.0f} GB) "
        "| GEMM ms | elementwise ms | NCCL ms | head step ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(
            f"| {r['gpu']} | {r['classes'] / 1e6:.0f}M | {r['gpus']} | {r['rows_per_gpu'] / 1e6:.3g}M | "
            f"{r['head_gb']:.1f} ({r['state_gb']:.1f} + {r['temporaries_gb']:.1f}) | {'yes' if r['fits'] else 'no'} | "
            f"{r['gemm_ms']:.1f} | {r['elementwise_ms']:.1f} | {r['comm_ms']:.2f} | {r['step_ms']:.1f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "scale_plan.json"
    out.write_text(
        json.dumps(
            {
                "assumptions": {
                    "dim": D,
                    "per_gpu_batch": PER_GPU,
                    "sample_rate": RATE,
                    "logit_bytes": LOGIT_BYTES,
                    "row_bytes": ROW_BYTES,
                    "reserve_gb": RESERVE_GB,
                    "gpus": GPUS,
                    "nvlink_gb_s": NVLINK_GB_S,
                    "ib_gb_s": IB_GB_S,
                },
                "checked_against_measured": checks,
                "table": table,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
