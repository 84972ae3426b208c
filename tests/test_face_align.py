"""Face alignment in `dml prepare`: it must undo known similarity transforms of real faces."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from skimage.transform import SimilarityTransform, warp

from data_fixtures import SHARED_DATA
from dml.config import AlignConfig
from dml.data.face_align import (
    LANDMARK_COLUMNS,
    FaceMarks,
    align_face,
    box_transform,
    landmark_transform,
    template,
    warp_face,
)
from dml.data.shards import write_shards
from dml.data.sources import open_source
from dml.errors import DataError
from test_prepare import all_samples, prepare_config

ORL = SHARED_DATA / "orl_faces"
needs_orl = pytest.mark.skipif(not ORL.is_dir(), reason=f"ORL faces absent: {ORL}")
SIZE = 112


def orl_face(person: int = 1, image: int = 1) -> np.ndarray:
    return np.asarray(Image.open(ORL / f"s{person}" / f"{image}.pgm"))


def marked_points() -> np.ndarray:
    """Five points on an ORL face (92 x 112) related to the template by an exact similarity."""
    return SimilarityTransform(scale=0.8, rotation=0.05, translation=(2, 8))(template(SIZE))


def moved(image: np.ndarray, rotation: float, scale: float) -> tuple[np.ndarray, SimilarityTransform]:
    """``image`` warped by a similarity onto a canvas large enough to hold all of it."""
    h, w = image.shape[:2]
    corners = SimilarityTransform(scale=scale, rotation=rotation)(
        np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]])
    )
    tform = SimilarityTransform(scale=scale, rotation=rotation, translation=5 - corners.min(0))
    canvas = tuple(int(v) for v in np.ceil(corners.max(0) - corners.min(0) + 10)[::-1])
    out = warp(image, tform.inverse, output_shape=canvas, order=1, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), tform


def inside_mask(tform: SimilarityTransform, shape: tuple[int, int], border: float = 2.0) -> np.ndarray:
    """Output pixels whose source lies inside the image by ``border`` (edge fill excluded)."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    src = tform.inverse(np.c_[cols.ravel(), rows.ravel()])
    h, w = shape
    ok = (src[:, 0] > border) & (src[:, 0] < w - 1 - border) & (src[:, 1] > border) & (src[:, 1] < h - 1 - border)
    return ok.reshape(SIZE, SIZE)


def mean_abs(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b)[mask].mean())


@needs_orl
@pytest.mark.parametrize("seed", range(6))
def test_landmark_alignment_undoes_a_similarity(seed):
    rng = np.random.default_rng(seed)
    face, points = orl_face(1 + seed, 1 + seed), marked_points()
    direct_tform = landmark_transform(points, SIZE)
    direct = warp_face(face, direct_tform, SIZE)
    image, tform = moved(face, rotation=rng.uniform(-0.6, 0.6), scale=rng.uniform(0.8, 1.8))
    new_points = tform(points)  # the marks move with the face
    new_tform = landmark_transform(new_points, SIZE)
    np.testing.assert_allclose(new_tform(new_points), template(SIZE), atol=1e-6)
    aligned = align_face(image, FaceMarks(landmarks=tuple(map(tuple, new_points))), AlignConfig(mode="landmarks"))
    assert aligned.shape == (SIZE, SIZE) and aligned.dtype == np.uint8
    mask = inside_mask(direct_tform, face.shape)
    # Two bilinear resamplings against one: about 1 grey level apart; one pixel off is several.
    one_pixel_off = mean_abs(np.roll(direct, 1, axis=1), direct, mask)
    assert mean_abs(aligned, direct, mask) < min(2.5, one_pixel_off / 2)


@needs_orl
@pytest.mark.parametrize("seed", range(4))
def test_box_crop_undoes_scale_and_shift(seed):
    rng = np.random.default_rng(seed)
    face, box, margin = orl_face(2 + seed), (14.0, 20.0, 60.0, 72.0), rng.uniform(0.0, 0.2)
    config = AlignConfig(mode="box", margin=margin)
    direct = align_face(face, FaceMarks(box=box), config)
    image, tform = moved(face, rotation=0.0, scale=rng.uniform(0.8, 1.8))
    (x, y), s = tform(np.array([box[:2]]))[0], tform.scale
    aligned = align_face(image, FaceMarks(box=(x, y, box[2] * s, box[3] * s)), config)
    mask = inside_mask(box_transform(box, SIZE, margin), face.shape)
    assert mean_abs(aligned, direct, mask) < min(2.5, mean_abs(np.roll(direct, 1, axis=0), direct, mask) / 2)


