"""`prepare.source.kind: recordio`: insightface sets read without MXNet, into shards, bytes kept."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from data_fixtures import SHARED_DATA, image_bytes
from dml.cli import main
from dml.config import DMLConfig
from dml.data.manifest import load_manifest
from dml.data.recordio import RecordIOSource
from dml.data.shards import write_shards
from dml.data.sources import open_source
from recordio_writer import MAGIC_BYTES, pack_payload, write_recordio
from test_prepare import all_samples, shard_hashes

ORL_REC = SHARED_DATA / "recordio_orl"


def config_for(source, out, **prepare):
    data = {
        "source": {"path": str(source), "kind": "recordio"},
        "output_dir": str(out),
        "shards": {"max_samples": 7},
        "split": {"mode": "sample", "train_fraction": 0.5},
        **prepare,
    }
    return DMLConfig.model_validate({"prepare": data}).prepare


def by_source(out):
    """source id -> (label, stored image bytes) for every written sample."""
    result = {}
    for s in all_samples(out):
        meta = json.loads(s["json"])
        result[meta["source"]] = (meta["label"], s.get("jpg") or s.get("png"))
    return result


@pytest.mark.skipif(not ORL_REC.is_dir(), reason=f"shared RecordIO fixture absent: {ORL_REC}")
def test_independent_orl_set_gives_100_faces_with_the_readme_labels(tmp_path):
    manifest = write_shards(config_for(ORL_REC, tmp_path / "out"))
    counts = manifest["counts"]
    assert (counts["inputs"], counts["written"], counts["rejected"]) == (100, 100, 0)
    assert manifest["source"]["header"] == {"images": [1, 100], "records_after_images": 10}
    assert manifest["source"]["property"] == {"num_classes": 10, "height": 112, "width": 92}
    samples = by_source(tmp_path / "out")
    assert sorted(int(k.split(":")[1]) for k in samples) == list(range(1, 101))  # not 0, not 101..110
    for source_id, (label, data) in samples.items():
        index = int(source_id.split(":")[1])
        assert label == str((index - 1) // 10)
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.size == (92, 112)


def _jpeg_with_magic_inside(seed: int) -> bytes:
    """A JPEG followed (after its end marker, where decoders stop) by the magic at aligned places."""
    data = image_bytes(seed, size=(20, 16), fmt="JPEG")
    data += b"\0" * ((-len(data)) % 4)  # the 24-byte header keeps the payload's alignment
    return data + MAGIC_BYTES + b"tail" + MAGIC_BYTES


@pytest.mark.parametrize("seed", range(4))
def test_variants_round_trip_bytes_and_labels(tmp_path, seed):
    """Random sets: with or without header record, scalar or array labels, records cut into
    continuation parts, one undecodable image; every image record is written or rejected."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 15))
    header = bool(seed % 2)
    expected, payloads = {}, []
    bad_key = 1 + int(rng.integers(0, n)) if header else int(rng.integers(0, n))
    for i in range(n):
        key = i + 1 if header else i
        label = int(rng.integers(0, 4))
        image = _jpeg_with_magic_inside(seed * 100 + i) if rng.random() < 0.3 else image_bytes(i, fmt="JPEG")
        if key == bad_key:
            image = b"\xff\xd8 not really a jpeg"
        as_array = rng.random() < 0.5
        payloads.append(pack_payload([label, 7.0] if as_array else label, image))
        expected[f"train.rec:{key}"] = (str(label), image)
    if header:  # record 0: image range; after the images, identity records without image
        payloads = [pack_payload([n + 1, n + 3]), *payloads, pack_payload([1, 2]), pack_payload([2, 3])]
    write_recordio(tmp_path / "rec", payloads, prop="4,16,20")
    manifest = write_shards(config_for(tmp_path / "rec", tmp_path / "out"))
    counts = manifest["counts"]
    assert counts["inputs"] == n == counts["written"] + counts["rejected"] and counts["rejected"] == 1
    [rejected] = manifest["rejected"]
    assert rejected["source"] == f"train.rec:{bad_key}" and "corrupt" in rejected["reason"]
    written = by_source(tmp_path / "out")
    assert set(written) == set(expected) - {f"train.rec:{bad_key}"}
    for source_id, (label, data) in written.items():
        assert (label, data) == expected[source_id]  # JPEG bytes stored as they were


