"""Class-disjoint folds of the training classes, each written as an ordinary shard folder.

Fold ``i`` holds the training split's samples of every class outside fold ``i`` as its
``train`` split and those of fold ``i`` as ``query`` (leave-one-out validation), so every
trial fold is a plain `dml train` on a plain shard folder. The held-out test classes (the
base shards' query/gallery) never enter a fold.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dml.config import PrepareConfig
from dml.data.manifest import MANIFEST, load_manifest
from dml.data.reading import IMAGE_PARTS, BadSamplePolicy, read_shard, split_shard_specs
from dml.data.records import Record
from dml.data.shards import PROGRESS_DIR, write_shards
from dml.errors import DataError

log = logging.getLogger(__name__)


def class_folds(classes: list[str], k: int, seed: int) -> list[list[str]]:
    """``classes`` shuffled by ``seed`` and dealt into ``k`` disjoint folds whose sizes differ
    by at most one. Raises `DataError` when there are fewer than ``k`` classes."""
    if len(classes) < k:
        raise DataError(f"{len(classes)} training classes cannot make {k} class-disjoint folds")
    order = [classes[i] for i in np.random.default_rng(seed).permutation(len(classes))]
    return [sorted(order[i::k]) for i in range(k)]


class SplitSource:
    """A `dml.data.sources.Source` over one split of prepared shards: each sample's encoded
    image as it is stored, its class name as label, and split hint ``test`` for the classes
    in ``held_out`` (``train`` otherwise)."""

    def __init__(self, shard_dir: str | Path, split: str, held_out: set[str]):
        self.shard_dir, self.split, self.held_out = Path(shard_dir), split, held_out
        self.description = {"kind": "shards", "path": str(self.shard_dir), "split": split}
        self._images: dict[str, bytes] = {}
        self._labels: dict[str, str] = {}

    def _load(self) -> None:
        manifest = load_manifest(self.shard_dir)
        names = manifest["classes"]
        for spec in split_shard_specs(manifest, self.shard_dir, self.split):
            for sample in read_shard(spec, BadSamplePolicy("stop")):
                source_id = f"{Path(spec.url).name}:{sample['__key__']}"
                self._images[source_id] = next(sample[p] for p in IMAGE_PARTS if p in sample)
                self._labels[source_id] = names[int(sample["cls"])]

    def records(self) -> list[Record]:
        """Every sample of the split, in the held-out classes' ``test`` split or ``train``."""
        if not self._images:
            self._load()
        return [
            Record(sid, label, "test" if label in self.held_out else "train")
            for sid, label in sorted(self._labels.items())
        ]

    def read(self, record: Record) -> bytes:
        """The sample's encoded image bytes."""
        return self._images[record.source_id]

    def size_hint(self, record: Record) -> int:
        """The sample's encoded size in bytes."""
        return len(self._images[record.source_id])


def training_classes(shard_dir: str | Path, split: str = "train") -> list[str]:
    """Names of the classes that have samples in ``split`` of the prepared shards.

    Raises DataError when the shards have no such split.
    """
    manifest = load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{shard_dir}: no '{split}' split to fold (has: {', '.join(manifest['splits'])})")
    return [manifest["classes"][int(i)] for i in manifest["splits"][split]["class_counts"]]


def write_fold_shards(
    shard_dir: str | Path, train_split: str, folds: list[list[str]], out_dir: str | Path, max_samples: int = 5000
) -> list[Path]:
    """Write one shard folder per fold under ``out_dir`` (``fold-0/`` ...) and return them;
    a fold already written (its manifest exists) is kept, so a resumed study reuses it."""
    out = []
    for index, held_out in enumerate(folds):
        fold_dir = Path(out_dir) / f"fold-{index}"
        out.append(fold_dir)
        if (fold_dir / MANIFEST).exists():
            continue
        config = PrepareConfig.model_validate(
            {
                "output_dir": str(fold_dir),
                "split": {"mode": "source", "query_fraction": 1.0},
                "shards": {"max_samples": max_samples},
            }
        )
        source = SplitSource(shard_dir, train_split, set(held_out))
        log.info("tune: fold %d of %d: %d validation classes -> %s", index + 1, len(folds), len(held_out), fold_dir)
        write_shards(config, resume=(fold_dir / PROGRESS_DIR).exists(), source=source)
    return out
