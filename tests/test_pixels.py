"""Pixels are what the file holds: every Pillow mode and bit depth, every EXIF orientation,
through each place the pipeline decodes (prepare's encoder, the training / evaluation
transforms, the shard pictures), asserted against the source array."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dml.config import DataConfig, ImageConfig
from dml.data.encode import RejectedImage, encode_image
from dml.data.pixels import UnsupportedPixels, decode_image, faithful_pixels
from dml.data.transforms import ConvertMode, build_eval_transform

HEIGHT, WIDTH = 5, 7  # not square, so every orientation gives a different array
PALETTE_SIZE = 6


def white_composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference flattening onto white, exact integer arithmetic with rounding half up."""
    colour, alpha = colour.astype(np.int64), alpha.astype(np.int64)
    return ((2 * (colour * alpha + 255 * (255 - alpha)) + 255) // 510).astype(np.uint8)


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for stored pixels with EXIF orientation 1-8 (the EXIF 2.3 table)."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1, :],  # mirrored top-bottom
        5: lambda a: a.swapaxes(0, 1),  # mirrored along the main diagonal
        6: lambda a: np.rot90(a, k=-1),  # rotated 90 clockwise to display
        7: lambda a: np.rot90(a, k=2).swapaxes(0, 1),  # mirrored along the anti-diagonal
        8: lambda a: np.rot90(a, k=1),  # rotated 90 counter-clockwise to display
    }[orientation](array)


