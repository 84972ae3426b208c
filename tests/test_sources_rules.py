"""`dml prepare` input rules: every path of a folder and every row of a table is written or
rejected with a reason; links, hidden entries, duplicates, encodings and source split values."""

from __future__ import annotations

import codecs
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import image_bytes
from dml.cli import main
from dml.config import DMLConfig, PrepareConfig
from dml.data.folder_listing import rule_for_name
from dml.data.manifest import load_manifest
from dml.data.plan import SPLITS
from dml.data.shards import write_shards
from dml.data.sources import FolderSource
from dml.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg")


def config_for(source: Path, out: Path, **overrides) -> PrepareConfig:
    data = {
        "source": {"path": str(source)},
        "output_dir": str(out),
        "shards": {"max_samples": 4},
        "split": {"mode": "sample", "train_fraction": 0.5},
    }
    data.update(overrides)
    return DMLConfig.model_validate({"prepare": data}).prepare


def put_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, size=(6, 5), fmt="JPEG" if path.suffix == ".jpg" else "PNG"))
    return path


def written_samples(out: Path) -> list[dict]:
    """Every written sample's metadata (source, label, split), read straight from the tars."""
    manifest = load_manifest(out)
    metas = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        data = tar.extractfile(member)
                        assert data is not None, member.name  # shards hold regular files only
                        metas.append(json.loads(data.read()))
    return metas


def assert_accounted(manifest: dict, out: Path) -> list[dict]:
    written = written_samples(out)
    c = manifest["counts"]
    assert c["inputs"] == c["written"] + c["rejected"] == len(written) + len(manifest["rejected"])
    assert sum(c["rejected_by_code"].values()) == c["rejected"]
    assert all(r["reason"] and r["code"] for r in manifest["rejected"])
    return written


# ---------------------------------------------------------------- folder sources


def make_awkward_tree(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Each case seen by a user; returns the source root and the expected code per rejected path."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    for i, rel in enumerate(
        [
            "cat/a.png",
            "cat/b.jpg",
            "dog/c.png",
            "stray.png",
            ".ipynb_checkpoints/d.png",
            "cat/.ipynb_checkpoints/e.png",
            "__MACOSX/cat/._a.png",
        ]
    ):
        put_image(src / rel, i)
    put_image(outside / "more" / "f.png", 10)
    put_image(outside / "more" / "g.png", 11)
    (src / "cat" / ".DS_Store").write_bytes(b"\0")
    (src / "dog" / "Thumbs.db").write_bytes(b"\0")
    (src / "dog" / "readme.txt").write_text("notes")
    (src / "dog" / "more").symlink_to(outside / "more")  # a linked folder inside a class: followed
    (outside / "more" / "back").symlink_to(outside)  # ... whose own loop is not
    (src / "loopclass").symlink_to(".")  # top-level loop
    (src / "alias").symlink_to("cat")  # a second way into the source
    (src / "dog" / "a_again.png").symlink_to(src / "cat" / "a.png")
    os.link(src / "dog" / "c.png", src / "dog" / "c_hard.png")
    (src / "dog" / "gone.png").symlink_to(tmp_path / "nope.png")
    os.mkfifo(src / "dog" / "pipe.png")  # reading it would block forever
    expected = {
        "stray.png": "no_class",
        ".ipynb_checkpoints/d.png": "hidden",
        "cat/.ipynb_checkpoints/e.png": "hidden",
        "cat/.DS_Store": "hidden",
        "__MACOSX/cat/._a.png": "system",
        "dog/Thumbs.db": "system",
        "dog/readme.txt": "not_image",
        "dog/more/back": "link_loop",
        "loopclass": "link_loop",
        "alias": "link_inside",
        "dog/a_again.png": "duplicate",
        "dog/c_hard.png": "duplicate",
        "dog/gone.png": "broken_link",
        "dog/pipe.png": "not_regular",
    }
    return src, expected


