"""``export_model``: ONNX / TorchScript files + optional int8 + a model card, parity-checked.

Flow: copy the model to CPU in eval mode (optionally wrapped in ``PixelInputModel``), compute
reference embeddings of the caller's parity images eagerly, then per format export under a
temporary name, load the file back with its own runtime (ONNX Runtime / ``torch.jit.load``)
and compare embeddings (``dml.export.parity``). With ``int8`` the ONNX file is quantized
(``dml.export.quantize``), compared with the fp32 ONNX file, and scored by MAP@R on the
caller's eval set. Only when every check passes are the files renamed to their final names,
the model card last (``dml.export.staging``); any failure raises and leaves no final file.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from dml.export.model_card import build_model_card, file_entry, io_sections, write_model_card
from dml.export.onnx_export import (
    CPU_PROVIDER,
    check_opset,
    export_onnx,
    onnx_embeddings,
    onnx_providers,
    open_onnx_session,
)
from dml.export.parity import DEFAULT_MIN_COSINE, ParityReport, check_min_cosine, compare_embeddings, require_parity
from dml.export.pixel_input import PixelInputModel, as_image_batch, normalized_to_pixels
from dml.export.quantize import DEFAULT_QUANTIZED_OPS, quantize_onnx_int8, retrieval_drop
from dml.export.staging import StagedFiles
from dml.export.torchscript_export import export_torchscript, load_torchscript, torch_embeddings
from dml.models import EmbeddingModel, Preprocessing, model_summary

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt", "onnx_int8": "model.int8.onnx"}
CARD_NAME = "model_card.json"
TRACE_BATCH = 2  # the first images of the parity batch are the tracing example

ImageInput = torch.Tensor | Iterable[torch.Tensor]


@dataclass
class ExportResult:
    """What ``export_model`` wrote. ``files`` maps a format ("onnx", "torchscript",
    "onnx_int8") to its final path; ``parity`` a format key ("onnx", "onnx_cuda",
    "torchscript") to its ``ParityReport.to_dict()``; ``int8`` is the card's int8 section."""

    out_dir: Path
    files: dict[str, Path]
    card_path: Path
    parity: dict[str, dict[str, Any]]
    int8: dict[str, Any] | None
    card: dict[str, Any]


