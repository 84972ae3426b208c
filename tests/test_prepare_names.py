"""Names `dml prepare` cannot carry, and an output folder it would list as input: a path or
class whose bytes are not UTF-8 is rejected as ``bad_name`` (it was a UnicodeEncodeError
traceback), and an output folder inside a folder source is refused before anything is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import image_bytes
from dml.cli import main

LATIN1 = "é ÿ ß".encode("latin-1")  # how another system's tools may have written these names


def _run(capsys, source: Path, out: Path) -> tuple[int, list[str]]:
    code = main(["prepare", f"prepare.source.path={source}", f"prepare.output_dir={out}", "prepare.split.mode=sample"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if ": error: " in line]


@pytest.mark.parametrize("where", ["file", "class", "deep folder"])
@pytest.mark.parametrize("count", [1, 3])
def test_names_that_are_not_utf8_are_rejected_and_counted(tmp_path, capsys, where, count):
    root = os.fsencode(tmp_path / "src")
    for c in range(2):
        os.makedirs(os.path.join(root, b"c%d" % c))
        for i in range(3):
            Path(os.fsdecode(os.path.join(root, b"c%d" % c, b"%d.png" % i))).write_bytes(image_bytes(i))
    for n in range(count):
        part = LATIN1 + b"%d" % n
        folder = {"file": [b"c0"], "class": [part], "deep folder": [b"c1", part]}[where]
        name = part + b".png" if where == "file" else b"x.png"
        os.makedirs(os.path.join(root, *folder), exist_ok=True)
        Path(os.fsdecode(os.path.join(root, *folder, name))).write_bytes(image_bytes(n))
    code, errors = _run(capsys, tmp_path / "src", tmp_path / "out")
    assert code == 0 and not errors
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["inputs"] == 6 + count == counts["written"] + counts["rejected"]
    assert counts["rejected_by_code"] == {"bad_name": count} and counts["written"] == 6
    assert manifest["classes"] == ["c0", "c1"]


def test_a_binary_parquet_path_that_is_not_utf8_is_a_bad_name(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    names = [b"a.png", LATIN1 + b".png"]
    for i, name in enumerate(names):
        Path(os.fsdecode(os.fsencode(tmp_path / "img") + b"/" + name)).write_bytes(image_bytes(i))
    paths = pa.array([b"img/" + name for name in names], pa.binary())
    pq.write_table(pa.table({"path": paths, "label": ["a", "a"]}), tmp_path / "t.parquet")
    code, errors = _run(capsys, tmp_path / "t.parquet", tmp_path / "out")
    assert code == 0 and not errors
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert counts["written"] == 1 and counts["rejected_by_code"] == {"bad_name": 1}


@pytest.mark.parametrize("inside", ["out", "c0/out", "deep/er/out", "."])
def test_an_output_folder_inside_the_image_folder_is_refused(tmp_path, capsys, inside, monkeypatch):
    for c in range(2):
        (tmp_path / "src" / f"c{c}").mkdir(parents=True)
        (tmp_path / "src" / f"c{c}" / "0.png").write_bytes(image_bytes(c))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path / "src")  # a relative output_dir counts from here
    code, errors = _run(capsys, Path("."), Path(inside))
    assert code == 2 and len(errors) == 1 and "is inside the image folder" in errors[0], errors
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
