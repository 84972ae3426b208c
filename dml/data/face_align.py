"""Face alignment in `dml prepare`: crop a face box with a margin, or warp five landmarks onto
the ArcFace 112 x 112 template, so shards hold aligned crops.

Marks come from manifest-table columns (all in image pixels, pixel centres at integer
coordinates, as OpenCV and scikit-image count them):

- box: ``box_x, box_y, box_w, box_h`` (top-left corner, width, height);
- landmarks: ``lm_x1, lm_y1, ..., lm_x5, lm_y5``: left eye, right eye, nose tip, left and
  right mouth corners (left / right as seen in the image).

``landmarks`` mode estimates the least-squares similarity (rotation, uniform scale,
translation; scikit-image's `SimilarityTransform`, Umeyama's method) taking the five points to
the template scaled to ``size / 112``, and warps with bilinear interpolation (outside the image:
black). ``box`` mode crops the square of side ``max(w, h) * (1 + 2 * margin)`` centred on the
box and resizes it to ``size``. A record without the marks its mode needs is rejected with
the reason; grey images stay grey, other modes become RGB.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from dml.data.pixels import faithful_pixels

if TYPE_CHECKING:  # scikit-image (scipy) is imported on first use: most prepares never align
    from skimage.transform import SimilarityTransform

    from dml.config import AlignConfig

ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ]
)
TEMPLATE_SIZE = 112
BOX_COLUMNS = ("box_x", "box_y", "box_w", "box_h")
LANDMARK_COLUMNS = tuple(f"lm_{axis}{i}" for i in range(1, 6) for axis in "xy")
FACE_COLUMNS = BOX_COLUMNS + LANDMARK_COLUMNS


@dataclass(frozen=True)
class FaceMarks:
    """A face's box ``(x, y, w, h)`` and/or five landmarks ``((x1, y1), ..., (x5, y5))``, pixels."""

    box: tuple[float, float, float, float] | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None


def _numbers(row: Mapping, columns: tuple[str, ...]) -> list[float] | None:
    """The columns' values as floats; None when any is absent, empty or NaN (no marks)."""
    raw = [row.get(c) for c in columns]
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in raw):
        return None
    try:
        values = [float(v) for v in raw]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        bad = next(c for c, v in zip(columns, raw, strict=True) if not _is_number(v))
        raise ValueError(f"face column {bad} is not a number: {row.get(bad)!r}") from None
    if not all(math.isfinite(v) for v in values):
        return None
    return values


def _is_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def face_marks(row: Mapping) -> FaceMarks | None:
    """Read the box and landmark columns (`FACE_COLUMNS`) of one table row; None without marks.

    Empty or NaN cells mean "no marks". Raises ValueError (the row's rejection reason) for a
    value that is not a number.
    """
    box = _numbers(row, BOX_COLUMNS)
    points = _numbers(row, LANDMARK_COLUMNS)
    if box is None and points is None:
        return None
    landmarks = tuple(zip(points[0::2], points[1::2], strict=True)) if points is not None else None
    return FaceMarks((box[0], box[1], box[2], box[3]) if box is not None else None, landmarks)


def template(size: int) -> np.ndarray:
    """The ArcFace template (5, 2) scaled from 112 x 112 to ``size`` x ``size`` pixels."""
    return ARCFACE_TEMPLATE * (size / TEMPLATE_SIZE)


def landmark_transform(landmarks: np.ndarray, size: int) -> SimilarityTransform:
    """The least-squares similarity taking ``landmarks`` (5, 2) onto the template at ``size``.

    Raises ValueError when no similarity exists (e.g. all points equal).
    """
    from skimage.transform import SimilarityTransform

    tform = SimilarityTransform.from_estimate(np.asarray(landmarks, dtype=np.float64), template(size))
    if not isinstance(tform, SimilarityTransform) or not np.isfinite(tform.params).all() or tform.scale <= 0:
        raise ValueError("landmarks are degenerate: no similarity takes them to the template")
    return tform


def box_transform(box: tuple[float, float, float, float], size: int, margin: float) -> SimilarityTransform:
    """Scale + translation taking the margin-expanded square around ``box`` onto ``size`` pixels.

    Raises ValueError for a box with a non-positive width or height.
    """
    from skimage.transform import SimilarityTransform

    x, y, w, h = box
    if w <= 0 or h <= 0:
        raise ValueError(f"face box has width {w} and height {h}; both must be positive")
    side = max(w, h) * (1.0 + 2.0 * margin)
    scale = size / side
    left, top = x + w / 2 - side / 2, y + h / 2 - side / 2
    # The square's sides go to the output's outer pixel edges, -0.5 and size - 0.5.
    return SimilarityTransform(scale=scale, translation=(-left * scale - 0.5, -top * scale - 0.5))


def warp_face(image: np.ndarray, tform: SimilarityTransform, size: int) -> np.ndarray:
    """Warp ``image`` (H, W) or (H, W, C) uint8 by ``tform`` into a (size, size[, C]) uint8 crop."""
    from skimage.transform import warp

    out = warp(image, tform.inverse, output_shape=(size, size), order=1, mode="constant", cval=0, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pixels(payload: bytes | np.ndarray) -> np.ndarray:
    if isinstance(payload, np.ndarray):
        return payload
    try:
        image = Image.open(io.BytesIO(payload))
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files; all mean "unusable"
        raise ValueError(f"corrupt or unreadable image: {type(exc).__name__}") from None
    return np.asarray(faithful_pixels(image))  # the pipeline's one pixel rule (orientation, 16-bit, alpha)


def align_face(payload: bytes | np.ndarray, marks: FaceMarks | None, config: AlignConfig) -> bytes | np.ndarray:
    """Return ``payload`` aligned as ``config`` says: unchanged for mode ``none``, else a
    (size, size[, 3]) uint8 array. Raises ValueError (the record's rejection reason) when the
    marks the mode needs are missing or degenerate, or the image cannot be decoded."""
    if config.mode == "none":
        return payload
    if config.mode == "landmarks":
        if marks is None or marks.landmarks is None:
            raise ValueError("no face landmarks (columns lm_x1 .. lm_y5) for landmark alignment")
        tform = landmark_transform(np.array(marks.landmarks), config.size)
    else:
        if marks is None or marks.box is None:
            raise ValueError("no face box (columns box_x, box_y, box_w, box_h) for box cropping")
        tform = box_transform(marks.box, config.size, config.margin)
    return warp_face(_pixels(payload), tform, config.size)
