"""Readers read what the manifest says: cut shards and corrupt samples, under both policies,
through `read_shard` and every loader built on it (eval, uniform train, P x K train)."""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from dml.config import DataConfig
from dml.data.loader import EvalLoader, TrainLoader
from dml.data.reading import BadSampleError, BadSamplePolicy, ShardSpec, read_shard
from shard_fixtures import rewrite_tar, split_keys, write_shard_set

SHARD_SIZES = [5, 4]  # one split, two shards


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return write_shard_set(tmp_path_factory.mktemp("reading") / "shards", {"query": SHARD_SIZES, "train": [6, 6]})


def sample_spans(path: Path) -> list[tuple[str, int, int]]:
    """Per sample of a shard: (key, offset of its first header, end of its last member's data)."""
    spans: dict[str, list[int]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            first = spans.setdefault(key, [member.offset, 0])
            first[1] = member.offset_data + member.size
    return [(key, start, end) for key, (start, end) in spans.items()]


def cut_points(path: Path) -> list[int]:
    """Every member boundary, a point inside every header, inside every member's data and in
    its padding, and the end of the last member (before tar's end-of-archive blocks)."""
    points = set()
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            points |= {member.offset, member.offset + 100, member.offset_data + max(1, member.size // 2)}
            end = member.offset_data + member.size
            points |= {end, end + (-member.size % 512) // 2, end + -member.size % 512}
    return sorted(points)


def expected_after_cut(spans: list[tuple[str, int, int]], cut: int) -> tuple[list[str], str | None]:
    """Keys a reader must return from a shard cut at ``cut``, and the words the stop error must
    contain (None: nothing is missing)."""
    complete = [key for key, _, end in spans if end <= cut]
    if len(complete) == len(spans):
        return complete, None
    key, start, _ = spans[len(complete)]
    if cut < start + 512:  # cut before or inside a sample's first header: the shard just ends early
        return complete, f"sample after {complete[-1] if complete else '<start of shard>'}: shard ends after"
    return complete, f"sample {key}: "


def test_every_cut_is_found_under_both_policies(clean, tmp_path):
    """Property over where a shard is cut: stop names the shard and the right key; skip
    returns exactly the complete samples and counts every one the manifest lists beyond them."""
    source = clean / "query-000000.tar"
    spans = sample_spans(source)
    data = source.read_bytes()
    shard = tmp_path / "query-000000.tar"
    points = cut_points(source)
    assert len(points) > 3 * 3 * len(spans)
    for cut in points:
        shard.write_bytes(data[:cut])
        keys, error = expected_after_cut(spans, cut)
        spec = ShardSpec(str(shard), len(spans))
        skip = BadSamplePolicy("skip", warn=False)
        assert [s["__key__"] for s in read_shard(spec, skip)] == keys, cut
        assert skip.skipped == len(spans) - len(keys), cut
        # Read again (as the training stream does to fill its buffer): counted once, not twice.
        assert [s["__key__"] for s in read_shard(spec, skip)] == keys, cut
        assert skip.skipped == len(spans) - len(keys), cut
        if error is None:
            assert [s["__key__"] for s in read_shard(spec, BadSamplePolicy("stop"))] == keys
            continue
        with pytest.raises(BadSampleError) as caught:
            list(read_shard(spec, BadSamplePolicy("stop")))
        message = str(caught.value)
        assert message.startswith(f"{shard}: {error}") and "\n" not in message, (cut, message)


def corrupt(kind: str, victim: str):
    """A `rewrite_tar` change that damages sample ``victim`` in one way."""

    def change(name: str, data: bytes):
        key, ext = name.split(".", 1)
        if key != victim:
            return name, data
        if kind == "bad_image" and ext == "png":
            return name, b"these bytes are not a PNG" * 3
        if kind == "truncated_image" and ext == "png":
            return name, data[: len(data) // 2]
        if kind == "missing_cls" and ext == "cls":
            return None
        if kind == "missing_image" and ext == "png":
            return None
        if kind == "bad_cls" and ext == "cls":
            return name, b"seven"
        if kind == "bad_json" and ext == "json":
            return name, b'{"label": 3,'
        return name, data

    return change


KINDS = {
    "bad_image": "image does not decode",
    "truncated_image": "image does not decode",
    "missing_cls": "missing part .cls",
    "missing_image": "no image part",
    "bad_cls": "bad .cls",
    "bad_json": "bad .json",
}


def damaged_copy(clean: Path, tmp_path: Path, kind: str, split: str) -> tuple[Path, list[str]]:
    """A copy of the shards with the first sample of every shard of ``split`` damaged."""
    shards = tmp_path / kind
    shutil.copytree(clean, shards)
    victims = []
    for shard in sorted(shards.glob(f"{split}-*.tar")):
        victims.append(sample_spans(shard)[0][0])
        rewrite_tar(shard, corrupt(kind, victims[-1]))
    return shards, victims


def config(shards: Path, policy: str, **extra) -> DataConfig:
    return DataConfig(
        shard_dir=str(shards), image_size=8, batch_size=3, num_workers=0, shuffle_buffer=4, bad_samples=policy, **extra
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_eval_loader_corruption_kinds_under_both_policies(clean, tmp_path, caplog, kind):
    shards, victims = damaged_copy(clean, tmp_path, kind, "query")
    with pytest.raises(BadSampleError, match=rf"query-000000\.tar: sample {victims[0]}: {KINDS[kind]}"):
        list(EvalLoader(config(shards, "stop"), "query"))
    caplog.set_level(logging.WARNING, logger="dml.data.reading")
    loader = EvalLoader(config(shards, "skip"), "query")
    keys = [k for batch, _, _ in loader for k in batch]
    assert sorted(keys) == sorted(set(split_keys(shards, "query")) - set(victims))
    assert loader.policy.skipped == len(victims)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == len(victims) and all(any(v in w for w in warned) for v in victims)


@pytest.mark.parametrize("kind", ["bad_image", "missing_cls", "bad_json"])
@pytest.mark.parametrize("pk", [False, True])
def test_train_loaders_corruption_kinds_under_both_policies(clean, tmp_path, kind, pk):
    shards, victims = damaged_copy(clean, tmp_path, kind, "train")
    extra = {"pk_classes": 2, "pk_samples": 2} if pk else {}
    with pytest.raises(BadSampleError, match=rf"train-00000\d\.tar: sample ({'|'.join(victims)}): {KINDS[kind]}"):
        list(TrainLoader(config(shards, "stop", **extra), seed=0, batches_per_epoch=8))
    loader = TrainLoader(config(shards, "skip", **extra), seed=0, batches_per_epoch=8, with_keys=True)
    batches = list(loader)
    assert len(batches) == 8
    seen = {k for _, _, keys in batches for k in keys}
    assert seen and not seen & set(victims) and seen <= set(split_keys(shards, "train"))
    assert loader.skipped >= 1


def test_worker_errors_stay_one_line(clean, tmp_path):
    """Raised inside a DataLoader worker, the error still reads as the reader's one line."""
    shards, victims = damaged_copy(clean, tmp_path, "bad_json", "query")
    with pytest.raises(BadSampleError) as caught:
        list(EvalLoader(config(shards, "stop").model_copy(update={"num_workers": 1}), "query"))
    assert str(caught.value).startswith(f"{shards / 'query-000000.tar'}: sample {victims[0]}: bad .json")
    assert "\n" not in str(caught.value) and "Caught" not in str(caught.value)


def test_missing_shard_counts_every_listed_sample(clean, tmp_path):
    shards = tmp_path / "gone"
    shutil.copytree(clean, shards)
    (shards / "query-000001.tar").unlink()
    with pytest.raises(BadSampleError, match=r"query-000001\.tar: sample <whole shard>: cannot be read"):
        list(EvalLoader(config(shards, "stop"), "query"))
    loader = EvalLoader(config(shards, "skip"), "query")
    assert sum(len(k) for k, _, _ in loader) == SHARD_SIZES[0] and loader.policy.skipped == SHARD_SIZES[1]


def test_teacher_cache_under_both_policies(clean, tmp_path):
    """The distillation teacher cache reads through the same check: stop raises; skip builds a
    cache without the bad sample, reuses it next time, and the training loader never asks for it."""
    from dml.config import DMLConfig
    from dml.data.manifest import manifest_digest
    from dml.distill.teacher import describe_teacher
    from dml.distill.teacher_cache import ensure_teacher_cache
    from dml.models.model_file import build_model, save_final_model

    shards, victims = damaged_copy(clean, tmp_path, "bad_image", "train")
    model_config = DMLConfig.model_validate(
        {
            "data": {"shard_dir": str(shards), "image_size": 16},
            "model": {"backbone": "mobilenetv3_small_050", "embedding_dim": 8},
        }
    )
    save_final_model(build_model(model_config), model_config, tmp_path / "teacher.pt", manifest_digest(shards))
    record = describe_teacher(tmp_path / "teacher.pt")
    with pytest.raises(BadSampleError, match=rf"sample {victims[0]}: image does not decode"):
        ensure_teacher_cache(record, config(shards, "stop"), torch.device("cpu"))
    first = ensure_teacher_cache(record, config(shards, "skip"), torch.device("cpu"))
    assert first.rebuilt and sorted(first.keys) == sorted(set(split_keys(shards, "train")) - set(victims))
    again = ensure_teacher_cache(record, config(shards, "skip"), torch.device("cpu"))
    assert not again.rebuilt
    loader = TrainLoader(config(shards, "skip"), seed=0, batches_per_epoch=6, with_keys=True)
    assert all(again.lookup(keys).shape == (len(keys), 8) for _, _, keys in loader)


def test_train_loader_with_no_readable_shard_stops_instead_of_spinning(clean, tmp_path):
    shards = tmp_path / "empty"
    shutil.copytree(clean, shards)
    for shard in shards.glob("train-*.tar"):
        shard.write_bytes(b"")
    with pytest.raises(BadSampleError, match=r"no readable sample in the last 50 shard reads \(of 2 shards"):
        list(TrainLoader(config(shards, "skip"), seed=0, batches_per_epoch=2))
