"""Shard loaders: equal batches per rank, exact eval coverage, P x K composition, resume of prepare."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_fixtures import make_folder_tree, make_idx_dir
from dml.config import DataConfig, DMLConfig
from dml.data.loader import EvalLoader, TrainLoader
from dml.data.manifest import load_manifest
from dml.data.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]


def make_shards(tmp_path: Path, max_samples: int = 7, classes: int = 6, per_class: int = 9) -> Path:
    make_folder_tree(tmp_path / "src", classes=classes, per_class=per_class, bad=False)
    out = tmp_path / "shards"
    config = DMLConfig.model_validate(
        {
            "prepare": {
                "source": {"path": str(tmp_path / "src")},
                "output_dir": str(out),
                "split": {"mode": "sample", "train_fraction": 0.67, "query_fraction": 1.0},
                "shards": {"max_samples": max_samples},
            }
        }
    ).prepare
    write_shards(config)
    return out


def data_config(shards: Path, **kw) -> DataConfig:
    return DataConfig(shard_dir=str(shards), image_size=16, channels=3, num_workers=kw.pop("num_workers", 0), **kw)


def test_train_loader_batches_and_epochs(tmp_path):
    shards = make_shards(tmp_path)
    loader = TrainLoader(data_config(shards, batch_size=5, num_workers=2), seed=3)
    count = load_manifest(shards)["splits"]["train"]["count"]
    assert len(loader) == count // 5
    batches = list(loader)
    assert len(batches) == len(loader)
    images, labels = batches[0]
    assert images.shape == (5, 3, 16, 16) and labels.dtype == torch.long
    # Same seed and epoch -> same stream; next epoch -> a different one.
    again = TrainLoader(data_config(shards, batch_size=5, num_workers=2), seed=3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    again.set_epoch(1)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))


def test_pk_batches_hold_p_classes_of_k(tmp_path):
    shards = make_shards(tmp_path, classes=8, per_class=10)
    loader = TrainLoader(data_config(shards, pk_classes=3, pk_samples=2, shuffle_buffer=20), seed=0)
    seen = 0
    for images, labels in loader:
        counts = Counter(labels.tolist())
        assert images.shape[0] == 6 and len(counts) == 3 and set(counts.values()) == {2}
        seen += 1
    assert seen == len(loader) > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, world: int, port: int, shards: str, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    config = data_config(Path(shards), batch_size=4, num_workers=1)
    batches = sum(1 for _ in TrainLoader(config, seed=0))
    keys = [k for ks, _, _ in EvalLoader(config, "query", batch_size=3) for k in ks]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"batches": batches, "keys": keys})
    if rank == 0:
        out.update({"results": gathered})
    dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_equal_batches_and_full_eval_coverage(tmp_path):
    shards = make_shards(tmp_path, max_samples=4)  # several uneven shards per split
    manifest = load_manifest(shards)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_two_rank_worker, args=(2, _free_port(), str(shards), out), nprocs=2)
        results = out["results"]
    assert results[0]["batches"] == results[1]["batches"] == manifest["splits"]["train"]["count"] // 8
    keys = results[0]["keys"] + results[1]["keys"]
    assert results[0]["keys"] and results[1]["keys"]
    assert len(keys) == len(set(keys)) == manifest["splits"]["query"]["count"]


@pytest.mark.slow
def test_resume_after_killed_writer(tmp_path):
    make_idx_dir(tmp_path / "idx", n_train=6000, n_test=0)
    args = [
        sys.executable,
        "-m",
        "dml.cli",
        "prepare",
        f"prepare.source.path={tmp_path / 'idx'}",
        "prepare.shards.max_samples=100",
        "prepare.split.mode=sample",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    victim = subprocess.Popen(
        [*args, f"prepare.output_dir={tmp_path / 'killed'}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = tmp_path / "killed" / ".progress"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(progress.glob("*.tar.json"))) < 3:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finished = {
        p.name[:-5]: (tmp_path / "killed" / p.name[:-5]).stat().st_mtime_ns for p in progress.glob("*.tar.json")
    }
    assert 3 <= len(finished) < 60, "the writer should have been killed mid-way"
    assert not (tmp_path / "killed" / "manifest.json").exists()
    subprocess.run(
        [*args, f"prepare.output_dir={tmp_path / 'killed'}", "--resume"], env=env, check=True, capture_output=True
    )
    subprocess.run([*args, f"prepare.output_dir={tmp_path / 'clean'}"], env=env, check=True, capture_output=True)
    resumed, clean = load_manifest(tmp_path / "killed"), load_manifest(tmp_path / "clean")
    assert resumed["splits"] == clean["splits"] and resumed["counts"]["written"] == 6000
    for name, mtime in finished.items():  # finished shards were kept, not rewritten
        assert (tmp_path / "killed" / name).stat().st_mtime_ns == mtime
    assert not list((tmp_path / "killed").glob("*.tmp"))


def test_batch_normalisation_equals_the_per_image_transform():
    """TrainLoader's uint8 decode + per-batch normalise gives the numbers of the one-image transform."""
    from PIL import Image

    from dml.data.transforms import (
        BatchNormalize,
        build_train_transform,
        build_train_uint8_transform,
    )

    config = DataConfig(
        shard_dir="unused",
        image_size=24,
        channels=3,
        mean=(0.2, 0.4, 0.6),
        std=(0.3, 0.2, 0.1),
        augment={"horizontal_flip": True, "random_resized_crop": True, "color_jitter": 0.3},
    )
    rng = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (40, 33, 3), generator=rng, dtype=torch.uint8).numpy()) for _ in range(5)
    ]
    torch.manual_seed(7)
    expected = torch.stack([build_train_transform(config)(im) for im in images])
    torch.manual_seed(7)
    uint8 = torch.stack([build_train_uint8_transform(config)(im) for im in images])
    assert uint8.dtype == torch.uint8
    got = BatchNormalize(config)(uint8)
    assert got.shape == expected.shape == (5, 3, 24, 24)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
