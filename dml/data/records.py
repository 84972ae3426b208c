"""What a source lists before any pixel is read: records, and why a listed input was refused."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dml.data.face_align import FaceMarks

ImagePayload = bytes | np.ndarray  # what reading a record gives: encoded file bytes or uint8 pixels
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Rejection:
    """Why a listed input is not a sample: a short code (``hidden``, ``duplicate``, ...) and a
    one-line reason."""

    code: str
    reason: str


@dataclass(frozen=True)
class Record:
    """One listed input before reading: a stable id, its original label and a split hint.

    A record with a ``rejection`` was refused while listing (by the source's rules); it is
    never read, and the manifest names it with its reason. ``row`` locates a table's input
    (CSV: line number, header = line 1; Parquet: 0-based row index).
    """

    source_id: str
    label: str
    split: str | None = None
    rejection: Rejection | None = None
    row: int | None = None
    face: FaceMarks | None = None  # face box / landmarks from a table's columns, for alignment

    def rejected(self, code: str, reason: str) -> Record:
        """This record refused with ``code`` and ``reason``."""
        return replace(self, rejection=Rejection(code, reason))
