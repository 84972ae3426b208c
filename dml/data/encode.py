"""Validate and encode one image for a shard.

JPEG and PNG files within the size limit are stored byte-for-byte; everything else (arrays,
PGM/BMP/TIFF/..., oversize images) is decoded by the pipeline's one rule
(`dml.data.pixels.faithful_pixels`: orientation applied, wide pixels scaled, transparency
flattened) and re-encoded as 8-bit grey or RGB, so a stored image decodes to the same pixels
as its source. Decoding fully (``load``) is what catches truncated and corrupt files, so a
bad input is rejected here, never later in a training worker. Width and height are those of
the decoded (oriented) pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from dml.config import ImageConfig
from dml.data.pixels import UnsupportedPixels, faithful_pixels
from dml.data.sources import ImagePayload

KEEP_AS_IS = {"JPEG": "jpg", "PNG": "png"}


class RejectedImage(ValueError):
    """The input is not a usable image; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    extension: str  # "jpg" or "png"
    width: int
    height: int
    mode: str


def _encode(image: Image.Image, config: ImageConfig) -> tuple[bytes, str]:
    """An ``L`` or ``RGB`` image (from `faithful_pixels`) -> JPEG or PNG bytes."""
    buffer = io.BytesIO()
    if config.reencode_format == "jpeg":
        image.save(buffer, format="JPEG", quality=config.jpeg_quality)
        return buffer.getvalue(), "jpg"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _pixels(image: Image.Image) -> Image.Image:
    try:
        return faithful_pixels(image)
    except UnsupportedPixels as exc:
        raise RejectedImage(f"unsupported pixels: {exc}") from None


def _shrink(image: Image.Image, max_side: int | None) -> tuple[Image.Image, bool]:
    if max_side is None or max(image.size) <= max_side:
        return image, False
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), True


def encode_image(payload: ImagePayload, config: ImageConfig) -> EncodedImage:
    """Return the bytes to store for ``payload``; raise `RejectedImage` with the reason if bad."""
    if isinstance(payload, np.ndarray):
        if payload.size == 0:
            raise RejectedImage("empty image array")
        try:
            image = Image.fromarray(payload)
        except TypeError as exc:  # e.g. complex or object arrays, or a shape Pillow cannot take
            raise RejectedImage(
                f"array of dtype {payload.dtype} and shape {payload.shape} is not an image: {exc}"
            ) from None
        image, _ = _shrink(_pixels(image), config.max_side)
        data, ext = _encode(image, config)
        return EncodedImage(data, ext, image.width, image.height, image.mode)
    if len(payload) == 0:
        raise RejectedImage("zero-size file")
    try:
        image = Image.open(io.BytesIO(payload))
        image_format = image.format
        image.load()
    except UnidentifiedImageError:
        # PIL's own message embeds an object address; keep the manifest deterministic.
        raise RejectedImage("corrupt or unreadable image: not a recognised image format") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files; all mean "unusable"
        raise RejectedImage(f"corrupt or unreadable image: {type(exc).__name__}: {exc}") from None
    if image.width == 0 or image.height == 0:
        raise RejectedImage("image has zero width or height")
    pixels = _pixels(image)
    shrunk, resized = _shrink(pixels, config.max_side)
    if not resized and image_format in KEEP_AS_IS:  # decoding applies the same rule at load time
        return EncodedImage(payload, KEEP_AS_IS[image_format], pixels.width, pixels.height, image.mode)
    data, ext = _encode(shrunk, config)
    return EncodedImage(data, ext, shrunk.width, shrunk.height, image.mode)
