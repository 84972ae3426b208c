"""The pixels an image file holds, as 8-bit grey or RGB: the one decoding rule of the pipeline.

`dml prepare` (what it checks, measures and re-encodes), training, evaluation, the export
parity check and the shard pictures all decode through here, so every stage sees the same
pixels. The rule, for every mode Pillow opens:

- Orientation: the EXIF / TIFF orientation tag (1-8) is applied once, here; the result
  carries no orientation, so decoding it again changes nothing.
- Grey sources stay grey (``L``), every other source becomes ``RGB``; the model's channel
  count is a separate, later step (`dml.data.transforms.ConvertMode`).
- Wider pixels are scaled, never clipped: 16-bit integers (``I;16*``, and ``I``, which Pillow
  uses for 16-bit data too, if its values lie in 0..65535) keep their top 8 bits
  (``v >> 8``, as Pillow reads 16-bit colour PNGs); floats (``F``) in [0, 1] become
  ``round(v * 255)``; bilevel ``1`` becomes 0 / 255. ``I`` outside 0..65535 and ``F``
  outside [0, 1] have no defined scale and raise `UnsupportedPixels`.
- Transparency (``LA``, ``RGBA``, ``PA``, ``P`` or ``L`` / ``RGB`` with a transparency key,
  premultiplied ``La`` / ``RGBa``) is flattened onto white:
  ``(c * a + 255 * (255 - a)) / 255``, rounded half up.
- Other colour spaces (``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``, palettes) convert to
  ``RGB`` with Pillow's conversion.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# The rule in one line, for model cards (a deployment must decode the same way).
DECODE_RULE = (
    "apply the EXIF orientation; grey sources stay grey (L), others become RGB; 16-bit values "
    "keep their top 8 bits (v >> 8); float pixels in [0, 1] become round(v * 255); 1-bit "
    "becomes 0/255; transparency is flattened onto white, (c * a + 255 * (255 - a)) / 255; "
    "CMYK, YCbCr, LAB and palettes convert to RGB as Pillow converts them"
)
ORIENTATION_TAG = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
WHITE = 255


class UnsupportedPixels(ValueError):
    """The image's pixel values have no defined 8-bit scale (message says why)."""


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> its pixels as an oriented ``L`` or ``RGB`` image (see module doc).

    Raises whatever Pillow raises for an unreadable file, and `UnsupportedPixels`.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return faithful_pixels(image)


def faithful_pixels(image: Image.Image) -> Image.Image:
    """Any Pillow image -> oriented ``L`` (grey sources) or ``RGB`` (others), 8 bits a channel.

    ``L`` and ``RGB`` images without an orientation tag or transparency key are returned as
    they are (no copy). Raises `UnsupportedPixels` for values with no defined scale.
    """
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("L", "RGB") and "transparency" not in image.info:
        return image
    if mode in ("P", "PA") or (mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("LA" if mode == "L" else "RGBA")  # honours the transparency key
        mode = image.mode
    if mode in ("LA", "RGBA", "La", "RGBa"):
        return _flatten_onto_white(np.asarray(image), premultiplied=mode in ("La", "RGBa"))
    if mode == "1":
        return image.convert("L")
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return Image.fromarray(_top_byte(np.asarray(image), mode))
    if mode == "F":
        return Image.fromarray(_unit_float_to_byte(np.asarray(image)))
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise UnsupportedPixels(f"pixel mode {mode} has no conversion to RGB: {error}") from None


def _flatten_onto_white(array: np.ndarray, premultiplied: bool) -> Image.Image:
    """(H, W, C + 1) colour + alpha uint8 -> colour composited onto white, ``L`` or ``RGB``."""
    colour, alpha = array[..., :-1].astype(np.uint32), array[..., -1:].astype(np.uint32)
    if premultiplied:  # colour already holds c * a / 255
        flat = colour + (WHITE - alpha)
    else:
        flat = (colour * alpha + WHITE * (WHITE - alpha) + 127) // 255
    flat = np.minimum(flat, WHITE).astype(np.uint8)
    return Image.fromarray(flat[..., 0] if flat.shape[-1] == 1 else flat)


def _top_byte(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit pixel values -> their top 8 bits; ``I`` must hold 16-bit values."""
    values = values.astype(np.int64)
    if mode == "I" and values.size and (values.min() < 0 or values.max() > 0xFFFF):
        raise UnsupportedPixels(
            f"32-bit integer pixels span {values.min()}..{values.max()}, outside 0..65535: no defined 8-bit scale"
        )
    return (values >> 8).astype(np.uint8)


def _unit_float_to_byte(values: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] -> round(v * 255) as uint8."""
    if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
        raise UnsupportedPixels(
            f"float pixels span {np.nanmin(values):g}..{np.nanmax(values):g} (or are not "
            "finite), outside [0, 1]: no defined 8-bit scale"
        )
    return np.floor(values.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)
