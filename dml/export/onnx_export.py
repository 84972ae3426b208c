"""ONNX export (TorchScript-based exporter) and running exported graphs with ONNX Runtime.

The graph has one input ``images`` and one output ``embeddings``, both with a dynamic batch
axis named ``batch``; height, width and channels are fixed to the example's. The
``dynamo=True`` exporter needs onnxscript, which this project does not install, so the
tracing exporter (``dynamo=False``) is used: opsets 17 to 20. Models must stay under the
2 GB protobuf limit (no external-data files are written).
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from dml.export.pixel_input import chunks

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
MIN_OPSET = 17
MAX_OPSET = 20  # highest opset of torch's TorchScript-based exporter
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def check_opset(opset: int) -> int:
    """Validate the ONNX opset: an int in [MIN_OPSET, MAX_OPSET]. Raises ValueError otherwise."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    return opset


def export_onnx(model: nn.Module, path: str | os.PathLike, example: torch.Tensor, opset: int = MIN_OPSET) -> None:
    """Trace ``model`` (eval mode, CPU) on ``example`` and write an ONNX file to ``path``.

    The file is checked with ``onnx.checker`` after writing. ``example`` fixes the non-batch
    input dimensions and dtype; its batch size does not matter (the axis is dynamic).
    """
    check_opset(opset)
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter warns about features of the dynamo exporter we deliberately do not use.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            os.fspath(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(os.fspath(path))


def onnx_providers() -> list[str]:
    """Execution providers to check an export on: CPU always, CUDA too when ORT offers it.

    The CUDA path is untested here (no GPU on the development machines).
    """
    available = ort.get_available_providers()
    if CUDA_PROVIDER in available:
        return [CPU_PROVIDER, CUDA_PROVIDER]
    log.info("onnxruntime has no %s here; ONNX parity is checked on %s only", CUDA_PROVIDER, CPU_PROVIDER)
    return [CPU_PROVIDER]


def open_onnx_session(
    path: str | os.PathLike, provider: str = CPU_PROVIDER, intra_op_threads: int | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime session on one execution provider (CPU kept as fallback for CUDA)."""
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    providers = [provider] if provider == CPU_PROVIDER else [provider, CPU_PROVIDER]
    return ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)


def onnx_embeddings(session: ort.InferenceSession, inputs: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Run ``session`` over ``inputs`` (N, ...) in batches -> embeddings (N, D) float32."""
    input_name = session.get_inputs()[0].name
    outputs = [session.run(None, {input_name: chunk.numpy()})[0] for chunk in chunks(inputs, batch_size)]
    return np.concatenate(outputs).astype(np.float32, copy=False)