@dataclass
class _ExportJob:
    """The checked request, with the model and every image set already in the graph's input format."""

    module: nn.Module
    summary: dict[str, Any]
    preprocessing: Preprocessing
    in_graph: bool
    parity_inputs: torch.Tensor
    reference: np.ndarray
    opset: int
    min_cosine: float
    batch_size: int


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    parity_images: ImageInput,
    formats: Sequence[str] = FORMATS,
    opset: int = 17,
    int8: bool = False,
    calibration_images: ImageInput | None = None,
    eval_images: ImageInput | None = None,
    eval_labels: Any = None,
    source: str | Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    min_cosine: float = DEFAULT_MIN_COSINE,
    *,
    preprocessing_in_graph: bool = False,
    preprocessing: Preprocessing | None = None,
    int8_min_cosine: float = 0.98,
    int8_op_types: Sequence[str] | None = DEFAULT_QUANTIZED_OPS,
    batch_size: int = 64,
) -> ExportResult:
    """Export an ``EmbeddingModel`` (or a DDP wrapper of one), check it, write a model card.

    Args:
        model: left untouched; a CPU eval-mode copy is exported.
        out_dir: receives ``model.onnx``, ``model.pt`` (TorchScript), ``model.int8.onnx`` and
            ``model_card.json`` for what was asked.
        parity_images: real images (N, C, H, W) normalised like the model's input (e.g.
            ``collect_images(EvalLoader(...))``), or an iterable of such batches. The first
            two are also the tracing example, so their batch must not steer Python control flow.
        formats: any of "onnx", "torchscript".
        opset: ONNX opset, 17 to 20.
        int8: also write a QDQ int8 ONNX model (needs "onnx", ``calibration_images`` and the
            labelled eval set ``eval_images`` / ``eval_labels`` for the MAP@R drop).
        source: the teacher / run the model came from, copied to the card (may be None).
        metrics: the model's evaluation metrics, copied to the card.
        min_cosine: required minimum per-image cosine of every export to PyTorch.
        preprocessing_in_graph: export ``PixelInputModel`` (uint8 NHWC pixels in) instead of
            the bare model (normalised float NCHW in).
        preprocessing: the input contract to record and bake in; default ``model.preprocessing``.
            Pass the data config's values if the model was trained with different ones.
        int8_min_cosine: required minimum cosine of int8 to fp32 ONNX embeddings.
        int8_op_types: ONNX op types to quantize (None: all ORT supports).
        batch_size: images per forward pass in every check.

    Raises:
        ValueError: a bad argument, named in the message.
        ExportParityError: an export (or the int8 model) missed its cosine threshold; no
            file is left under a final name.

    Peak memory: two copies of the model, the parity / eval / calibration inputs, a few
    (N, D) embedding arrays, plus ORT's calibration activations (see ``quantize_onnx_int8``).
    """
    formats = _check_formats(formats, int8, calibration_images, eval_images, eval_labels)
    int8_min_cosine = check_min_cosine(int8_min_cosine, "int8_min_cosine")
    job = _prepare_job(model, parity_images, opset, min_cosine, preprocessing_in_graph, preprocessing, batch_size)
    with StagedFiles(out_dir) as staged:
        files: list[dict[str, Any]] = []
        parity: dict[str, Any] = {}
        for fmt in formats:
            files.append(file_entry(fmt, _export_checked(job, fmt, staged, parity), FILE_NAMES[fmt]))
        int8_section = None
        if int8:
            assert calibration_images is not None and eval_images is not None  # _check_formats requires them
            int8_section = _export_int8(
                job, staged, calibration_images, eval_images, eval_labels, int8_min_cosine, int8_op_types
            )
            files.append(file_entry("onnx_int8", staged.path(FILE_NAMES["onnx_int8"]), FILE_NAMES["onnx_int8"]))
        card = build_model_card(
            summary=job.summary,
            io=io_sections(job.preprocessing, job.summary["embedding_dim"], job.in_graph),
            opset=opset if "onnx" in formats else None,
            files=files,
            parity=parity,
            int8=int8_section,
            source=source,
            metrics=metrics,
        )
        write_model_card(card, staged.path(CARD_NAME))
        committed = staged.commit()
    log.info("exported %s to %s", ", ".join(entry["format"] for entry in files), staged.directory)
    return ExportResult(
        out_dir=staged.directory,
        files={entry["format"]: committed[entry["path"]] for entry in files},
        card_path=committed[CARD_NAME],
        parity=parity,
        int8=int8_section,
        card=card,
    )


def _check_formats(
    formats: Sequence[str], int8: bool, calibration_images: Any, eval_images: Any, eval_labels: Any
) -> tuple[str, ...]:
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if not formats or unknown or len(set(formats)) != len(formats):
        raise ValueError(f"formats must be distinct values from {FORMATS}, got {formats}")
    if int8:
        if "onnx" not in formats:
            raise ValueError("int8 quantization needs the 'onnx' format")
        if calibration_images is None:
            raise ValueError("int8 quantization needs calibration_images")
        if eval_images is None or eval_labels is None:
            raise ValueError("int8 quantization needs eval_images and eval_labels to measure the MAP@R drop")
    return formats


