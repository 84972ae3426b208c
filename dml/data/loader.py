"""WebDataset loaders per rank and DataLoader worker.

- `TrainLoader`: endless resampled shard streams, shuffle buffer, decode, augment, fixed-size
  batches (uniform, or P x K for pair losses); exactly ``batches_per_epoch`` batches on every
  rank whatever the shard sizes, so DDP can never hang on an uneven last batch.
- `EvalLoader`: each sample of a split exactly once across all ranks (shards are dealt to
  ranks, then to workers), with its key so results can be put back in order; a rank or
  worker with no shard yields nothing.

Both read through `dml.data.reading` (samples checked against the manifest, bad ones handled
by ``data.bad_samples``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from dml.config import DataConfig
from dml.data.manifest import load_manifest
from dml.data.reading import BadSampleError, BadSamplePolicy, ShardSpec, decode_image, read_shard, split_shard_specs
from dml.data.sampling import EpochShardSampler, EpochShuffle, PKGroups, collate_pairs, worker_index
from dml.data.transforms import BatchNormalize, build_eval_transform, build_train_uint8_transform
from dml.distributed import get_rank, get_world_size
from dml.errors import DataError

log = logging.getLogger(__name__)


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; otherwise the initialised process group's; otherwise (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    return get_rank(), get_world_size()


class ReadShards:
    """Pipeline stage: ``{"url": shard}`` items -> checked raw samples (see `read_shard`).

    Under the skip policy a stream whose shards are all bad would never yield: after
    ``20 x shards + 10`` shard reads in a row without a good sample it raises `BadSampleError`.
    """

    def __init__(self, shards: list[ShardSpec], policy: BadSamplePolicy):
        self.shards = {shard.url: shard for shard in shards}
        self.policy = policy
        self.patience = 20 * len(shards) + 10

    def __call__(self, items: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        empty = 0
        for item in items:
            empty += 1
            for sample in read_shard(self.shards[item["url"]], self.policy):
                empty = 0
                yield sample
            if empty >= self.patience:
                raise BadSampleError(
                    f"no readable sample in the last {empty} shard reads "
                    f"(of {len(self.shards)} shards, e.g. {item['url']})"
                )


def is_decoded(item: tuple | None) -> bool:
    """Pipeline filter: drop samples whose image did not decode (None under the skip policy)."""
    return item is not None


class DecodeSample:
    """Checked raw sample -> (transformed image, class index[, key]), or None when the image
    does not decode and the policy skips it; a class so workers can pickle it."""

    def __init__(self, transform, policy: BadSamplePolicy, with_key: bool = False):
        self.transform = transform
        self.policy = policy
        self.with_key = with_key

    def __call__(self, sample: dict[str, Any]) -> tuple | None:
        image = decode_image(sample, self.policy)
        if image is None:
            return None
        label = int(sample["cls"])
        image = self.transform(image)
        return (image, label, sample["__key__"]) if self.with_key else (image, label)


class NormalizedCollate:
    """Stack decoded uint8 items into a batch and normalise it in one op (see `BatchNormalize`)."""

    def __init__(self, normalize: BatchNormalize):
        self.normalize = normalize

    def __call__(self, items: list[tuple]) -> tuple:
        images, *rest = collate_pairs(items)
        return (self.normalize(images), *rest)


class DecodeGroup:
    """Decode and transform a list of raw samples (one P x K group) into a batch; a sample
    that does not decode (skip policy) leaves the batch one smaller."""

    def __init__(self, transform, collate: NormalizedCollate, policy: BadSamplePolicy, with_key: bool = False):
        self.decode = DecodeSample(transform, policy, with_key)
        self.collate = collate

    def __call__(self, group: list[dict[str, Any]]) -> tuple:
        items = [item for item in map(self.decode, group) if item is not None]
        if not items:
            raise BadSampleError(f"no image of a P x K batch decodes (keys {[s['__key__'] for s in group][:4]} ...)")
        return self.collate(items)


class TrainLoader:
    """Training batches ``(images (B, C, H, W), labels (B,)[, keys])`` for one rank.

    ``len(loader)`` batches per epoch on every rank: ``split count // (world x batch)``.
    Call ``set_epoch(e)`` before each epoch for a fresh, reproducible shard stream.
    """

    def __init__(
        self,
        config: DataConfig,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        batches_per_epoch: int | None = None,
        with_keys: bool = False,
    ):
        self.rank, self.world_size = rank_and_world(rank, world_size)
        manifest = load_manifest(config.shard_dir)
        shards = split_shard_specs(manifest, config.shard_dir, config.train_split)
        count = manifest["splits"][config.train_split]["count"]
        pk_classes = config.pk_classes
        self.pk = pk_classes is not None
        self.batch_size = pk_classes * config.pk_samples if pk_classes is not None else config.batch_size
        self.batches_per_epoch = batches_per_epoch or count // (self.world_size * self.batch_size)
        if self.batches_per_epoch < 1:
            raise DataError(
                f"split '{config.train_split}' has {count} samples: too few for "
                f"{self.world_size} rank(s) x batch {self.batch_size}"
            )
        self.num_classes = len(manifest["classes"])
        self.policy = BadSamplePolicy(config.bad_samples)
        self.sampler = EpochShardSampler([shard.url for shard in shards], seed, self.rank)
        transform = build_train_uint8_transform(config)
        collate = NormalizedCollate(BatchNormalize(config))
        stages: list[Any] = [
            self.sampler,
            ReadShards(shards, self.policy),
            EpochShuffle(self.sampler, config.shuffle_buffer),
        ]
        if pk_classes is not None:
            self._check_pk(manifest, config, pk_classes)
            stages += [
                PKGroups(self.sampler, pk_classes, config.pk_samples),
                wds.map(DecodeGroup(transform, collate, self.policy, with_keys)),
            ]
        else:
            stages += [
                wds.map(DecodeSample(transform, self.policy, with_keys)),
                wds.select(is_decoded),
                wds.batched(self.batch_size, partial=False, collation_fn=collate),
            ]
        self.loader = wds.WebLoader(
            wds.DataPipeline(*stages), batch_size=None, num_workers=config.num_workers, persistent_workers=False
        )

    @staticmethod
    def _check_pk(manifest: dict, config: DataConfig, pk_classes: int) -> None:
        counts = manifest["splits"][config.train_split]["class_counts"]
        usable = sum(1 for n in counts.values() if n >= config.pk_samples)
        if usable < pk_classes:
            raise DataError(
                f"P x K sampling needs {pk_classes} classes with >= {config.pk_samples} "
                f"samples; split '{config.train_split}' has {usable}"
            )
        if usable < len(counts):
            log.info(
                "P x K: %d classes have fewer than %d samples and are never sampled",
                len(counts) - usable,
                config.pk_samples,
            )

    @property
    def global_batch(self) -> int:
        """Samples one batch step takes across all ranks: world size x per-rank batch."""
        return self.world_size * self.batch_size

    def batches_done(self, samples_in_epoch: int) -> int:
        """The in-epoch batch index at which ``samples_in_epoch`` samples (counted on any world
        size) have been consumed: rounded up to whole batches of this world size, at most
        ``batches_per_epoch`` (the epoch is over). Resume uses it to move a position saved on
        another number of processes to this one without passing the epoch's end."""
        return min(self.batches_per_epoch, -(-max(0, samples_in_epoch) // self.global_batch))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Stream of ``epoch``; ``start_batch`` > 0 resumes mid-epoch with the remaining count."""
        self.sampler.set_epoch(epoch, start_batch)

    @property
    def skipped(self) -> int:
        """Bad samples this rank dropped so far (skip policy; 0 with stop)."""
        return self.policy.skipped

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.sampler.start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return islice(iter(self.loader), len(self))


def _collate_keyed(items: list[tuple[torch.Tensor, int, str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    images, labels, keys = collate_pairs(items)
    return keys, images, labels


class ShardSamples(IterableDataset):
    """Decoded ``(image, label, key)`` of a list of shards, dealt to DataLoader workers
    (``shards[worker::workers]``); no shard, no sample."""

    def __init__(self, shards: list[ShardSpec], transform, policy: BadSamplePolicy):
        self.shards = shards
        self.decode = DecodeSample(transform, policy, with_key=True)
        self.policy = policy

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str]]:
        worker, workers = worker_index()
        for shard in self.shards[worker::workers]:
            for sample in read_shard(shard, self.policy):
                if (item := self.decode(sample)) is not None:
                    yield item


class EvalLoader:
    """Batches ``(keys, images, labels)`` of one split; across ranks every sample appears once.

    Shards are dealt round-robin to ranks (``shards[rank::world]``), then to DataLoader
    workers; a rank with no shard yields nothing (collectives must therefore gather objects
    of varying length, never assume equal counts). ``num_samples`` is what the manifest lists
    for this rank's shards; fewer come out only when the skip policy dropped bad samples.
    """

    def __init__(
        self,
        config: DataConfig,
        split: str,
        batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        transform=None,
    ):
        self.rank, self.world_size = rank_and_world(rank, world_size)
        manifest = load_manifest(config.shard_dir)
        self.shards = split_shard_specs(manifest, config.shard_dir, split)[self.rank :: self.world_size]
        self.num_samples = sum(shard.count for shard in self.shards)
        self.policy = BadSamplePolicy(config.bad_samples)
        dataset = ShardSamples(self.shards, transform or build_eval_transform(config), self.policy)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size or config.batch_size,
            collate_fn=_collate_keyed,
            num_workers=min(config.num_workers, len(self.shards)),
        )

    def __iter__(self) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
        return iter(self.loader)
