"""``model_card.json``: what a deployment needs to know to feed an exported model and trust it.

Sections: ``model`` (backbone, pooling, embedding dim, parameter counts), ``input`` / ``output``
(tensor names, dtypes, layouts, shapes), ``preprocessing`` (the pipeline's own recipe: decoding
rule, resize filter and call, channel order and conversion, value range, mean / std, and
whether the graph applies the normalisation), ``export`` (opset, formats), ``files`` (path,
bytes, sha256), ``parity`` per format, ``int8`` (None unless quantized), ``source`` (the
teacher or run the model came from, may be None), ``metrics`` (its evaluation), ``created_at``
and ``versions``. ``validate_model_card`` checks that every required field is there.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import timm
import torch

from dml.clock import utc_now
from dml.data.pixels import DECODE_RULE
from dml.errors import DMLError
from dml.export.onnx_export import INPUT_NAME, OUTPUT_NAME
from dml.files import sha256_file
from dml.models import Preprocessing

CARD_SCHEMA_VERSION = 1

# Dotted path -> accepted type(s). ``None`` in a tuple means the value may be null.
REQUIRED_FIELDS: dict[str, tuple] = {
    "schema_version": (int,),
    "created_at": (str,),
    "model.backbone": (str,),
    "model.pooling": (str,),
    "model.embedding_dim": (int,),
    "model.num_parameters": (int,),
    "input.name": (str,),
    "input.dtype": (str,),
    "input.layout": (str,),
    "input.shape": (list,),
    "output.name": (str,),
    "output.shape": (list,),
    "output.l2_normalized": (bool,),
    "preprocessing.in_graph": (bool,),
    "preprocessing.input_size": (list,),
    "preprocessing.resize_interpolation": (str,),
    "preprocessing.channel_order": (str,),
    "preprocessing.value_range": (list,),
    "preprocessing.mean": (list,),
    "preprocessing.std": (list,),
    "export.opset": (int, type(None)),
    "export.formats": (list,),
    "files": (list,),
    "parity": (dict,),
    "int8": (dict, type(None)),
    "source": (str, dict, type(None)),
    "metrics": (dict,),
    "versions.torch": (str,),
    "versions.onnxruntime": (str,),
}
FILE_FIELDS = ("format", "path", "bytes", "sha256")
PARITY_FIELDS = ("max_abs_diff", "min_cosine", "mean_cosine", "num_images", "passed")


class ModelCardError(DMLError, ValueError):
    """A model card that lacks required fields or does not match its files."""


def file_entry(format: str, path: str | os.PathLike, name: str) -> dict[str, Any]:
    """Card entry for one exported file; ``name`` is its final file name inside the export dir
    (``path`` may still be a temporary name with the same content)."""
    return {"format": format, "path": name, "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def io_sections(preprocessing: Preprocessing, embedding_dim: int, in_graph: bool) -> dict[str, Any]:
    """The ``input``, ``output`` and ``preprocessing`` sections for a model's input contract."""
    channels, height, width = preprocessing.input_size
    if in_graph:
        graph_input = {"dtype": "uint8", "layout": "NHWC", "shape": ["batch", height, width, channels]}
        applied = "uint8 pixels 0..255 in; the graph divides by 255 and normalises with mean/std"
    else:
        graph_input = {"dtype": "float32", "layout": "NCHW", "shape": ["batch", channels, height, width]}
        applied = "the caller resizes, divides pixels by 255 and normalises with mean/std before the graph"
    if preprocessing.center_crop is not None:
        applied = f"the caller first keeps the central {preprocessing.center_crop:g} of each side; " + applied
    filter_name = f"Image.Resampling.{preprocessing.interpolation.upper()}"
    crop_note = (
        f" (after keeping its central {preprocessing.center_crop:g} of each side)"
        if preprocessing.center_crop is not None
        else " (no crop)"
    )
    return {
        "input": {"name": INPUT_NAME, **graph_input},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", embedding_dim], "l2_normalized": True},
        "preprocessing": {
            "in_graph": in_graph,
            "decode": DECODE_RULE,
            "input_size": [channels, height, width],
            "resize_interpolation": preprocessing.interpolation,
            # Fraction of each side kept around the centre before resizing; null: no crop.
            "center_crop": preprocessing.center_crop,
            "resize": f"PIL image.resize(({width}, {height}), {filter_name}) on the decoded 8-bit image"
            f"{crop_note}, straight to the input size: the aspect ratio is not kept",
            "channel_order": "RGB" if channels == 3 else "grey (L)",
            "channel_conversion": (
                "grey images are repeated into R, G and B"
                if channels == 3
                else "colour images become grey as PIL's convert('L') does (ITU-R 601-2 luma)"
            ),
            "value_range": [0.0, 1.0],
            "mean": list(preprocessing.mean),
            "std": list(preprocessing.std),
            "formula": "x = (pixel / 255 - mean[c]) / std[c]",
            "applied": applied,
        },
    }