def test_folder_rules_write_or_name_every_path(tmp_path):
    src, expected = make_awkward_tree(tmp_path)
    manifest = write_shards(config_for(src, tmp_path / "out"))
    written = assert_accounted(manifest, tmp_path / "out")
    assert sorted(m["source"] for m in written) == [
        "cat/a.png",
        "cat/b.jpg",
        "dog/c.png",
        "dog/more/f.png",
        "dog/more/g.png",
    ]
    assert manifest["classes"] == ["cat", "dog"]  # no hidden, looped or aliased class
    assert {r["source"]: r["code"] for r in manifest["rejected"]} == expected
    assert manifest["counts"]["inputs"] == 5 + len(expected)
    reasons = {r["source"]: r["reason"] for r in manifest["rejected"]}
    assert "cat/a.png" in reasons["dog/a_again.png"] and "dog/c.png" in reasons["dog/c_hard.png"]
    assert all(r["key"] is None for r in manifest["rejected"])


def _random_tree(rng: np.random.Generator, root: Path, outside: Path) -> None:
    """A random tree: nested class folders, hidden and system entries, stray files, and links
    to files, to folders inside and outside, to enclosing folders (loops) and to nothing."""
    names = ["a", "b", "c", "sub", "a", "b", ".hidden", "Thumbs.db", "__MACOSX"]
    dirs, files = [root], []
    for _ in range(rng.integers(2, 9)):
        parent = dirs[rng.integers(len(dirs))]
        if len(parent.relative_to(root).parts) < 3:
            name = names[rng.integers(len(names))]
            child = parent / (name if rule_for_name(name) == "system" else f"{name}{rng.integers(3)}")
            child.mkdir(exist_ok=True)
            dirs.append(child)
    outside.mkdir()
    dirs.append(outside)
    for i in range(rng.integers(3, 15)):
        folder = dirs[rng.integers(len(dirs))]
        name = ["img{}.png", ".img{}.png", "notes{}.txt", "img{}.jpg"][rng.integers(4)].format(i)
        files.append(put_image(folder / name, i) if name.endswith(IMAGE_SUFFIXES) else folder / name)
        files[-1].write_bytes(files[-1].read_bytes() if files[-1].exists() else b"text")
    put_image(outside / "always.png", 99)  # a followed outside folder is never empty
    for i in range(rng.integers(1, 7)):
        where = dirs[rng.integers(len(dirs))]
        targets = dirs + files + [outside, outside, root.parent, root / "missing.png"]
        target = targets[rng.integers(len(targets))]
        link = where / f"link{i}{target.suffix}"
        if not link.exists() and not link.is_symlink():
            link.symlink_to(target)


@pytest.mark.parametrize("seed", range(40))
def test_random_trees_name_every_path_once(tmp_path, seed):
    rng = np.random.default_rng(seed)
    src = tmp_path / "src"
    src.mkdir()
    _random_tree(rng, src, tmp_path / "outside")
    try:
        manifest = write_shards(config_for(src, tmp_path / "out"))
    except DataError as exc:  # only a tree with no usable image may stop the run
        assert "no usable inputs" in str(exc) or "source is empty" in str(exc), exc
        listed = FolderSource(src).records()
        assert all(r.rejection for r in listed)
        written, rejected = [], [r.source_id for r in listed]
    else:
        written = assert_accounted(manifest, tmp_path / "out")
        rejected = [r["source"] for r in manifest["rejected"]]
    names = [m["source"] for m in written] + rejected
    assert len(names) == len(set(names)), f"seed {seed}: a path is named twice"
    assert all(os.path.lexists(src / n) for n in names)
    # Every entry of the tree, walked without following links, is named, or is a followed link
    # to a folder whose files are named under it.
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = Path(dirpath).relative_to(src)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = str(rel_dir / name) if str(rel_dir) != "." else name
            assert rel in names or any(n.startswith(rel + os.sep) for n in names), f"seed {seed}: {rel} lost"
    # No file is written twice (through links, loops or hard links), and every real image file in
    # a visible class folder is written exactly once.
    inodes = Counter(os.stat(src / m["source"]).st_ino for m in written)
    assert max(inodes.values(), default=1) == 1, f"seed {seed}: a file was written twice"
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        visible = not any(rule_for_name(part) for part in rel.parts)
        if (
            visible
            and len(rel.parts) >= 2
            and path.suffix in IMAGE_SUFFIXES
            and not any(p.is_symlink() for p in [path, *path.parents])
        ):
            assert inodes[path.stat().st_ino] == 1, f"seed {seed}: {rel} not written"


