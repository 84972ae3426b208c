"""IDX and npz arrays reach the shards scaled as a whole file (`dml.data.array_pixels`), never
wrapped or truncated; types and ranges with no 8-bit scale, and non-integral IDX labels, stop
the run in one line naming the file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import write_idx
from dml.cli import main

# (IDX element type, pixel values of 4 images of 6x5, the 8-bit pixels expected)
RNG = np.random.default_rng(7)
U8 = RNG.integers(0, 256, (4, 6, 5))
U16 = RNG.integers(0, 65536, (4, 6, 5))
UNIT = RNG.random((4, 6, 5))
SCALED = [
    (">u1", U8, U8),
    (">i2", U8, U8),  # wider type holding 8-bit values: as they are
    (">i4", U8, U8),
    (">i4", U16, U16 >> 8),  # 16-bit values: their top 8 bits (wrapped mod 256 before)
    (">f4", UNIT, np.floor(UNIT.astype(np.float32).astype(np.float64) * 255 + 0.5)),  # [0, 1]: 0 before
    (">f8", UNIT, np.floor(UNIT * 255 + 0.5)),
    (">f8", np.round(UNIT), np.round(UNIT) * 255),
]
UNSCALABLE = [
    (">i1", U8.astype(np.int16) - 128),
    (">i2", -U8),
    (">f4", UNIT * 2),
    (">i4", U16 * 2),
    (">f8", np.where(UNIT > 0.5, np.nan, UNIT)),
]


def _prepare(capsys, source: Path, out: Path) -> tuple[int, str]:
    code = main(
        [
            "prepare",
            f"prepare.source.path={source}",
            f"prepare.output_dir={out}",
            "prepare.split.mode=sample",
            "prepare.split.train_fraction=1.0",
        ]
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _pixels_by_source(out: Path) -> dict[str, np.ndarray]:
    import tarfile

    found: dict[str, dict] = {}
    for tar_path in out.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member)
                assert data is not None, member.name  # shards hold regular files only
                found.setdefault(key, {})[ext] = data.read()
    return {json.loads(s["json"])["source"]: np.asarray(Image.open(io.BytesIO(s["png"]))) for s in found.values()}


def _idx_set(
    root: Path, images: np.ndarray, dtype: str, labels: np.ndarray | None = None, label_dtype: str = ">u1"
) -> Path:
    root.mkdir(parents=True)
    write_idx(root / "train-images-idx3-ubyte", images, False, dtype)
    labels = np.arange(len(images)) % 2 if labels is None else labels
    write_idx(root / "train-labels-idx1-ubyte", labels, False, label_dtype)
    return root


@pytest.mark.parametrize("case", range(len(SCALED)))
def test_idx_pixels_are_scaled_not_wrapped(tmp_path, capsys, case):
    dtype, values, expected = SCALED[case]
    source = _idx_set(tmp_path / "idx", values, dtype)
    code, err = _prepare(capsys, source, tmp_path / "out")
    assert code == 0, err
    pixels = _pixels_by_source(tmp_path / "out")
    assert len(pixels) == len(values)
    for i in range(len(values)):
        np.testing.assert_array_equal(pixels[f"train:{i}"], expected[i].astype(np.uint8))


@pytest.mark.parametrize("image_dtype", [bool, np.uint8, np.float32, np.uint16])
def test_npz_pixels_are_scaled_not_wrapped(tmp_path, capsys, image_dtype):
    strokes = RNG.random((3, 2, 9, 7)) > 0.3  # True = white background
    images = {
        bool: strokes,
        np.uint8: strokes * np.uint8(255),
        np.float32: strokes.astype(np.float32),
        np.uint16: strokes * np.uint16(65535),
    }[image_dtype]
    (tmp_path / "omni").mkdir()
    np.savez(tmp_path / "omni" / "images_background.npz", images=images, labels=np.zeros((3, 2), np.int64))
    code, err = _prepare(capsys, tmp_path / "omni", tmp_path / "out")
    assert code == 0, err
    pixels = _pixels_by_source(tmp_path / "out")
    assert len(pixels) == 6
    for c in range(3):
        for j in range(2):
            np.testing.assert_array_equal(pixels[f"background:{c}:{j}"], strokes[c, j] * np.uint8(255))


def _one_line(code: int, err: str, *names: str) -> None:
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(errors) == 1, err
    assert all(name in errors[0] for name in names), (names, errors[0])


@pytest.mark.parametrize("case", range(len(UNSCALABLE)))
def test_unscalable_arrays_are_one_line_errors(tmp_path, capsys, case):
    dtype, values = UNSCALABLE[case]
    source = _idx_set(tmp_path / "idx", values, dtype)
    code, err = _prepare(capsys, source, tmp_path / "out")
    _one_line(code, err, "train-images-idx3-ubyte", "no 8-bit scale")
    assert not list((tmp_path / "out").glob("*.tar*"))
    (tmp_path / "omni").mkdir()
    np.savez(
        tmp_path / "omni" / "images_background.npz",
        images=values.reshape(2, 2, 6, 5),
        labels=np.zeros((2, 2), np.int64),
    )
    code, err = _prepare(capsys, tmp_path / "omni", tmp_path / "out2")
    _one_line(code, err, "images_background.npz", "no 8-bit scale")


@pytest.mark.parametrize("labels", [[0.0, 1.5, 2.0, 0.0], [0.0, np.nan, 1.0, 1.0], [0.0, 1.0, np.inf, 1.0]])
def test_non_integral_idx_labels_are_one_line_errors(tmp_path, capsys, labels):
    source = _idx_set(tmp_path / "idx", U8, ">u1", np.array(labels), ">f8")
    code, err = _prepare(capsys, source, tmp_path / "out")
    _one_line(code, err, "train-labels-idx1-ubyte", "not an integer class")


def test_integral_float_idx_labels_are_their_integers(tmp_path, capsys):
    source = _idx_set(tmp_path / "idx", U8, ">u1", np.array([0.0, 1.0, 2.0, -1.0]), ">f4")
    code, err = _prepare(capsys, source, tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["classes"] == ["-1", "0", "1", "2"]