def test_partitions_with_workers_equal_one_run(tmp_path):
    payloads = [pack_payload(i % 3, image_bytes(i, fmt="JPEG")) for i in range(20)]
    write_recordio(tmp_path / "rec", payloads)
    assert isinstance(open_source("auto", str(tmp_path / "rec")), RecordIOSource)
    assert isinstance(open_source("auto", str(tmp_path / "rec" / "train.rec")), RecordIOSource)
    single = write_shards(config_for(tmp_path / "rec", tmp_path / "single"))
    for index in range(2):
        write_shards(config_for(tmp_path / "rec", tmp_path / "parts", workers=2), partition=(index, 2))
    assert main(["prepare", "--merge", str(tmp_path / "parts")]) == 0
    assert shard_hashes(tmp_path / "parts") == shard_hashes(tmp_path / "single")
    assert load_manifest(tmp_path / "parts")["counts"] == single["counts"]


def _good_set(folder, n=6):
    return write_recordio(folder, [pack_payload(i % 2, image_bytes(i, fmt="JPEG")) for i in range(n)])


def _past_end(folder, offsets):
    (folder / "train.idx").write_text("".join(f"{i}\t{o}\n" for i, o in enumerate([*offsets, offsets[-1] + 10**6])))


def _truncated(folder, offsets):
    rec = folder / "train.rec"
    rec.write_bytes(rec.read_bytes()[: offsets[-1] + 60])


def _bad_magic(folder, offsets):
    data = bytearray((folder / "train.rec").read_bytes())
    data[offsets[2] : offsets[2] + 4] = struct.pack("<I", 0xDEADBEEF)
    (folder / "train.rec").write_bytes(bytes(data))


def _misaligned(folder, offsets):
    (folder / "train.idx").write_text("".join(f"{i}\t{o + (i == 3)}\n" for i, o in enumerate(offsets)))


def _bad_index_line(folder, offsets):
    (folder / "train.idx").write_text("0\t0\nthree\tfour\n")


def _no_index(folder, offsets):
    (folder / "train.idx").unlink()


def _bad_continuation(folder, offsets):
    """Record 2 cut at an embedded magic, then its second part's magic overwritten."""
    payloads = [
        pack_payload(i % 2, _jpeg_with_magic_inside(i) if i == 2 else image_bytes(i, fmt="JPEG")) for i in range(6)
    ]
    offsets = write_recordio(folder, payloads)
    data = bytearray((folder / "train.rec").read_bytes())
    (lrec,) = struct.unpack_from("<I", data, offsets[2] + 4)
    second = offsets[2] + 8 + (((lrec & (2**29 - 1)) + 3) & ~3)
    data[second : second + 4] = b"\0\0\0\0"
    (folder / "train.rec").write_bytes(bytes(data))


def _bad_property(folder, offsets):
    (folder / "property").write_text("ten classes")


@pytest.mark.parametrize(
    "damage, file_name, words",
    [
        (_past_end, "train.rec", "record 6: its offset in the index points past the end"),
        (_truncated, "train.rec", "record 5: runs past the end of the file"),
        (_bad_magic, "train.rec", "record 2: bad magic number"),
        (_misaligned, "train.rec", "record 3: its offset in the index is not a multiple of 4"),
        (_bad_index_line, "train.idx", "line 2 is not 'index<TAB>byte offset'"),
        (_no_index, "train.rec", "its index train.idx is missing"),
        (_bad_property, "property", "expected 'num_classes,height,width'"),
        (_bad_continuation, "train.rec", "record 2: bad magic number in a continuation part"),
    ],
)
def test_damaged_files_are_one_line_errors(tmp_path, capsys, damage, file_name, words):
    folder = tmp_path / "rec"
    damage(folder, _good_set(folder))
    code = main(["prepare", f"prepare.source.path={folder}", f"prepare.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert str(folder / file_name) in err and words in err, err
    assert not list(tmp_path.rglob("*.tmp"))


def test_header_record_naming_missing_images_is_an_error(tmp_path):
    payloads = [pack_payload([5, 6])] + [pack_payload(0, image_bytes(i, fmt="JPEG")) for i in range(3)]
    write_recordio(tmp_path / "rec", payloads)
    with pytest.raises(Exception, match=r"images are records 1\.\.4, but the index lists 3"):
        RecordIOSource(tmp_path / "rec").records()