def _prepare_job(
    model: nn.Module,
    parity_images: ImageInput,
    opset: int,
    min_cosine: float,
    in_graph: bool,
    preprocessing: Preprocessing | None,
    batch_size: int,
) -> _ExportJob:
    summary = model_summary(model)  # raises ValueError unless an EmbeddingModel
    inner = cast(EmbeddingModel, getattr(model, "module", model))
    preprocessing = preprocessing or inner.preprocessing
    if preprocessing.input_size[0] != inner.preprocessing.input_size[0]:
        raise ValueError(
            f"preprocessing has {preprocessing.input_size[0]} channels, the model {inner.preprocessing.input_size[0]}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    check_opset(opset)
    module: nn.Module = copy.deepcopy(inner).cpu().eval()
    if in_graph:
        module = PixelInputModel(module, preprocessing).eval()
    summary["preprocessing"] = preprocessing.to_dict()
    parity_inputs = _graph_inputs(parity_images, "parity_images", preprocessing, in_graph)
    return _ExportJob(
        module=module,
        summary=summary,
        preprocessing=preprocessing,
        in_graph=in_graph,
        parity_inputs=parity_inputs,
        reference=torch_embeddings(module, parity_inputs, batch_size),
        opset=opset,
        min_cosine=check_min_cosine(min_cosine),
        batch_size=batch_size,
    )


def _graph_inputs(images: ImageInput, name: str, preprocessing: Preprocessing, in_graph: bool) -> torch.Tensor:
    batch = as_image_batch(images, name, preprocessing.input_size[0])
    return normalized_to_pixels(batch, preprocessing) if in_graph else batch


def _export_checked(job: _ExportJob, fmt: str, staged: StagedFiles, parity: dict[str, dict[str, Any]]) -> Path:
    """Export one format to its temporary path and check every runtime it runs on; returns the path."""
    path = staged.path(FILE_NAMES[fmt])
    example = job.parity_inputs[:TRACE_BATCH]
    reports: dict[str, ParityReport] = {}
    if fmt == "onnx":
        export_onnx(job.module, path, example, job.opset)
        for provider in onnx_providers():
            session = open_onnx_session(path, provider)
            key = "onnx" if provider == CPU_PROVIDER else "onnx_cuda"
            candidate = onnx_embeddings(session, job.parity_inputs, job.batch_size)
            reports[key] = compare_embeddings(
                job.reference, candidate, "onnx", f"onnxruntime {provider}", job.min_cosine
            )
    else:
        export_torchscript(job.module, path, example)
        candidate = torch_embeddings(load_torchscript(path), job.parity_inputs, job.batch_size)
        reports[fmt] = compare_embeddings(job.reference, candidate, fmt, "torch.jit", job.min_cosine)
    for key, report in reports.items():
        log.info(
            "parity %s: min cosine %.6f, max abs diff %.3g on %d images",
            key,
            report.min_cosine,
            report.max_abs_diff,
            report.num_images,
        )
        parity[key] = require_parity(report).to_dict()
    return path


def _export_int8(
    job: _ExportJob,
    staged: StagedFiles,
    calibration_images: ImageInput,
    eval_images: ImageInput,
    eval_labels: Any,
    min_cosine: float,
    op_types: Sequence[str] | None,
) -> dict[str, Any]:
    """Quantize the staged fp32 ONNX file, check it against fp32 and score both on the eval set."""
    fp32_path, int8_path = staged.path(FILE_NAMES["onnx"]), staged.path(FILE_NAMES["onnx_int8"])
    calibration = _graph_inputs(calibration_images, "calibration_images", job.preprocessing, job.in_graph)
    evaluation = _graph_inputs(eval_images, "eval_images", job.preprocessing, job.in_graph)
    facts = quantize_onnx_int8(fp32_path, int8_path, calibration, op_types=op_types)
    fp32_session = open_onnx_session(fp32_path, CPU_PROVIDER)
    int8_session = open_onnx_session(int8_path, CPU_PROVIDER)
    report = compare_embeddings(
        onnx_embeddings(fp32_session, job.parity_inputs, job.batch_size),
        onnx_embeddings(int8_session, job.parity_inputs, job.batch_size),
        "onnx_int8",
        f"onnxruntime {CPU_PROVIDER}",
        min_cosine,
        reference_name="onnx_fp32",
    )
    require_parity(report)
    retrieval = retrieval_drop(
        onnx_embeddings(fp32_session, evaluation, job.batch_size),
        onnx_embeddings(int8_session, evaluation, job.batch_size),
        eval_labels,
    )
    log.info(
        "int8: min cosine to fp32 %.4f, MAP@R %.4f -> %.4f (drop %.4f)",
        report.min_cosine,
        retrieval["fp32"]["map_at_r"],
        retrieval["int8"]["map_at_r"],
        retrieval["map_at_r_drop"],
    )
    return {**facts, "file": FILE_NAMES["onnx_int8"], "parity": report.to_dict(), "retrieval": retrieval}
