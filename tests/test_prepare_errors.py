"""`dml prepare` on bad input: one line naming the file and the problem, a non-zero exit, no
traceback and no `.tmp` left behind; inputs are always written + rejected."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_fixtures import (
    image_bytes,
    make_folder_tree,
    make_idx_dir,
    make_omniglot_dir,
    write_idx,
)
from dml.cli import main
from dml.data.manifest import load_manifest
from small_disk import mounted_tmpfs

LONG_NAME = "n" * 300  # one path component over the 255-byte limit of Linux file systems


def run_prepare(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run `dml prepare` in-process; return its exit code and its `error:` lines."""
    code = main(["prepare", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if ": error: " in line]


def assert_one_line_error(code: int, errors: list[str], *names: str) -> None:
    assert code == 2, errors
    assert len(errors) == 1 and errors[0].startswith("dml prepare: error: "), errors
    for name in names:
        assert name in errors[0], (name, errors[0])


def tmp_files(root: Path) -> list[Path]:
    return list(root.rglob("*.tmp")) if root.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Exit status


@pytest.mark.parametrize("classes,per_class", [(1, 1), (2, 3), (3, 10)])
def test_every_input_rejected_fails_with_one_line(tmp_path, capsys, classes, per_class):
    for c in range(classes):
        (tmp_path / "src" / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (tmp_path / "src" / f"c{c}" / f"{i}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code, errors = run_prepare(capsys, f"prepare.source.path={tmp_path / 'src'}", f"prepare.output_dir={out}")
    n = classes * per_class
    assert_one_line_error(code, errors, f"all {n} inputs were rejected", "c0/0.jpg", str(out / "manifest.json"))
    counts = load_manifest(out)["counts"]  # the reasons stay readable in the manifest
    assert counts["inputs"] == n == counts["rejected"] and counts["written"] == 0
    assert not tmp_files(out)


@pytest.mark.parametrize("classes,fraction", [(2, 0.2), (3, 0.1), (7, 0.05)])
def test_class_split_without_training_class_warns(tmp_path, capsys, caplog, classes, fraction):
    assert round(classes * fraction) == 0  # the split draws no training class
    make_folder_tree(tmp_path / "src", classes=classes, per_class=4, bad=False)
    with caplog.at_level(logging.WARNING, logger="dml"):
        code, _ = run_prepare(
            capsys,
            f"prepare.source.path={tmp_path / 'src'}",
            f"prepare.output_dir={tmp_path / 'out'}",
            f"prepare.split.train_fraction={fraction}",
        )
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no train samples" in w and f"{classes} classes" in w for w in warnings), warnings


def test_split_with_training_classes_does_not_warn(tmp_path, capsys, caplog):
    make_folder_tree(tmp_path / "src", classes=4, per_class=4, bad=False)
    with caplog.at_level(logging.WARNING, logger="dml"):
        code, _ = run_prepare(
            capsys, f"prepare.source.path={tmp_path / 'src'}", f"prepare.output_dir={tmp_path / 'out'}"
        )
    assert code == 0 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------
# Broken inputs of every reader kind: one line naming the file


def _table(root: Path, rows: list[tuple[str, str]]) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, _) in enumerate(rows):
        if not name.startswith("/") and len(name) < 200:
            (root / name).write_bytes(image_bytes(i))
    return [{"path": p, "label": label} for p, label in rows]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.write_text("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows))
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _idx(root: Path, images: np.ndarray, labels: np.ndarray, gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{suffix}", images, gz)
    write_idx(root / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    return root


def _npz(root: Path, **arrays: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "images_background.npz", **arrays)
    return root


def broken_sources(tmp: Path) -> list[tuple[str, Path, str, str]]:
    """(case, source path, kind, text the error must contain) for inputs every reader meets."""
    rng = np.random.default_rng(0)
    good_rows = _table(tmp / "imgs", [(f"{i}.png", str(i % 2)) for i in range(4)])
    (tmp / "a_file.txt").write_text("x")
    cases = [
        ("folder given a file", tmp / "a_file.txt", "folder", "a_file.txt is a file"),
        ("idx given a file", tmp / "a_file.txt", "idx", "a_file.txt is a file"),
        ("omniglot given a file", tmp / "a_file.txt", "omniglot", "a_file.txt is a file"),
        ("csv given a folder", tmp / "imgs", "csv", "is a folder"),
        ("source name over 255 bytes", tmp / LONG_NAME, "auto", "File name too long"),
    ]
    # CSV / Parquet tables
    (tmp / "binary.csv").write_bytes(bytes(rng.integers(128, 256, 400, dtype=np.uint8)))
    (tmp / "nul.csv").write_bytes(b"path,label\n\0a.png,1\n")
    (tmp / "cols.csv").write_text("file,class\na.png,1\n")
    (tmp / "text.parquet").write_text("path,label\na.png,1\n")
    (tmp / "empty.parquet").write_bytes(b"")
    valid = _write_parquet(tmp / "imgs" / "valid.parquet", good_rows).read_bytes()
    (tmp / "cut.parquet").write_bytes(valid[: len(valid) // 2])
    _write_parquet(tmp / "cols.parquet", [{"file": "a.png", "class": "1"}])
    cases += [
        ("csv of binary bytes", tmp / "binary.csv", "csv", "binary.csv"),
        ("csv with a NUL byte", tmp / "nul.csv", "csv", "nul.csv"),
        ("csv without path/label", tmp / "cols.csv", "csv", "cols.csv"),
        (".parquet that is text", tmp / "text.parquet", "parquet", "text.parquet"),
        ("empty .parquet", tmp / "empty.parquet", "parquet", "empty.parquet"),
        ("truncated .parquet", tmp / "cut.parquet", "parquet", "cut.parquet"),
        ("parquet without path/label", tmp / "cols.parquet", "parquet", "cols.parquet"),
    ]
    # IDX pairs
    images, labels = rng.integers(0, 256, (6, 8, 8)), np.arange(6) % 3
    cases += [
        (
            "idx with more labels than images",
            _idx(tmp / "idx_more", images, np.arange(9) % 3),
            "idx",
            "train-images-idx3-ubyte",
        ),
        (
            "idx with fewer labels than images",
            _idx(tmp / "idx_fewer", images, labels[:4]),
            "idx",
            "train-images-idx3-ubyte",
        ),
        ("idx with 2-D labels", _idx(tmp / "idx_2d", images, labels.reshape(2, 3)), "idx", "train-images-idx3-ubyte"),
        (
            "idx with 2-D images",
            _idx(tmp / "idx_flat", images.reshape(6, 64), labels),
            "idx",
            "train-images-idx3-ubyte",
        ),
    ]
    bad_magic = _idx(tmp / "idx_magic", images, labels)
    (bad_magic / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04garbage")
    cut_images = _idx(tmp / "idx_cut", images, labels)
    data = (cut_images / "train-images-idx3-ubyte").read_bytes()
    (cut_images / "train-images-idx3-ubyte").write_bytes(data[: len(data) - 20])
    not_gz = _idx(tmp / "idx_notgz", images, labels, gz=True)
    (not_gz / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip")
    cut_gz = _idx(tmp / "idx_cutgz", images, labels, gz=True)
    data = (cut_gz / "train-images-idx3-ubyte.gz").read_bytes()
    (cut_gz / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    empty_labels = _idx(tmp / "idx_empty", images, labels)
    (empty_labels / "train-labels-idx1-ubyte").write_bytes(b"")
    cases += [
        ("idx with a bad magic number", bad_magic, "idx", "train-labels-idx1-ubyte"),
        ("idx images cut short", cut_images, "idx", "train-images-idx3-ubyte"),
        ("idx .gz that is not gzip", not_gz, "idx", "train-labels-idx1-ubyte.gz"),
        ("idx .gz cut short", cut_gz, "idx", "train-images-idx3-ubyte.gz"),
        ("idx empty labels file", empty_labels, "idx", "train-labels-idx1-ubyte"),
    ]
    # Omniglot npz
    strokes, classes = rng.random((3, 4, 12, 12)) > 0.5, np.repeat(np.arange(3)[:, None], 4, axis=1)
    not_zip = tmp / "npz_notzip"
    not_zip.mkdir()
    (not_zip / "images_background.npz").write_bytes(b"PK\x03\x04 not really a zip")
    cut_zip = _npz(tmp / "npz_cut", images=strokes, labels=classes)
    data = (cut_zip / "images_background.npz").read_bytes()
    (cut_zip / "images_background.npz").write_bytes(data[: len(data) // 2])
    cases += [
        ("npz without labels", _npz(tmp / "npz_nolabels", images=strokes), "omniglot", "'labels'"),
        ("npz without images", _npz(tmp / "npz_noimages", labels=classes), "omniglot", "'images'"),
        (
            "npz shapes that disagree",
            _npz(tmp / "npz_shape", images=strokes, labels=classes[:2]),
            "omniglot",
            "do not match",
        ),
        ("npz 3-D images", _npz(tmp / "npz_3d", images=strokes[:, 0], labels=classes), "omniglot", "do not match"),
        (
            "npz of pickled objects",
            _npz(tmp / "npz_obj", images=np.array([None, 1], dtype=object), labels=classes),
            "omniglot",
            "images_background.npz",
        ),
        ("npz that is not a zip", not_zip, "omniglot", "images_background.npz"),
        ("npz cut short", cut_zip, "omniglot", "images_background.npz"),
    ]
    return cases


def test_broken_sources_of_every_kind_are_one_line_errors(tmp_path, capsys):
    cases = broken_sources(tmp_path / "inputs")
    assert {kind for _, _, kind, _ in cases} >= {"folder", "csv", "parquet", "idx", "omniglot"}
    for i, (case, source, kind, expected) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, errors = run_prepare(
            capsys,
            f"prepare.source.path={source}",
            f"prepare.source.kind={kind}",
            f"prepare.output_dir={out}",
            "prepare.workers=2",
        )
        assert code == 2 and len(errors) == 1, (case, errors)
        assert expected in errors[0], (case, errors[0])
        assert not tmp_files(out), case


@pytest.mark.parametrize("kind", ["csv", "parquet", "idx", "idx.gz", "omniglot"])
def test_fuzzed_source_files_never_give_a_traceback(tmp_path, capsys, kind):
    """Cut and flip bytes of a valid source file at seeded places: every run either prepares
    (inputs = written + rejected) or fails with one line; never a traceback or a `.tmp`."""
    src = tmp_path / "src"
    if kind in ("csv", "parquet"):
        rows = _table(src, [(f"{i}.png", str(i % 3)) for i in range(9)])
        target = (_write_csv if kind == "csv" else _write_parquet)(src / f"table.{kind}", rows)
    elif kind.startswith("idx"):
        make_idx_dir(src, gz=kind.endswith(".gz"), n_train=12, n_test=6, classes=3)
        target = sorted(src.glob("train-images-*"))[0]
    else:
        make_omniglot_dir(src, classes=(3, 2), per_class=3)
        target = src / "images_background.npz"
    original = target.read_bytes()
    rng = np.random.default_rng(len(kind))
    variants = [original[:cut] for cut in sorted(rng.integers(0, len(original), 6))]
    for pos in rng.integers(0, len(original), 6):
        flipped = bytearray(original)
        flipped[pos] ^= 0xFF
        variants.append(bytes(flipped))
    source = target if kind in ("csv", "parquet") else src
    for i, data in enumerate(variants):
        target.write_bytes(data)
        out = tmp_path / f"out{i}"
        code, errors = run_prepare(capsys, f"prepare.source.path={source}", f"prepare.output_dir={out}")
        assert code in (0, 2) and len(errors) == (code == 2), (i, errors)
        if code == 0:
            counts = load_manifest(out)["counts"]
            assert counts["inputs"] == counts["written"] + counts["rejected"] > 0
        assert not tmp_files(out), i


def test_table_row_with_a_path_over_255_bytes_is_rejected_with_its_reason(tmp_path, capsys):
    rows = _table(tmp_path / "src", [("0.png", "a"), ("1.png", "b"), (LONG_NAME + ".png", "a")])
    table = _write_csv(tmp_path / "src" / "table.csv", rows)
    code, _ = run_prepare(capsys, f"prepare.source.path={table}", f"prepare.output_dir={tmp_path / 'out'}")
    manifest = load_manifest(tmp_path / "out")
    assert code == 0 and manifest["counts"] == {**manifest["counts"], "inputs": 3, "written": 2, "rejected": 1}
    assert "File name too long" in manifest["rejected"][0]["reason"]


def test_bad_output_paths_are_one_line_errors(tmp_path, capsys):
    make_folder_tree(tmp_path / "src", classes=2, per_class=3, bad=False)
    (tmp_path / "a_file").write_text("x")
    for out, expected in [
        (tmp_path / "a_file", "a_file is a file, not a folder"),
        (tmp_path / "a_file" / "below", "Not a directory"),
        (tmp_path / LONG_NAME, "File name too long"),
    ]:
        code, errors = run_prepare(capsys, f"prepare.source.path={tmp_path / 'src'}", f"prepare.output_dir={out}")
        assert_one_line_error(code, errors, out.name, expected)
    assert not tmp_files(tmp_path)


def test_verify_refuses_manifests_not_written_by_prepare(tmp_path, capsys):
    ours = tmp_path / "ours"
    make_folder_tree(tmp_path / "src", classes=2, per_class=3, bad=False)
    assert run_prepare(capsys, f"prepare.source.path={tmp_path / 'src'}", f"prepare.output_dir={ours}")[0] == 0
    real = json.loads((ours / "manifest.json").read_text())
    foreign = [
        b"\x89PNG binary",
        b"[1, 2]",
        b"{}",
        b'{"splits": {}}',
        json.dumps({**real, "created_by": "x"}).encode(),
        json.dumps({**real, "format_version": 99}).encode(),
        json.dumps({**real, "splits": {"train": {"shards": [{"name": "a.tar"}]}}}).encode(),
        json.dumps({**real, "splits": {"train": [1]}}).encode(),
    ]
    for i, text in enumerate(foreign):
        folder = tmp_path / f"foreign{i}"
        folder.mkdir()
        (folder / "manifest.json").write_bytes(text)
        code, errors = run_prepare(capsys, "--verify", str(folder))
        assert_one_line_error(code, errors, str(folder / "manifest.json"))


# ---------------------------------------------------------------------------------------------
# Disk full, for real: a 256 KiB tmpfs


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "small_disk", "256k") as mount_point:
        yield mount_point


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_is_one_line_naming_the_file(tmp_path, capsys, small_disk, workers):
    src = tmp_path / "src"
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(8):  # ~30 KiB each: 480 KiB do not fit in 256 KiB
            (src / f"c{c}" / f"{i}.png").write_bytes(image_bytes(c * 10 + i, size=(100, 100)))
    out = small_disk / "out"
    code, errors = run_prepare(
        capsys,
        f"prepare.source.path={src}",
        f"prepare.output_dir={out}",
        f"prepare.workers={workers}",
        "prepare.shards.max_samples=3",
        "prepare.split.mode=sample",
    )
    assert_one_line_error(code, errors, str(out), "No space left on device")
    assert not tmp_files(small_disk)
