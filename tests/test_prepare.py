"""`dml prepare`: sources round trip, bad input accounting, determinism, partitions, verify."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import SHARED_DATA, make_folder_tree, make_idx_dir, make_omniglot_dir
from dml.cli import main
from dml.config import DMLConfig, PrepareConfig
from dml.data.manifest import load_manifest
from dml.data.shards import write_shards
from dml.errors import DataError


def prepare_config(source: Path, out: Path, **overrides) -> PrepareConfig:
    data = {"source": {"path": str(source)}, "output_dir": str(out), "shards": {"max_samples": 5}}
    for key, value in overrides.items():
        data[key] = value
    return DMLConfig.model_validate({"prepare": data}).prepare


def read_split(out: Path, split: str) -> list[dict]:
    """Read every sample of a split straight from the tars (independent of webdataset)."""
    manifest = load_manifest(out)
    samples: dict[str, dict] = {}
    for shard in manifest["splits"].get(split, {"shards": []})["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member)
                assert data is not None, member.name  # shards hold regular files only
                samples.setdefault(key, {"key": key})[ext] = data.read()
    return list(samples.values())


def all_samples(out: Path) -> list[dict]:
    return [s for split in ("train", "query", "gallery") for s in read_split(out, split)]


def test_folder_round_trip_and_rejections(tmp_path):
    counts = make_folder_tree(tmp_path / "src")
    manifest = write_shards(prepare_config(tmp_path / "src", tmp_path / "out"))
    c = manifest["counts"]
    assert c["inputs"] == counts["good"] + counts["bad"] == c["written"] + c["rejected"]
    assert c["rejected"] == counts["bad"]
    reasons = {Path(r["source"]).name: r["reason"] for r in manifest["rejected"]}
    assert "zero-size" in reasons["empty.png"]
    assert "corrupt" in reasons["garbage.jpg"] and "corrupt" in reasons["truncated.jpg"]
    assert "extension" in reasons["notes.txt"]
    assert "No such file" in reasons["dangling.png"]  # a broken link is reported, not skipped
    samples = all_samples(tmp_path / "out")
    assert len(samples) == counts["good"]
    for s in samples:
        meta = json.loads(s["json"])
        assert manifest["classes"][int(s["cls"])] == meta["label"] == meta["source"].split("/")[0]
        image_ext = "jpg" if "jpg" in s else "png"
        # JPEG and PNG inputs are kept byte-for-byte; PGM is re-encoded as PNG.
        original = (tmp_path / "src" / meta["source"]).read_bytes()
        assert (s[image_ext] == original) == (not meta["source"].endswith(".pgm"))
        Image.open(io.BytesIO(s[image_ext])).load()


def test_class_split_is_zero_shot(tmp_path):
    make_folder_tree(tmp_path / "src", classes=6, per_class=6, bad=False)
    config = prepare_config(tmp_path / "src", tmp_path / "out", split={"mode": "class", "train_fraction": 0.5})
    manifest = write_shards(config)
    train = set(manifest["splits"]["train"]["class_counts"])
    query = set(manifest["splits"]["query"]["class_counts"])
    gallery = set(manifest["splits"]["gallery"]["class_counts"])
    assert len(train) == 3 and not train & query and query == gallery
    assert manifest["splits"]["query"]["count"] == manifest["splits"]["gallery"]["count"] == 9


def test_sample_split_keeps_every_class_everywhere(tmp_path):
    make_folder_tree(tmp_path / "src", classes=3, per_class=8, bad=False)
    config = prepare_config(
        tmp_path / "src", tmp_path / "out", split={"mode": "sample", "train_fraction": 0.5, "query_fraction": 1.0}
    )
    manifest = write_shards(config)
    assert set(manifest["splits"]) == {"train", "query"}
    assert manifest["splits"]["train"]["class_counts"] == {"0": 4, "1": 4, "2": 4}
    assert manifest["splits"]["query"]["class_counts"] == {"0": 4, "1": 4, "2": 4}


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_table_sources_use_split_column(tmp_path, kind):
    make_folder_tree(tmp_path / "src", classes=3, per_class=4, bad=False)
    rows = [
        {
            "path": str(p.relative_to(tmp_path / "src")),
            "label": p.parent.name,
            "split": "train" if p.parent.name != "class_2" else "test",
        }
        for p in sorted((tmp_path / "src").rglob("*.*"))
    ]
    table = tmp_path / "src" / f"list.{kind}"
    if kind == "csv":
        table.write_text("path,label,split\n" + "".join(f"{r['path']},{r['label']},{r['split']}\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    config = prepare_config(table, tmp_path / "out", split={"mode": "source", "query_fraction": 0.5})
    manifest = write_shards(config)
    assert manifest["source"]["kind"] == kind
    assert manifest["splits"]["train"]["count"] == 8
    assert manifest["splits"]["query"]["count"] + manifest["splits"]["gallery"]["count"] == 4
    assert manifest["splits"]["query"]["class_counts"] == {"2": 2}


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    make_idx_dir(tmp_path / "idx", gz=gz)
    config = prepare_config(tmp_path / "idx", tmp_path / "out", split={"mode": "source", "query_fraction": 1.0})
    manifest = write_shards(config)
    assert manifest["source"]["kind"] == "idx"
    assert manifest["counts"]["written"] == 80 and manifest["splits"]["train"]["count"] == 60
    from dml.data.sources import read_idx

    suffix = ".gz" if gz else ""
    images = {
        "train": read_idx(tmp_path / "idx" / f"train-images-idx3-ubyte{suffix}"),
        "t10k": read_idx(tmp_path / "idx" / f"t10k-images-idx3-ubyte{suffix}"),
    }
    for s in all_samples(tmp_path / "out"):
        meta = json.loads(s["json"])
        prefix, index = meta["source"].split(":")
        pixels = np.asarray(Image.open(io.BytesIO(s["png"])))
        np.testing.assert_array_equal(pixels, images[prefix][int(index)])
        assert int(s["cls"]) == int(index) % 5


def test_omniglot_layout(tmp_path):
    make_omniglot_dir(tmp_path / "omni")
    config = prepare_config(tmp_path / "omni", tmp_path / "out", split={"mode": "source", "query_fraction": 1.0})
    manifest = write_shards(config)
    assert manifest["splits"]["train"]["num_classes"] == 6
    assert manifest["splits"]["query"]["num_classes"] == 4
    assert all(name.startswith(("background/", "evaluation/")) for name in manifest["classes"])


@pytest.mark.skipif(not (SHARED_DATA / "omniglot").exists(), reason="shared Omniglot data not on this machine")
def test_real_omniglot_lists_every_character():
    from dml.data.sources import OmniglotSource

    records = OmniglotSource(SHARED_DATA / "omniglot").records()
    labels = Counter(r.label for r in records)
    assert len(records) == 32460 and len(labels) == 964 + 659 and set(labels.values()) == {20}


def shard_hashes(out: Path) -> dict[str, str]:
    manifest = load_manifest(out)
    return {s["name"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}


def test_deterministic_across_runs_and_worker_counts(tmp_path):
    make_folder_tree(tmp_path / "src", classes=5, per_class=7)
    a = write_shards(prepare_config(tmp_path / "src", tmp_path / "a", workers=1))
    b = write_shards(prepare_config(tmp_path / "src", tmp_path / "b", workers=2))
    assert len(shard_hashes(tmp_path / "a")) > 2
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    for name in shard_hashes(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a.pop("config"), b.pop("config")
    assert a == b


def test_partitions_merged_equal_single_run(tmp_path):
    make_folder_tree(tmp_path / "src", classes=5, per_class=7)
    single = write_shards(prepare_config(tmp_path / "src", tmp_path / "single"))
    config = prepare_config(tmp_path / "src", tmp_path / "parts")
    for index in range(3):
        write_shards(config, partition=(index, 3))
    assert main(["prepare", "--merge", str(tmp_path / "parts")]) == 0
    merged = load_manifest(tmp_path / "parts")
    single["config"]["output_dir"] = merged["config"]["output_dir"]
    assert merged == single
    assert shard_hashes(tmp_path / "parts") == shard_hashes(tmp_path / "single")


def test_merge_refuses_missing_partition(tmp_path, capsys):
    make_folder_tree(tmp_path / "src", classes=3, per_class=6, bad=False)
    write_shards(prepare_config(tmp_path / "src", tmp_path / "parts"), partition=(0, 2))
    assert main(["prepare", "--merge", str(tmp_path / "parts")]) == 2
    assert "partitions [1] of 2 have not finished" in capsys.readouterr().err


@pytest.mark.parametrize("old,new", [(4, 3), (2, 5), (3, 1)])
def test_merge_refuses_parts_of_two_partition_counts(tmp_path, capsys, old, new):
    # A cluster job re-run with another number of pods leaves the old count's parts behind:
    # merging them all summed both sets (inputs counted twice, shards listed twice).
    make_folder_tree(tmp_path / "src", classes=4, per_class=6, bad=False)
    single = write_shards(prepare_config(tmp_path / "src", tmp_path / "single"))
    config = prepare_config(tmp_path / "src", tmp_path / "parts")
    for index in range(old - 1):  # the old job stopped before its last partition
        write_shards(config, partition=(index, old))
    for index in range(new):
        write_shards(config, partition=(index, new))
    assert main(["prepare", "--merge", str(tmp_path / "parts")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "2 partition counts" in errors[0], errors
    assert f"{old - 1} of {old} (" in errors[0] and f"{new} of {new} (" in errors[0], errors
    for stale in (tmp_path / "parts").glob(f"manifest.part-*-of-{old:05d}.json"):
        stale.unlink()
    assert main(["prepare", "--merge", str(tmp_path / "parts")]) == 0
    assert load_manifest(tmp_path / "parts")["counts"] == single["counts"]


RUN_OPTIONS = [["--resume"], ["--partition", "0/2"], ["prepare.workers=2"], ["--config", "c.yaml"]]


@pytest.mark.parametrize(
    "action,extra",
    [(a, e) for a in ("--merge", "--verify") for e in RUN_OPTIONS]
    + [("--merge", ["--verify", "x"]), ("--verify", ["--merge", "x"])],
)
def test_merge_and_verify_refuse_the_options_of_a_run(tmp_path, capsys, action, extra):
    # they were silently ignored: `--verify DIR --merge DIR` verified only, `--merge --partition` merged all
    make_folder_tree(tmp_path / "src", classes=3, per_class=4, bad=False)
    write_shards(prepare_config(tmp_path / "src", tmp_path / "out"))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert main(["prepare", action, str(tmp_path / "out"), *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    named = "key=value overrides" if "=" in extra[0] else extra[0]
    assert len(errors) == 1 and "DIR takes no" in errors[0] and named in errors[0], errors
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before


def test_verify_catches_flipped_byte_and_missing_shard(tmp_path, capsys):
    make_folder_tree(tmp_path / "src", classes=3, per_class=6, bad=False)
    write_shards(prepare_config(tmp_path / "src", tmp_path / "out"))
    assert main(["prepare", "--verify", str(tmp_path / "out")]) == 0
    names = sorted(shard_hashes(tmp_path / "out"))
    target = tmp_path / "out" / names[0]
    data = bytearray(target.read_bytes())
    data[700] ^= 0x01
    target.write_bytes(bytes(data))
    (tmp_path / "out" / names[1]).unlink()
    assert main(["prepare", "--verify", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"altered shard: {names[0]}" in err and f"missing shard: {names[1]}" in err


def test_empty_and_missing_sources_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="source is empty"):
        write_shards(prepare_config(tmp_path / "empty", tmp_path / "out"))
    code = main(["prepare", f"prepare.source.path={tmp_path / 'nope'}", f"prepare.output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "source path not found" in err


def test_second_run_without_resume_refuses_to_overwrite(tmp_path):
    make_folder_tree(tmp_path / "src", classes=2, per_class=4, bad=False)
    config = prepare_config(tmp_path / "src", tmp_path / "out")
    write_shards(config)
    with pytest.raises(DataError, match="already prepared"):
        write_shards(config)
    other = prepare_config(tmp_path / "src", tmp_path / "out", split={"mode": "sample"})
    with pytest.raises(DataError, match="different source/config"):
        write_shards(other, resume=True)
