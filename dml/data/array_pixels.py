"""8-bit pixels from the arrays of IDX and npz sources, scaled as a whole file, never wrapped.

An IDX or npz file stores raw numbers, not an image format, so the file's element type and
value range decide one scale for all its images (so two images of a file keep their relative
brightness):

- ``bool``: False -> 0, True -> 255;
- integers within 0..255 (``uint8``, or wider types holding 8-bit values): as they are;
- integers within 0..65535: 16-bit, the top 8 bits (``v >> 8``);
- floats within [0, 1]: ``round(v * 255)``;
- anything else (negative values, floats above 1, NaN, integers above 65535) has no defined
  8-bit scale: `pixel_scale` raises `DataError` naming the file, its type and value range.

A plain ``astype(uint8)`` wrapped 16-bit values modulo 256 and truncated [0, 1] floats to 0
(black images written without a word).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dml.errors import DataError

AS_IS, BOOL, TOP_BYTE, UNIT_FLOAT = "as_is", "bool", "top_byte", "unit_float"


def pixel_scale(array: np.ndarray, path: Path) -> str:
    """The scale (one of the module's constants) for every image of ``array``, read from ``path``.

    Raises `DataError` (one line naming ``path``) when the values have no defined 8-bit scale.
    """
    kind = array.dtype.kind
    if kind == "b":
        return BOOL
    if array.dtype == np.uint8 or array.size == 0:
        return AS_IS
    low: float  # an int for integer arrays
    high: float
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high <= 255:
            return AS_IS
        if low >= 0 and high <= 65535:
            return TOP_BYTE
    elif kind == "f":
        low, high = float(np.min(array)), float(np.max(array))
        if low >= 0.0 and high <= 1.0:  # NaN fails both comparisons
            return UNIT_FLOAT
    else:
        raise DataError(f"{path}: images of type {array.dtype} are not pixel values")
    raise DataError(
        f"{path}: {array.dtype} pixel values in {low}..{high} have no 8-bit scale; expected "
        "integers in 0..255 or 0..65535, floats in [0, 1], or booleans"
    )


def to_uint8(image: np.ndarray, scale: str) -> np.ndarray:
    """One image (any shape) as uint8 under ``scale`` (from `pixel_scale`)."""
    if scale == BOOL:
        return image.astype(np.uint8) * np.uint8(255)
    if scale == TOP_BYTE:
        return (image.astype(np.uint32) >> 8).astype(np.uint8)
    if scale == UNIT_FLOAT:
        return np.floor(image.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(image).astype(np.uint8)