# ---------------------------------------------------------------- tables


def test_csv_bad_rows_and_duplicates_are_rejected_with_their_line(tmp_path):
    for i, rel in enumerate(
        ["cat/a.png", "cat/b.png", "cat/c.png", "cat/d.png", "dog/e.png", "dog/f.png", "dog/g.png"]
    ):
        put_image(tmp_path / rel, i)
    lines = [
        "path,label,split",  # 1
        "cat/a.png,cat,train",  # 2 kept
        "cat/b.png,,train",  # 3 empty label
        "cat/c.png,cat",  # 4 short row
        "cat/d.png,cat,train,x",  # 5 long row
        ",cat,train",  # 6 empty path
        "",  # 7 blank line: not a row
        "cat/a.png,cat,train",  # 8 duplicate of line 2
        "./dog/e.png,dog,train",  # 9 kept
        "dog/e.png,dog,train",  # 10 duplicate of line 9 (same file, other spelling)
        "dog/f.png,dog,train",  # 11 conflict
        "dog/f.png,cat,train",  # 12 conflict
        "dog/g.png,dog,train",
    ]  # 13 kept
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    manifest = write_shards(config_for(tmp_path / "list.csv", tmp_path / "out"))
    written = assert_accounted(manifest, tmp_path / "out")
    assert sorted(m["source"] for m in written) == ["./dog/e.png", "cat/a.png", "dog/g.png"]
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["counts"]["inputs"] == 11  # data rows; the blank line is none
    got = {r["row"]: (r["code"], r["reason"]) for r in manifest["rejected"]}
    assert {row: code for row, (code, _) in got.items()} == {
        3: "bad_row",
        4: "bad_row",
        5: "bad_row",
        6: "bad_row",
        8: "duplicate",
        10: "duplicate",
        11: "label_conflict",
        12: "label_conflict",
    }
    assert got[3][1] == "empty label" and got[6][1] == "empty path"
    assert got[4][1].startswith("short row") and got[5][1].startswith("long row")
    assert "line 2" in got[8][1] and "line 9" in got[10][1]
    assert "'dog'" in got[12][1] and "'cat'" in got[12][1]


def test_parquet_nulls_and_float_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(5):
        put_image(tmp_path / f"{i}.png", i)
    table = pa.table(
        {"path": ["0.png", "1.png", None, "3.png", "4.png", "0.png"], "label": [1.0, 2.0, 1.0, float("nan"), None, 1.0]}
    )
    pq.write_table(table, tmp_path / "list.parquet")
    manifest = write_shards(config_for(tmp_path / "list.parquet", tmp_path / "out"))
    written = assert_accounted(manifest, tmp_path / "out")
    assert manifest["classes"] == ["1", "2"]  # integral floats read as integers; no 'None' or 'nan' class
    assert sorted(m["source"] for m in written) == ["0.png", "1.png"]
    assert {r["row"]: r["reason"] for r in manifest["rejected"]} == {
        2: "null path",
        3: "null label",
        4: "null label",
        5: "same path as row 0, already an input",
    }


@pytest.mark.parametrize(
    "encoding,delimiter",
    [("utf-8", ","), ("utf-8-sig", ","), ("utf-16", "\t"), ("utf-16-be-bom", ","), ("utf-8", ";"), ("utf-32", ",")],
)
def test_csv_encodings_spreadsheets_write_are_read(tmp_path, encoding, delimiter):
    put_image(tmp_path / "café" / "ü.png", 1)
    put_image(tmp_path / "thé" / "b.png", 2)
    text = (
        "\n".join(delimiter.join(row) for row in [("path", "label"), ("café/ü.png", "café"), ("thé/b.png", "thé")])
        + "\n"
    )
    data = (codecs.BOM_UTF16_BE + text.encode("utf-16-be")) if encoding == "utf-16-be-bom" else text.encode(encoding)
    (tmp_path / "list.csv").write_bytes(data)
    manifest = write_shards(config_for(tmp_path / "list.csv", tmp_path / "out"))
    assert manifest["classes"] == ["café", "thé"] and manifest["counts"]["written"] == 2


