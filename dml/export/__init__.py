"""Export of embedding models: ONNX / TorchScript files, parity checks, int8, model cards.

``export_model`` is the stage function; the modules below it each own one step:
``onnx_export`` / ``torchscript_export`` (writing and running files), ``parity`` (checking
them against PyTorch), ``quantize`` (ORT static int8 and its MAP@R cost), ``model_card``
(the JSON card and its validation), ``latency`` (ORT CPU timing), ``pixel_input`` (optional
preprocessing inside the graph), ``staging`` (temporary names until every check passed).
"""

from dml.export.checked_export import CARD_NAME, FILE_NAMES, ExportResult, export_model
from dml.export.latency import onnx_cpu_latency
from dml.export.model_card import (
    ModelCardError,
    build_model_card,
    load_model_card,
    sha256_file,
    validate_model_card,
    verify_card_files,
    write_model_card,
)
from dml.export.onnx_export import (
    export_onnx,
    onnx_embeddings,
    onnx_providers,
    open_onnx_session,
)
from dml.export.parity import (
    DEFAULT_MIN_COSINE,
    ExportParityError,
    ParityReport,
    compare_embeddings,
    require_parity,
)
from dml.export.pixel_input import PixelInputModel, collect_images, normalized_to_pixels
from dml.export.quantize import ImageBatchReader, quantize_onnx_int8, retrieval_drop
from dml.export.torchscript_export import (
    export_torchscript,
    load_torchscript,
    torch_embeddings,
)

__all__ = [
    "CARD_NAME",
    "DEFAULT_MIN_COSINE",
    "FILE_NAMES",
    "ExportParityError",
    "ExportResult",
    "ImageBatchReader",
    "ModelCardError",
    "ParityReport",
    "PixelInputModel",
    "build_model_card",
    "collect_images",
    "compare_embeddings",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "load_model_card",
    "load_torchscript",
    "normalized_to_pixels",
    "onnx_cpu_latency",
    "onnx_embeddings",
    "onnx_providers",
    "open_onnx_session",
    "quantize_onnx_int8",
    "require_parity",
    "retrieval_drop",
    "sha256_file",
    "torch_embeddings",
    "validate_model_card",
    "verify_card_files",
    "write_model_card",
]
