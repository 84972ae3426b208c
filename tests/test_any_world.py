"""Any number of processes, shards and positions: properties of every loader over world
sizes 1-4 x shard counts 1-5 x split sizes (some smaller than the world), resume from every
in-epoch position onto 1-3 processes, and on real gloo groups: a rank with no shard (the
empty-rank reproduction is also rank 1 of 2 on the one-shard splits above) and a 1-process
checkpoint resumed on 2 processes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dml.config import DataConfig, DMLConfig
from dml.data.loader import EvalLoader, TrainLoader
from dml.data.manifest import load_manifest
from dml.errors import DataError
from dml.eval.embed import extract_embeddings
from dml.train.checkpoint import list_checkpoints
from dml.train.loop import moved_position, remaining_batches
from local_group import spawn_local_group
from shard_fixtures import split_keys, write_shard_set

pytestmark = pytest.mark.dist
WORLDS = (1, 2, 3, 4)


def split_shapes() -> dict[str, list[int]]:
    """Per shard count 1-5, three split sizes (the smallest below most world sizes), spread
    unevenly over the shards."""
    shapes = {}
    for shards in range(1, 6):
        for size in sorted({shards, shards + 2, 11}):
            shapes[f"s{shards}n{size}"] = [size // shards + (i < size % shards) for i in range(shards)]
    return shapes


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return write_shard_set(tmp_path_factory.mktemp("any_world") / "shards", {**split_shapes(), "train": [8, 8, 8, 6]})


def data(shard_dir: Path, split: str = "train", **extra) -> DataConfig:
    return DataConfig(
        shard_dir=str(shard_dir),
        train_split=split,
        image_size=8,
        shuffle_buffer=4,
        **{"batch_size": 2, "num_workers": 0, **extra},
    )


def shard_keys(shard_dir: Path, split: str) -> list[list[str]]:
    keys, sizes = iter(split_keys(shard_dir, split)), split_shapes()[split]
    return [[next(keys) for _ in range(size)] for size in sizes]


@pytest.mark.parametrize("split", sorted(split_shapes()))
def test_eval_loader_covers_the_split_once_on_any_world(shard_dir, split):
    for world in WORLDS:
        seen = []
        for rank in range(world):
            workers = 2 if world == 2 else 0
            loader = EvalLoader(data(shard_dir, num_workers=workers), split, batch_size=3, rank=rank, world_size=world)
            keys = [k for batch, images, labels in loader for k in batch]
            mine = [k for shard in shard_keys(shard_dir, split)[rank::world] for k in shard]
            assert sorted(keys) == sorted(mine) and len(keys) == loader.num_samples, (world, rank)
            seen += keys
        assert sorted(seen) == split_keys(shard_dir, split), world  # the union is the split, no duplicates


@pytest.mark.parametrize("split", sorted(split_shapes()))
def test_train_loaders_give_every_rank_the_same_count(shard_dir, split):
    count = sum(split_shapes()[split])
    for world in WORLDS:
        for pk in (False, True):
            extra = {"pk_classes": 2, "pk_samples": 2} if pk else {}
            config, batch = data(shard_dir, split, **extra), 4 if pk else 2
            if count < world * batch:
                with pytest.raises(DataError, match=f"has {count} samples: too few for {world} rank"):
                    TrainLoader(config, rank=0, world_size=world)
                continue
            for rank in range(world):
                try:
                    loader = TrainLoader(config, rank=rank, world_size=world, with_keys=True)
                except DataError as exc:  # P x K needs 2 classes with 2 samples each
                    assert pk and "P x K sampling needs 2 classes" in str(exc)
                    break
                batches = list(loader)
                assert len(batches) == len(loader) == count // (world * batch), (world, rank, pk)
                assert all(len(keys) == batch for _, _, keys in batches)
                assert {k for _, _, keys in batches for k in keys} <= set(split_keys(shard_dir, split))
                if pk:
                    assert all(sorted(torch.bincount(labels).tolist())[-2:] == [2, 2] for _, labels, _ in batches)


def saved_positions(shard_dir: Path, saved_world: int) -> list[dict]:
    """Every in-epoch position a run on ``saved_world`` processes can checkpoint at."""
    per_epoch = TrainLoader(data(shard_dir, batch_size=6), rank=0, world_size=saved_world).batches_per_epoch
    global_batch = 6 * saved_world
    return [
        {"epoch": 1, "batch_in_epoch": b, "step": 9 + b, "images_seen": 0, "samples_in_epoch": b * global_batch}
        for b in range(per_epoch + 1)
    ]


def test_resume_from_every_position_onto_any_world(shard_dir):
    """30 samples, batch 6: the saved samples map to the new world's batches, never past the
    epoch's end, and the epoch then yields what is left of it (within one global batch)."""
    count = 30
    for saved_world in (1, 2, 3):
        for fields in saved_positions(shard_dir, saved_world):
            done = fields["samples_in_epoch"]
            for world in (1, 2, 3):
                loader = TrainLoader(data(shard_dir, batch_size=6), rank=world - 1, world_size=world)
                state = moved_position(fields, saved_world, loader)
                old = {k: v for k, v in fields.items() if k != "samples_in_epoch"}  # checkpoints before the field
                assert moved_position(old, saved_world, loader) == state
                loader.set_epoch(state.epoch, state.batch_in_epoch)
                left = len(list(loader))
                assert left == len(loader) >= 0 and state.epoch == 1 and state.step == fields["step"]
                epoch_samples, global_batch = loader.batches_per_epoch * 6 * world, 6 * world
                total = done + left * global_batch
                assert total <= count, (saved_world, fields, world)
                assert left == 0 or epoch_samples - global_batch < total <= epoch_samples, (saved_world, fields, world)
                assert remaining_batches(state, loader, epochs=3) == left + loader.batches_per_epoch