@pytest.mark.parametrize(
    "data,message",
    [
        ("path,label\ncaf\xe9.png,caf\xe9\n".encode("cp1252"), "not valid utf-8 text (byte 0xe9 at line 2)"),
        ("path,label\na.png,a\n".encode("utf-16-le"), "UTF-16 without BOM"),
    ],
)
def test_undecodable_tables_are_one_line_errors(tmp_path, capsys, data, message):
    (tmp_path / "list.csv").write_bytes(data)
    code = main(["prepare", f"prepare.source.path={tmp_path / 'list.csv'}", f"prepare.output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and message in err and "list.csv" in err


def test_parquet_that_is_not_parquet_is_one_line(tmp_path, capsys):
    (tmp_path / "list.parquet").write_text("path,label\na.png,a\n")
    code = main(["prepare", f"prepare.source.path={tmp_path / 'list.parquet'}", f"prepare.output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "not a readable Parquet file" in err


# ---------------------------------------------------------------- split.mode source


@pytest.mark.parametrize("seed", range(3))
def test_source_split_values_are_honoured_as_given(tmp_path, seed):
    rng = np.random.default_rng(seed)
    values = ["train", "query", "gallery", "test", "Query", "val", ""]
    lines, given = ["path,label,split"], {}
    for i in range(40):
        rel, value = f"c{i % 4}/{i}.png", values[rng.integers(len(values))]
        put_image(tmp_path / rel, i)
        lines.append(f"{rel},c{i % 4},{value}")
        given[rel] = (len(lines), value.lower())
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    manifest = write_shards(config_for(tmp_path / "list.csv", tmp_path / "out", split={"mode": "source"}))
    written = assert_accounted(manifest, tmp_path / "out")
    for meta in written:
        value = given[meta["source"]][1]
        assert meta["split"] == value if value in SPLITS else value == "test" and meta["split"] in ("query", "gallery")
    bad = {rel: row for rel, (row, value) in given.items() if value not in (*SPLITS, "test")}
    assert {r["source"]: r["row"] for r in manifest["rejected"]} == bad
    assert all(r["code"] == "bad_split" for r in manifest["rejected"])
    assert {r["reason"] for r in manifest["rejected"]} <= {
        "no split value",
        "split value 'val' is not one of train, query, gallery, test",
    }


def test_source_split_without_a_split_column_is_one_line(tmp_path, capsys):
    put_image(tmp_path / "src" / "a" / "1.png")
    code = main(
        [
            "prepare",
            f"prepare.source.path={tmp_path / 'src'}",
            f"prepare.output_dir={tmp_path / 'o'}",
            "prepare.split.mode=source",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "needs a split column" in err


# ---------------------------------------------------------------- partitions, merge, resume, verify


def test_listing_rejections_survive_partitions_merge_and_resume(tmp_path):
    src, expected = make_awkward_tree(tmp_path)
    single = write_shards(config_for(src, tmp_path / "single"))
    parts = config_for(src, tmp_path / "parts")
    partials = [write_shards(parts, partition=(i, 3)) for i in range(3)]
    assert [len(p["rejected"]) for p in partials] == [len(expected), 0, 0]  # named once, by partition 0
    assert main(["prepare", "--merge", str(tmp_path / "parts")]) == 0
    merged = load_manifest(tmp_path / "parts")
    single["config"]["output_dir"] = merged["config"]["output_dir"]
    assert merged == single
    resumed = write_shards(config_for(src, tmp_path / "single"), resume=True)
    assert resumed["rejected"] == single["rejected"] and resumed["counts"] == single["counts"]
    assert main(["prepare", "--verify", str(tmp_path / "single")]) == 0