def runtime_versions() -> dict[str, str]:
    """Versions of the libraries that produced and checked the export."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }


def build_model_card(
    *,
    summary: Mapping[str, Any],
    io: Mapping[str, Any],
    opset: int | None,
    files: list[dict[str, Any]],
    parity: Mapping[str, Any],
    int8: Mapping[str, Any] | None,
    source: str | Mapping[str, Any] | None,
    metrics: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Assemble a card (see the module docstring) from ``model_summary`` output and export facts."""
    model = {key: value for key, value in summary.items() if key != "preprocessing"}
    card = {
        "schema_version": CARD_SCHEMA_VERSION,
        "created_at": utc_now(),
        "model": model,
        **io,
        "export": {"opset": opset, "formats": [entry["format"] for entry in files]},
        "files": files,
        "parity": dict(parity),
        "int8": dict(int8) if int8 is not None else None,
        "source": dict(source) if isinstance(source, Mapping) else source,
        "metrics": dict(metrics or {}),
        "versions": runtime_versions(),
    }
    return json.loads(json.dumps(card, default=_json_default))  # plain JSON types only


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    if isinstance(value, Path):
        return os.fspath(value)
    raise TypeError(f"model card value of type {type(value).__name__} is not JSON serialisable")


def validate_model_card(card: Mapping[str, Any]) -> None:
    """Raise ModelCardError listing every required field that is missing or has the wrong type.

    Also checks each ``files`` entry (format, path, bytes, 64-hex sha256), a parity entry with
    its numbers for every non-int8 file's format, and, when ``int8`` is set, its parity and
    ``map_at_r_drop``.
    """
    problems = []
    for dotted, types in REQUIRED_FIELDS.items():
        found, value = _lookup(card, dotted)
        if not found:
            problems.append(f"missing {dotted}")
        elif not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            problems.append(f"{dotted} has type {type(value).__name__}")
    problems += _file_problems(card)
    if problems:
        raise ModelCardError("invalid model card: " + "; ".join(problems))


def _file_problems(card: Mapping[str, Any]) -> list[str]:
    files, parity, int8 = card.get("files"), card.get("parity"), card.get("int8")
    if not isinstance(files, list) or not isinstance(parity, Mapping):
        return []
    problems = [] if files else ["files is empty"]
    for index, entry in enumerate(files):
        missing = [name for name in FILE_FIELDS if not isinstance(entry, Mapping) or name not in entry]
        if missing:
            problems.append(f"files[{index}] lacks {', '.join(missing)}")
            continue
        sha = str(entry["sha256"])
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            problems.append(f"files[{index}].sha256 is not a hex SHA-256")
        if entry["format"] != "onnx_int8":
            problems += _parity_problems(parity.get(entry["format"]), f"parity.{entry['format']}")
    if isinstance(int8, Mapping):
        problems += _parity_problems(int8.get("parity"), "int8.parity")
        if not isinstance(int8.get("retrieval"), Mapping) or "map_at_r_drop" not in int8["retrieval"]:
            problems.append("missing int8.retrieval.map_at_r_drop")
    return problems


def _parity_problems(entry: Any, where: str) -> list[str]:
    if not isinstance(entry, Mapping):
        return [f"missing {where}"]
    return [f"missing {where}.{name}" for name in PARITY_FIELDS if name not in entry]


def _lookup(card: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    value: Any = card
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def load_model_card(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a card."""
    with open(path, encoding="utf-8") as handle:
        card = json.load(handle)
    validate_model_card(card)
    return card


def verify_card_files(card: Mapping[str, Any], directory: str | os.PathLike) -> None:
    """Raise ModelCardError unless every file the card lists exists in ``directory`` with its sha256."""
    for entry in card.get("files", []):
        path = Path(directory) / entry["path"]
        if not path.is_file():
            raise ModelCardError(f"model card lists {entry['path']} but {path} does not exist")
        if sha256_file(path) != entry["sha256"]:
            raise ModelCardError(f"{path} does not match the sha256 in its model card")


def write_model_card(card: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Validate ``card`` and write it as indented JSON to ``path``."""
    validate_model_card(card)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(card, handle, indent=2, sort_keys=False)
        handle.write("\n")
