"""Shard resampling and streaming P x K batch formation.

`EpochShardSampler` draws shards with replacement from a seed that depends on (seed, epoch,
rank, worker): every rank and worker gets its own stream, the stream is the same when a run
is repeated, and it changes every epoch. Together with a fixed number of batches per epoch
this makes uneven ranks impossible (every rank yields exactly the same count).

`pk_groups` turns a sample stream into groups of P classes x K samples with a bounded buffer.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info


def worker_index() -> tuple[int, int]:
    """(this DataLoader worker's index, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class EpochShardSampler(IterableDataset):
    """An endless stream of ``{"url": shard}`` drawn with replacement, seeded per epoch/rank/worker."""

    def __init__(self, urls: list[str], seed: int, rank: int):
        if not urls:
            raise ValueError("no shards to sample from")
        self.urls = list(urls)
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the stream of ``epoch`` (resumed at ``start_batch``: a fresh stream, since
        resampled streams need the count of batches to match, not the exact samples)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def rng(self, purpose: str) -> random.Random:
        """A generator for one purpose, seeded by (seed, epoch, rank, worker, purpose)."""
        worker, _ = worker_index()
        return random.Random(f"{self.seed}/{self.epoch}/{self.start_batch}/{self.rank}/{worker}/{purpose}")

    def __iter__(self) -> Iterator[dict[str, str]]:
        rng = self.rng("shards")
        while True:
            yield {"url": rng.choice(self.urls)}


class EpochShuffle:
    """A shuffle buffer whose randomness follows the sampler's (seed, epoch, rank, worker)."""

    def __init__(self, sampler: EpochShardSampler, buffer_size: int):
        self.sampler = sampler
        self.buffer_size = buffer_size

    def __call__(self, samples: Iterable[Any]) -> Iterator[Any]:
        if self.buffer_size <= 1:
            yield from samples
            return
        rng = self.sampler.rng("shuffle")
        buffer: list[Any] = []
        for sample in samples:
            if len(buffer) < self.buffer_size:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


class PKGroups:
    """Pipeline stage around `pk_groups`, seeded like the sampler's other streams."""

    def __init__(self, sampler: EpochShardSampler, classes_per_batch: int, samples_per_class: int):
        self.sampler = sampler
        self.p, self.k = classes_per_batch, samples_per_class

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        return pk_groups(samples, self.p, self.k, rng=self.sampler.rng("pk"))


def pk_groups(
    samples: Iterable[dict[str, Any]],
    classes_per_batch: int,
    samples_per_class: int,
    rng: random.Random | None = None,
    max_buffer: int = 50_000,
) -> Iterator[list[dict[str, Any]]]:
    """Group a stream of samples (each with an int ``cls``) into P x K lists.

    Samples wait in per-class queues; once P classes hold K samples each, P of those ready
    classes are drawn at random and K samples taken from each. When the buffer passes
    ``max_buffer`` samples the oldest sample of the fullest class is dropped (the stream is
    resampled, so this loses coverage of one draw, not data). Peak memory: ``max_buffer`` raw
    (still encoded) samples. A class whose whole stream never reaches K samples in the buffer
    is never emitted, so keep ``max_buffer`` well above P x K x (number of classes / P).
    """
    rng = rng or random.Random(0)
    queues: dict[int, deque] = defaultdict(deque)
    ready: set[int] = set()
    held = 0
    for sample in samples:
        label = int(sample["cls"])
        queues[label].append(sample)
        held += 1
        if len(queues[label]) >= samples_per_class:
            ready.add(label)
        if held > max_buffer:
            fullest = max(queues, key=lambda c: len(queues[c]))
            queues[fullest].popleft()
            held -= 1
            if len(queues[fullest]) < samples_per_class:
                ready.discard(fullest)
        if len(ready) >= classes_per_batch:
            chosen = rng.sample(sorted(ready), classes_per_batch)
            group: list[Any] = []
            for label in chosen:
                group.extend(queues[label].popleft() for _ in range(samples_per_class))
                held -= samples_per_class
                if len(queues[label]) < samples_per_class:
                    ready.discard(label)
                if not queues[label]:
                    del queues[label]
            yield group


def collate_pairs(items: list[tuple]) -> tuple:
    """Stack (image, label[, key]) items into (images, labels[, keys])."""
    images, labels, *rest = zip(*items, strict=True)
    batch = (torch.stack(images), torch.tensor(labels, dtype=torch.long))
    return (*batch, list(rest[0])) if rest else batch
