"""WebDataset loaders per rank and DataLoader worker.

- `TrainLoader`: endless resampled shard streams, shuffle buffer, decode, augment, fixed-size
  batches (uniform, or P x K for pair losses); exactly ``batches_per_epoch`` batches on every
  rank whatever the shard sizes, so DDP can never hang on an uneven last batch.
- `EvalLoader`: each sample of a split exactly once across all ranks (shards are dealt to
  ranks, then to workers), with its key so results can be put back in order.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image

from dml.config import DataConfig
from dml.data.manifest import load_manifest, split_shards
from dml.data.tario import iter_tar_samples
from dml.data.sampling import EpochShardSampler, EpochShuffle, PKGroups, collate_pairs
from dml.data.transforms import BatchNormalize, build_eval_transform, build_train_uint8_transform
from dml.errors import DataError

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "png", "jpeg")


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; otherwise the initialised process group's; otherwise (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_samples(items: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
    """Pipeline stage: shard URLs -> raw sample dicts (bytes per extension)."""
    for item in items:
        yield from iter_tar_samples(item["url"])


class DecodeSample:
    """Raw sample -> (transformed image, class index[, key]); a class so workers can pickle it."""

    def __init__(self, transform, with_key: bool = False):
        self.transform = transform
        self.with_key = with_key

    def __call__(self, sample: dict[str, Any]) -> tuple:
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise DataError(f"sample {sample['__key__']} in {sample.get('__url__')} has no image")
        image = self.transform(Image.open(io.BytesIO(data)))
        label = int(sample["cls"])
        return (image, label, sample["__key__"]) if self.with_key else (image, label)


class NormalizedCollate:
    """Stack decoded uint8 items into a batch and normalise it in one op (see `BatchNormalize`)."""

    def __init__(self, normalize: BatchNormalize):
        self.normalize = normalize

    def __call__(self, items: list[tuple]) -> tuple:
        images, *rest = collate_pairs(items)
        return (self.normalize(images), *rest)


class DecodeGroup:
    """Decode and transform a list of raw samples (one P x K group) into a batch."""

    def __init__(self, transform, collate: NormalizedCollate, with_key: bool = False):
        self.decode = DecodeSample(transform, with_key)
        self.collate = collate

    def __call__(self, group: list[dict[str, Any]]) -> tuple:
        return self.collate([self.decode(sample) for sample in group])


class TrainLoader:
    """Training batches ``(images (B, C, H, W), labels (B,)[, keys])`` for one rank.

    ``len(loader)`` batches per epoch on every rank: ``split count // (world x batch)``.
    Call ``set_epoch(e)`` before each epoch for a fresh, reproducible shard stream.
    """

    def __init__(self, config: DataConfig, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, batches_per_epoch: int | None = None, with_keys: bool = False):
        self.rank, self.world_size = rank_and_world(rank, world_size)
        manifest = load_manifest(config.shard_dir)
        urls = split_shards(manifest, config.shard_dir, config.train_split)
        count = manifest["splits"][config.train_split]["count"]
        self.pk = config.pk_classes is not None
        self.batch_size = config.pk_classes * config.pk_samples if self.pk else config.batch_size
        self.batches_per_epoch = batches_per_epoch or count // (self.world_size * self.batch_size)
        if self.batches_per_epoch < 1:
            raise DataError(f"split '{config.train_split}' has {count} samples: too few for "
                            f"{self.world_size} rank(s) x batch {self.batch_size}")
        self.num_classes = len(manifest["classes"])
        self.sampler = EpochShardSampler(urls, seed, self.rank)
        transform = build_train_uint8_transform(config)
        collate = NormalizedCollate(BatchNormalize(config))
        stages: list[Any] = [self.sampler, shard_samples, EpochShuffle(self.sampler, config.shuffle_buffer)]
        if self.pk:
            self._check_pk(manifest, config)
            stages += [PKGroups(self.sampler, config.pk_classes, config.pk_samples),
                       wds.map(DecodeGroup(transform, collate, with_keys))]
        else:
            stages += [wds.map(DecodeSample(transform, with_keys)),
                       wds.batched(self.batch_size, partial=False, collation_fn=collate)]
        self.loader = wds.WebLoader(wds.DataPipeline(*stages), batch_size=None,
                                    num_workers=config.num_workers, persistent_workers=False)

    @staticmethod
    def _check_pk(manifest: dict, config: DataConfig) -> None:
        counts = manifest["splits"][config.train_split]["class_counts"]
        usable = sum(1 for n in counts.values() if n >= config.pk_samples)
        if usable < config.pk_classes:
            raise DataError(f"P x K sampling needs {config.pk_classes} classes with >= {config.pk_samples} "
                            f"samples; split '{config.train_split}' has {usable}")
        if usable < len(counts):
            log.info("P x K: %d classes have fewer than %d samples and are never sampled",
                     len(counts) - usable, config.pk_samples)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Stream of ``epoch``; ``start_batch`` > 0 resumes mid-epoch with the remaining count."""
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.sampler.start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return islice(iter(self.loader), len(self))


def _collate_keyed(items: list[tuple[torch.Tensor, int, str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    images, labels, keys = collate_pairs(items)
    return keys, images, labels


class EvalLoader:
    """Batches ``(keys, images, labels)`` of one split; across ranks every sample appears once.

    Shards are dealt round-robin to ranks (``shards[rank::world]``), then to DataLoader
    workers; a rank with no shard yields nothing (collectives must therefore gather objects
    of varying length, never assume equal counts).
    """

    def __init__(self, config: DataConfig, split: str, batch_size: int | None = None,
                 rank: int | None = None, world_size: int | None = None, transform=None):
        self.rank, self.world_size = rank_and_world(rank, world_size)
        manifest = load_manifest(config.shard_dir)
        urls = split_shards(manifest, config.shard_dir, split)[self.rank::self.world_size]
        self.num_samples = sum(s["count"] for s in manifest["splits"][split]["shards"][self.rank::self.world_size])
        transform = transform or build_eval_transform(config)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls) if urls else [],
            wds.split_by_worker, shard_samples, wds.map(DecodeSample(transform, with_key=True)),
            wds.batched(batch_size or config.batch_size, partial=True, collation_fn=_collate_keyed))
        workers = min(config.num_workers, len(urls))
        self.loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)

    def __iter__(self) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
        return iter(self.loader)
