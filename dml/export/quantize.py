"""Int8 post-training static quantization of an ONNX export with ONNX Runtime, and its cost.

``quantize_onnx_int8`` runs ORT's ``quant_pre_process`` (shape inference and graph
optimisation, as ORT recommends before static quantization), then ``quantize_static`` in QDQ
format with MinMax calibration on the caller's images. Weights are quantized per output
channel; if ORT rejects per-channel quantization for the graph, per-tensor is used instead
(one logged line, recorded in the returned facts). By default only Conv, Gemm and MatMul are
quantized: they hold nearly all the compute, while pooling (GeM's fractional power), the
embedding BatchNorm and the L2 normalisation stay in float, where int8 rounding would cost
accuracy for little speed.

``retrieval_drop`` measures what quantization costs where it matters: MAP@R (Musgrave et al.,
"A Metric Learning Reality Check", 2020) of fp32 vs int8 embeddings of one labelled eval set,
leave-one-out.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from dml.eval.metrics import retrieval_metrics
from dml.export.onnx_export import INPUT_NAME
from dml.export.pixel_input import chunks

log = logging.getLogger(__name__)

DEFAULT_QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


class ImageBatchReader(CalibrationDataReader):
    """Feeds calibration batches ``{"images": array (B, ...)}`` to ORT's calibrator, once each."""

    def __init__(self, inputs: torch.Tensor, batch_size: int = 32, input_name: str = INPUT_NAME) -> None:
        if inputs.shape[0] < 1:
            raise ValueError("calibration needs at least one image")
        self.inputs = inputs
        self.batch_size = batch_size
        self.input_name = input_name
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next ``{input_name: (B, C, H, W) float32}`` batch, or None when all were given."""
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch.numpy()}

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._batches = chunks(self.inputs, self.batch_size)


def quantize_onnx_int8(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    calibration_inputs: torch.Tensor,
    *,
    batch_size: int = 32,
    per_channel: bool = True,
    op_types: Sequence[str] | None = DEFAULT_QUANTIZED_OPS,
) -> dict[str, Any]:
    """Write a QDQ int8 model of ``fp32_path`` to ``int8_path``, calibrated on ``calibration_inputs``.

    Args:
        calibration_inputs: (N, ...) tensor in the graph's input format; N images, read in
            batches of ``batch_size`` (peak memory: ORT keeps every activation of every
            calibration batch to find its range, so keep N modest, a few hundred).
        per_channel: try per-channel weight scales first.
        op_types: ONNX op types to quantize; None means every type ORT supports.

    Returns facts for the model card: format, calibration method and image count,
    activation / weight types, per_channel actually used, quantized op types.
    """
    ops = list(op_types) if op_types is not None else None
    with tempfile.TemporaryDirectory(prefix="dml-quant-") as scratch:
        prepared = _prepare_for_quantization(Path(fp32_path), Path(scratch) / "prepared.onnx")
        try:
            _quantize(prepared, int8_path, ImageBatchReader(calibration_inputs, batch_size), per_channel, ops)
        except Exception as error:  # ORT raises plain exceptions for graphs it cannot quantize per channel
            if not per_channel:
                raise
            log.info("per-channel int8 quantization failed (%s); using per-tensor scales", error)
            per_channel = False
            _quantize(prepared, int8_path, ImageBatchReader(calibration_inputs, batch_size), per_channel, ops)
    return {
        "format": "QDQ",
        "calibration_method": "MinMax",
        "num_calibration_images": int(calibration_inputs.shape[0]),
        "activation_type": "int8",
        "weight_type": "int8",
        "per_channel": per_channel,
        "quantized_op_types": ops if ops is not None else "all supported",
    }


def _prepare_for_quantization(source: Path, target: Path) -> Path:
    """ORT's recommended pre-processing; its symbolic shape inference fails on some graphs
    (e.g. the CGD neck's Expand), so retry without it, and at worst quantize ``source`` as is."""
    for skip_symbolic in (False, True):
        try:
            quant_pre_process(os.fspath(source), os.fspath(target), skip_symbolic_shape=skip_symbolic)
            return target
        except Exception as error:  # noqa: BLE001 - ORT's pre-processing raises whatever its passes hit
            failure = error
    log.info("onnxruntime quantization pre-processing failed (%s); quantizing the graph as exported", failure)
    return source


def _quantize(
    source: Path, target: str | os.PathLike, reader: ImageBatchReader, per_channel: bool, op_types: list[str] | None
) -> None:
    quantize_static(
        os.fspath(source),
        os.fspath(target),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=op_types,
        per_channel=per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        # Symmetric int8 weights; activations keep an asymmetric range (ReLU outputs are >= 0).
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )


def retrieval_drop(fp32_embeddings: np.ndarray, int8_embeddings: np.ndarray, labels: Any) -> dict[str, Any]:
    """MAP@R and P@1 of fp32 and int8 embeddings of one eval set (leave-one-out) and the drop.

    ``map_at_r_drop = fp32 MAP@R - int8 MAP@R``: positive when quantization costs accuracy.
    """
    fp32 = retrieval_metrics(fp32_embeddings, labels)
    int8 = retrieval_metrics(int8_embeddings, labels)
    return {
        "num_queries": int(fp32["num_queries"]),
        "fp32": {"map_at_r": float(fp32["map_at_r"]), "precision_at_1": float(fp32["precision_at_1"])},
        "int8": {"map_at_r": float(int8["map_at_r"]), "precision_at_1": float(int8["precision_at_1"])},
        "map_at_r_drop": float(fp32["map_at_r"] - int8["map_at_r"]),
        "precision_at_1_drop": float(fp32["precision_at_1"] - int8["precision_at_1"]),
    }
