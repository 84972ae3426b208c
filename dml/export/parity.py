"""Parity of an exported model with its PyTorch original, measured on real images.

For reference embeddings A (N, D) from the eager PyTorch model and candidate embeddings B
(N, D) from the exported file run by its own runtime, on the same N inputs:

- max_abs_diff = max over i, j of |A_ij - B_ij|
- cosine_i     = <A_i, B_i> / (|A_i| |B_i|); min_cosine and mean_cosine over the rows

An export passes when min_cosine >= the required minimum (0.9999 by default). NaN anywhere
fails the check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dml.errors import DMLError

DEFAULT_MIN_COSINE = 0.9999


class ExportParityError(DMLError):
    """An exported model's embeddings differ from the PyTorch model's beyond the tolerance."""


@dataclass(frozen=True)
class ParityReport:
    """Agreement of one exported format with its reference on ``num_images`` inputs.

    ``reference`` says what the candidate was compared with ("pytorch" or, for int8, "onnx_fp32").
    """

    format: str
    runtime: str
    reference: str
    num_images: int
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    required_min_cosine: float

    @property
    def passed(self) -> bool:
        """True when the smallest cosine reaches the required one (False for NaN)."""
        return bool(self.min_cosine >= self.required_min_cosine)  # False for NaN

    def to_dict(self) -> dict[str, Any]:
        """The report's fields and ``passed``, JSON-ready."""
        return {**asdict(self), "passed": self.passed}


def check_min_cosine(min_cosine: float, name: str = "min_cosine") -> float:
    """Validate a cosine threshold: a number in (-1, 1]; above 1 no export could ever pass.

    Raises ValueError otherwise.
    """
    value = float(min_cosine)
    if not -1.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (-1, 1], got {min_cosine}")
    return value


def compare_embeddings(
    reference: np.ndarray,
    candidate: np.ndarray,
    format: str,
    runtime: str,
    required_min_cosine: float = DEFAULT_MIN_COSINE,
    reference_name: str = "pytorch",
) -> ParityReport:
    """Parity numbers of ``candidate`` against ``reference``, both (N, D); see the module docstring.

    Raises ExportParityError if the shapes differ (e.g. a traced graph that fixed the batch size).
    """
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ExportParityError(
            f"{format} export ({runtime}) returned embeddings of shape {candidate.shape}, "
            f"expected {reference.shape} like the PyTorch model"
        )
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = (reference * candidate).sum(axis=1) / np.maximum(norms, 1e-12)
    return ParityReport(
        format=format,
        runtime=runtime,
        reference=reference_name,
        num_images=int(reference.shape[0]),
        max_abs_diff=float(np.abs(reference - candidate).max()),
        min_cosine=float(cosine.min()),
        mean_cosine=float(cosine.mean()),
        required_min_cosine=float(required_min_cosine),
    )


def require_parity(report: ParityReport) -> ParityReport:
    """Return ``report`` if it passed, else raise ExportParityError naming the format and numbers."""
    if not report.passed:
        raise ExportParityError(
            f"{report.format} export ({report.runtime}) failed parity against {report.reference} on "
            f"{report.num_images} images: min cosine {report.min_cosine:.6f} < required "
            f"{report.required_min_cosine} (mean cosine {report.mean_cosine:.6f}, max abs diff "
            f"{report.max_abs_diff:.3g}); no exported files were kept"
        )
    return report
