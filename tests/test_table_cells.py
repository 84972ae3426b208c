"""Table cells become paths and class names as written: surrounding spaces do not make a new
class, binary Parquet paths are file names, integral floats/decimals are integers, and a
Parquet column type that is no path or label stops the run in one line naming file and column."""

from __future__ import annotations

import decimal
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import image_bytes
from dml.cli import main


def _images(root: Path, count: int) -> list[str]:
    (root / "img").mkdir(parents=True)
    for i in range(count):
        (root / "img" / f"{i}.png").write_bytes(image_bytes(i))
    return [f"img/{i}.png" for i in range(count)]


def _prepare(capsys, table: Path, out: Path) -> tuple[int, dict | None, list[str]]:
    code = main(
        [
            "prepare",
            f"prepare.source.path={table}",
            f"prepare.output_dir={out}",
            "prepare.split.mode=sample",
            "prepare.split.train_fraction=1.0",
        ]
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else None
    return code, manifest, [line for line in err.splitlines() if ": error: " in line]


@pytest.mark.parametrize("seed", range(4))
def test_spaces_around_csv_cells_do_not_change_paths_or_classes(tmp_path, capsys, seed):
    rng = np.random.default_rng(seed)
    paths = _images(tmp_path, 8)
    labels = [str(rng.integers(0, 3)) for _ in paths]
    pad = [[" " * int(n) for n in row] for row in rng.integers(0, 3, (len(paths), 4))]
    rows = [f"{a}{p}{b},{c}{lab}{d}" for p, lab, (a, b, c, d) in zip(paths, labels, pad, strict=True)]
    (tmp_path / "t.csv").write_text("path, label\n" + "\n".join(rows) + "\n")
    code, manifest, errors = _prepare(capsys, tmp_path / "t.csv", tmp_path / "out")
    assert code == 0 and not errors
    assert manifest["counts"]["written"] == 8 and manifest["classes"] == sorted(set(labels), key=int)


# (label column, the class names it must give); each row's path is img/<i>.png
GOOD_LABELS = [
    (pa.array([1, 2, 1], pa.int32()), ["1", "2"]),
    (pa.array([1.0, 2.0, 1.0]), ["1", "2"]),
    (
        pa.array([decimal.Decimal("1.00"), decimal.Decimal("2.00"), decimal.Decimal("1.00")], pa.decimal128(5, 2)),
        ["1", "2"],
    ),
    (pa.array(["a", "b", "a"]).dictionary_encode(), ["a", "b"]),
    (pa.array([" a", "b ", "a"]), ["a", "b"]),
    (pa.array([True, False, True]), ["False", "True"]),
]


@pytest.mark.parametrize("case", range(len(GOOD_LABELS)))
@pytest.mark.parametrize("binary_path", [False, True])
def test_parquet_label_and_path_types_that_are_read(tmp_path, capsys, case, binary_path):
    labels, classes = GOOD_LABELS[case]
    paths = _images(tmp_path, 3)
    column = pa.array([p.encode() for p in paths], pa.binary()) if binary_path else pa.array(paths)
    pq.write_table(pa.table({"path": column, "label": labels}), tmp_path / "t.parquet")
    code, manifest, errors = _prepare(capsys, tmp_path / "t.parquet", tmp_path / "out")
    assert code == 0 and not errors
    assert manifest["counts"]["written"] == 3 and manifest["classes"] == classes


BAD_COLUMNS = [
    ("label", pa.array([[1], [2], [1]])),
    ("label", pa.array([{"a": 1}, {"a": 2}, {"a": 1}])),
    ("label", pa.array([1, 2, 1], pa.timestamp("s"))),
    ("label", pa.array([b"a", b"b", b"a"], pa.binary())),
    ("path", pa.array([0, 1, 2])),
    ("path", pa.array([["img/0.png"], ["img/1.png"], ["img/2.png"]])),
]


@pytest.mark.parametrize("case", range(len(BAD_COLUMNS)))
def test_parquet_columns_of_other_types_are_one_line_errors(tmp_path, capsys, case):
    name, column = BAD_COLUMNS[case]
    columns = {"path": pa.array(_images(tmp_path, 3)), "label": pa.array(["a", "b", "a"]), name: column}
    pq.write_table(pa.table(columns), tmp_path / "t.parquet")
    code, manifest, errors = _prepare(capsys, tmp_path / "t.parquet", tmp_path / "out")
    assert code == 2 and len(errors) == 1 and manifest is None, errors
    assert "t.parquet" in errors[0] and f"column '{name}' has type" in errors[0], errors


@pytest.mark.parametrize("kind", ["csv", "parquet"])
@pytest.mark.parametrize("column", ["path", "label", "split"])
def test_a_column_named_twice_is_a_one_line_error(tmp_path, capsys, kind, column):
    paths = _images(tmp_path, 2)
    names = ["path", "label", "split", column]
    values = [paths, ["a", "b"], ["train", "train"], list(reversed(paths)) if column == "path" else ["b", "a"]]
    table = tmp_path / f"t.{kind}"
    if kind == "csv":
        table.write_text(",".join(names) + "\n" + "".join(",".join(row) + "\n" for row in zip(*values, strict=True)))
    else:
        pq.write_table(pa.Table.from_arrays([pa.array(v) for v in values], names=names), table)
    code, manifest, errors = _prepare(capsys, table, tmp_path / "out")
    assert code == 2 and len(errors) == 1 and manifest is None, errors
    assert table.name in errors[0] and f"column '{column}' appears 2 times" in errors[0], errors


def test_rows_naming_a_fifo_a_folder_or_a_device_are_rejected_not_read(tmp_path):
    import os
    import subprocess
    import sys

    paths = _images(tmp_path, 2)
    os.mkfifo(tmp_path / "img" / "fifo.png")  # reading it blocked the run for ever
    rows = [*paths, "img/fifo.png", "img", "/dev/zero"]  # /dev/zero: read until memory ran out
    (tmp_path / "t.csv").write_text("path,label\n" + "".join(f"{p},{i % 2}\n" for i, p in enumerate(rows)))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dml.cli",
            "prepare",
            f"prepare.source.path={tmp_path / 't.csv'}",
            f"prepare.output_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {r["source"]: r["reason"] for r in manifest["rejected"]}
    assert manifest["counts"]["written"] == 2 and set(reasons) == set(rows[2:])
    assert all(reason.startswith("not a regular file") for reason in reasons.values()), reasons
