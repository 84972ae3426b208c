"""ONNX Runtime CPU latency of an exported model (used by the distillation benchmark)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from dml.export.onnx_export import CPU_PROVIDER, open_onnx_session


def onnx_cpu_latency(
    path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 64),
    runs: int = 20,
    warmup: int = 3,
    intra_op_threads: int | None = None,
    seed: int = 0,
) -> dict[int, float]:
    """Median wall time in milliseconds of one ``session.run`` per batch size, on CPU.

    Inputs are random tensors of the graph's own input shape and dtype (float32 images or
    uint8 pixels) with the batch axis set to each batch size. Each batch size gets
    ``warmup`` untimed runs, then ``runs`` timed ones. ``intra_op_threads`` None leaves ORT's
    default (all cores); pin it for comparable numbers on a shared machine.

    Raises ValueError for runs < 1, warmup < 0, or an empty or non-positive batch size.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive ints, got {tuple(batch_sizes)}")
    session = open_onnx_session(path, CPU_PROVIDER, intra_op_threads)
    graph_input = session.get_inputs()[0]
    fixed = [int(dim) for dim in graph_input.shape[1:]]  # batch is the only dynamic axis
    rng = np.random.default_rng(seed)
    latency = {}
    for batch in batch_sizes:
        shape = (int(batch), *fixed)
        data: np.ndarray
        if graph_input.type == "tensor(uint8)":
            data = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            data = rng.standard_normal(shape, dtype=np.float32)
        feed = {graph_input.name: data}
        for _ in range(warmup):
            session.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        latency[int(batch)] = float(np.median(times) * 1000.0)
    return latency