def resume_and_reduce(info, shard_dir: str) -> dict:
    """Every saved position resumed on this group: each batch ends in an all-reduce, as DDP's
    would, so a rank with one batch more or less waits forever (here: until the group's
    timeout). Then embeddings of splits with fewer shards than ranks (collective)."""
    steps = []
    for saved_world in (1, 2, 3):
        for fields in saved_positions(Path(shard_dir), saved_world):
            loader = TrainLoader(data(Path(shard_dir), batch_size=6))
            state = moved_position(fields, saved_world, loader)
            loader.set_epoch(state.epoch, state.batch_in_epoch)
            for _images, _labels in loader:
                dist.all_reduce(torch.ones(1))
            steps.append(len(loader))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    splits = {}
    for split in ("s1n1", "s2n2", "s3n11", "s5n11"):
        eval_loader = EvalLoader(data(Path(shard_dir)), split)
        embedded = extract_embeddings(model, data(Path(shard_dir)), split, torch.device("cpu"))
        splits[split] = {"mine": [k for batch, _, _ in eval_loader for k in batch], "all": embedded.keys}
    return {"steps": steps, "splits": splits}


def test_three_rank_group_resumes_and_embeds_small_splits(shard_dir):
    """Real gloo group of 3: no rank crashes or waits on a resume from any position, and ranks
    without a shard embed nothing yet take part in the gather (the empty-rank reproduction)."""
    world = 3
    results = spawn_local_group(resume_and_reduce, world, args=(str(shard_dir),))
    assert all(r["steps"] == results[0]["steps"] for r in results)
    for split in results[0]["splits"]:
        mine = [r["splits"][split]["mine"] for r in results]
        assert sorted(k for part in mine for k in part) == split_keys(shard_dir, split)
        assert sum(1 for part in mine if not part) == max(0, world - len(split_shapes()[split]))
        assert all(r["splits"][split]["all"] == split_keys(shard_dir, split) for r in results)


def train_on_group(info, config_json: str) -> int:
    from dml.train.run import run_train

    return run_train(DMLConfig.model_validate_json(config_json), resume=True).steps


def test_one_process_checkpoint_resumed_on_two(shard_dir, tmp_path):
    """30 samples, batch 6, checkpoint at step 4 of 5 on one process; resumed on two (2 batches
    an epoch): epoch 0 is over, epoch 1 takes 2 steps, the run ends at step 6."""
    from dml.train.run import run_train

    base = {
        "seed": 0,
        "data": {
            "shard_dir": str(shard_dir),
            "image_size": 16,
            "batch_size": 6,
            "num_workers": 0,
            "shuffle_buffer": 10,
        },
        "model": {"backbone": "mobilenetv3_small_050", "embedding_dim": 8},
        "loss": {"kind": "arcface", "scale": 16.0, "margin": 0.2},
        "optimizer": {"lr": 0.01},
        "train": {"run_dir": str(tmp_path / "run"), "epochs": 1, "checkpoint_every": 2, "log_every": 1},
    }
    assert run_train(DMLConfig.model_validate(base)).steps == 5
    shutil.rmtree(list_checkpoints(tmp_path / "run")[-1])
    (tmp_path / "run" / "model.pt").unlink()
    more = DMLConfig.model_validate({**base, "train": {**base["train"], "epochs": 2}})
    assert spawn_local_group(train_on_group, 2, args=(more.model_dump_json(),)) == [6, 6]
    assert (tmp_path / "run" / "model.pt").exists()
    assert load_manifest(shard_dir)["splits"]["train"]["count"] == 30