def source(mode: str, rng) -> tuple[Image.Image, np.ndarray, str | None]:
    """(image in ``mode``, the 8-bit pixels it must decode to, a lossless format that stores it)."""
    shape = (HEIGHT, WIDTH)
    if mode == "1":
        bits = rng.integers(0, 2, shape).astype(bool)
        return Image.fromarray(bits), bits.astype(np.uint8) * 255, "PNG"
    if mode in ("L", "RGB"):
        values = rng.integers(0, 256, shape + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
        return Image.fromarray(values, mode), values, "PNG"
    if mode in ("LA", "RGBA"):
        values = rng.integers(0, 256, (*shape, len(mode)), dtype=np.uint8)
        values[0, 0, -1], values[0, 1, -1] = 0, 255  # fully transparent and fully opaque pixels
        expected = white_composite(values[..., :-1], values[..., -1:])
        return Image.fromarray(values, mode), expected[..., 0] if mode == "LA" else expected, "PNG"
    if mode in ("P", "PA"):
        palette = rng.integers(0, 256, (PALETTE_SIZE, 3), dtype=np.uint8)
        index = rng.integers(0, PALETTE_SIZE, shape, dtype=np.uint8)
        if mode == "P":  # a tRNS chunk: per palette entry alpha
            entry_alpha = rng.integers(0, 256, PALETTE_SIZE, dtype=np.uint8)
            image = Image.fromarray(index, "P")
            image.putpalette(palette.ravel().tolist())
            image.info["transparency"] = bytes(entry_alpha.tolist())
            return image, white_composite(palette[index], entry_alpha[index][..., None]), "PNG"
        alpha = rng.integers(0, 256, shape, dtype=np.uint8)
        image = Image.frombytes("PA", (WIDTH, HEIGHT), np.stack([index, alpha], -1).tobytes())
        image.putpalette(palette.ravel().tolist())
        return image, white_composite(palette[index], alpha[..., None]), None
    if mode in ("La", "RGBa"):  # premultiplied: stored colour = c * a / 255 <= a
        alpha = rng.integers(0, 256, (*shape, 1), dtype=np.uint8)
        premultiplied = (rng.random((*shape, len(mode) - 1)) * alpha).astype(np.uint8)
        image = Image.frombytes(mode, (WIDTH, HEIGHT), np.concatenate([premultiplied, alpha], -1).tobytes())
        expected = (premultiplied.astype(np.int64) + 255 - alpha).astype(np.uint8)
        return image, expected[..., 0] if mode == "La" else expected, None
    if mode in ("I;16", "I;16B"):
        values = rng.integers(0, 65536, shape).astype(np.uint16)
        values.flat[:2] = [0, 65535]
        dtype = ">u2" if mode == "I;16B" else "<u2"
        image = Image.frombytes(mode, (WIDTH, HEIGHT), values.astype(dtype).tobytes())
        return image, (values // 256).astype(np.uint8), "PNG" if mode == "I;16" else None
    if mode == "I":
        values = rng.integers(0, 65536, shape).astype(np.int32)
        return Image.fromarray(values, "I"), (values // 256).astype(np.uint8), "TIFF"
    if mode == "F":
        values = rng.random(shape).astype(np.float32)
        values.flat[:2] = [0.0, 1.0]
        return Image.fromarray(values, "F"), np.floor(values.astype(np.float64) * 255 + 0.5).astype(np.uint8), "TIFF"
    if mode == "CMYK":
        values = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
        ink = (255 - values[..., :3].astype(np.int64)) * (255 - values[..., 3:].astype(np.int64))
        return Image.fromarray(values, "CMYK"), np.rint(ink / 255).astype(np.uint8), "TIFF"
    if mode == "HSV":  # hue and saturation 0: grey of the value channel
        value = rng.integers(0, 256, shape, dtype=np.uint8)
        hsv = np.stack([np.zeros_like(value), np.zeros_like(value), value], -1)
        return Image.fromarray(hsv, "HSV"), np.repeat(value[..., None], 3, -1), None
    raise AssertionError(mode)


FILE_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]
MEMORY_MODES = ["PA", "La", "RGBa", "I;16B", "HSV"]  # modes Pillow opens but no writer here stores
TOLERANCE = {"CMYK": 1}  # Pillow's integer CMYK conversion vs the exact formula


def file_bytes(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    extra = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    image.save(buffer, format=fmt, exif=exif.tobytes(), **extra)
    return buffer.getvalue()


def assert_pixels(image: Image.Image, expected: np.ndarray, mode: str) -> None:
    assert image.mode == ("L" if expected.ndim == 2 else "RGB")
    got = np.asarray(image).astype(np.int64)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE.get(mode, 0), (got, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", FILE_MODES)
def test_every_stage_decodes_a_file_to_its_source_pixels(mode, orientation):
    rng = np.random.default_rng([FILE_MODES.index(mode), orientation])
    image, pixels, fmt = source(mode, rng)
    data = file_bytes(image, fmt, orientation)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == image.mode  # the file really holds this mode
    expected = orient(pixels, orientation)
    assert_pixels(decode_image(data), expected, mode)

    stored = encode_image(data, ImageConfig())  # prepare: kept as-is or re-encoded
    assert (stored.height, stored.width) == expected.shape[:2]
    assert_pixels(decode_image(stored.data), expected, mode)
    channels = 1 if expected.ndim == 2 else 3
    with Image.open(io.BytesIO(stored.data)) as opened:  # what the loaders' transforms receive
        assert_pixels(ConvertMode(channels)(opened), expected, mode)
    assert_pixels(faithful_pixels(decode_image(stored.data)), expected, mode)  # decoding twice: no change


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_modes_without_a_file_writer_convert_faithfully(mode):
    image, expected, _ = source(mode, np.random.default_rng(MEMORY_MODES.index(mode)))
    assert image.mode == mode
    assert_pixels(faithful_pixels(image), expected, mode)
    assert_pixels(ConvertMode(1 if expected.ndim == 2 else 3)(image), expected, mode)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_orientation_is_applied_once_kept_or_reencoded(orientation):
    rng = np.random.default_rng(orientation)
    photo = np.kron(rng.integers(0, 256, (6, 4, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))  # 48 x 32
    data = file_bytes(Image.fromarray(photo), "JPEG", orientation)
    with Image.open(io.BytesIO(data)) as opened:
        raw = np.asarray(opened.convert("RGB"))  # the stored pixels, before orientation
    expected = orient(raw, orientation)
    kept = encode_image(data, ImageConfig())
    assert kept.data == data and (kept.height, kept.width) == expected.shape[:2]
    assert_pixels(decode_image(kept.data), expected, "RGB")

    shrunk = encode_image(data, ImageConfig(max_side=24))  # re-encoded by prepare: oriented there
    want = Image.fromarray(expected).resize((shrunk.width, shrunk.height), Image.Resampling.BILINEAR)
    assert max(shrunk.width, shrunk.height) == 24 and (shrunk.height > shrunk.width) == (
        expected.shape[0] > expected.shape[1]
    )
    assert_pixels(decode_image(shrunk.data), np.asarray(want), "RGB")

    transform = build_eval_transform(DataConfig(image_size=16, channels=3, mean=(0.0,), std=(1.0,)))
    with Image.open(io.BytesIO(kept.data)) as opened:
        from_file = transform(opened)
    from_pixels = transform(Image.fromarray(expected))
    assert np.array_equal(from_file.numpy(), from_pixels.numpy())


def test_sixteen_bit_png_keeps_its_brightness():
    # the reported case: a mid-grey 16-bit PNG decoded nearly white (clipped, not scaled)
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    decoded = np.asarray(decode_image(buffer.getvalue())) / 255.0
    assert abs(decoded.mean() - ramp.mean() / 65535) < 0.01


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.array([[0, 70000]], np.int32), "outside 0..65535"),
        (np.array([[-1, 5]], np.int32), "outside 0..65535"),
        (np.array([[0.0, 2.5]], np.float32), r"outside \[0, 1\]"),
        (np.array([[0.0, np.nan]], np.float32), "not finite"),
    ],
)
def test_pixels_without_a_defined_scale_are_rejected_with_the_reason(array, reason):
    with pytest.raises(UnsupportedPixels, match=reason):
        faithful_pixels(Image.fromarray(array))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    with pytest.raises(RejectedImage, match=reason):
        encode_image(buffer.getvalue(), ImageConfig())
    with pytest.raises(RejectedImage, match=reason):
        encode_image(array, ImageConfig())


@pytest.mark.parametrize("dtype, scale", [(np.uint8, 1), (np.uint16, 257), (np.float32, 1 / 255), (bool, None)])
def test_array_sources_are_scaled_by_their_dtype(dtype, scale):
    values = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH))
    if dtype is bool:
        array, expected = values > 127, np.where(values > 127, 255, 0)
    else:
        array, expected = (values * scale).astype(dtype), values
    stored = encode_image(array, ImageConfig())
    assert stored.extension == "png"
    assert_pixels(decode_image(stored.data), expected.astype(np.uint8), "L")