@pytest.mark.parametrize("seed", range(5))
def test_box_square_goes_to_the_output_edges(seed):
    rng = np.random.default_rng(seed)
    x, y, w, h = rng.uniform(0, 50, 2).tolist() + rng.uniform(5, 80, 2).tolist()
    margin, size = rng.uniform(0, 0.5), int(rng.integers(16, 200))
    tform = box_transform((x, y, w, h), size, margin)
    side = max(w, h) * (1 + 2 * margin)
    corners = np.array([[x + w / 2 - side / 2, y + h / 2 - side / 2], [x + w / 2 + side / 2, y + h / 2 + side / 2]])
    np.testing.assert_allclose(tform(corners), [[-0.5, -0.5], [size - 0.5, size - 0.5]], atol=1e-9)


def test_missing_or_degenerate_marks_are_reasons():
    face = np.zeros((40, 30), np.uint8)
    with pytest.raises(ValueError, match="no face landmarks"):
        align_face(face, FaceMarks(box=(1, 1, 5, 5)), AlignConfig(mode="landmarks"))
    with pytest.raises(ValueError, match="no face box"):
        align_face(face, None, AlignConfig(mode="box"))
    with pytest.raises(ValueError, match="degenerate"):
        align_face(face, FaceMarks(landmarks=((3.0, 3.0),) * 5), AlignConfig(mode="landmarks"))
    assert align_face(b"bytes as they are", None, AlignConfig()) == b"bytes as they are"


def _write_table(path, rows):
    columns = ["path", "label", *LANDMARK_COLUMNS]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


@needs_orl
def test_prepare_stores_aligned_crops_from_table_columns(tmp_path):
    points = marked_points()
    rows = []
    for person in (1, 2, 3):
        for image in (1, 2):
            row = {"path": str(ORL / f"s{person}" / f"{image}.pgm"), "label": f"s{person}"}
            row.update(zip(LANDMARK_COLUMNS, points.ravel().tolist(), strict=True))
            rows.append(row)
    rows[-1].update(dict.fromkeys(LANDMARK_COLUMNS, ""))  # a face without landmarks
    _write_table(tmp_path / "faces.csv", rows)
    config = prepare_config(
        tmp_path / "faces.csv",
        tmp_path / "out",
        split={"mode": "sample", "train_fraction": 1.0},
        image={"align": {"mode": "landmarks"}},
    )
    manifest = write_shards(config)
    assert manifest["counts"]["written"] == 5 and manifest["counts"]["rejected"] == 1
    assert "no face landmarks" in manifest["rejected"][0]["reason"]
    expected = warp_face(orl_face(1, 1), landmark_transform(points, SIZE), SIZE)
    stored = {
        json.loads(s["json"])["source"]: np.asarray(Image.open(io.BytesIO(s["png"])))
        for s in all_samples(tmp_path / "out")
    }
    assert all(image.shape == (SIZE, SIZE) for image in stored.values())
    np.testing.assert_array_equal(stored[rows[0]["path"]], expected)  # PNG: lossless
    rows[0]["lm_x1"] = float(rows[0]["lm_x1"]) + 1  # moved marks: the old crops must not be resumed
    _write_table(tmp_path / "faces.csv", rows)
    with pytest.raises(DataError, match="different source/config"):
        write_shards(config, resume=True)


@pytest.mark.parametrize("table", ["faces.csv", "faces.parquet"])
def test_marks_are_read_from_csv_and_parquet_and_a_non_number_rejects_the_row(tmp_path, table):
    import pyarrow as pa
    import pyarrow.parquet as pq

    Image.new("L", (40, 50), 128).save(tmp_path / "a.png")
    good = {"path": "a.png", "label": "x", **{c: str(10 + i) for i, c in enumerate(LANDMARK_COLUMNS)}}
    bad = {**good, "path": "b.png", "lm_y3": "nose?"}
    if table.endswith(".csv"):
        _write_table(tmp_path / table, [good, bad])
    else:
        pq.write_table(pa.Table.from_pylist([good, bad]), tmp_path / table)
    config = prepare_config(tmp_path / table, tmp_path / "out", split={"mode": "sample", "train_fraction": 1.0})
    records = open_source("auto", str(tmp_path / table)).records()
    assert records[0].face == FaceMarks(landmarks=tuple((10.0 + i, 11.0 + i) for i in range(0, 10, 2)))
    assert records[1].rejection.code == "bad_row" and "face column lm_y3 is not a number" in records[1].rejection.reason
    manifest = write_shards(config)
    assert manifest["counts"]["written"] == 1 and manifest["counts"]["rejected"] == 1
