"""Reading individual samples back from a split's shards by key, for reports.

Shards are plain tar streams without an index, so a lookup scans the split's shards in
manifest order and stops as soon as every wanted key has been seen. That is one sequential
read of the split at worst, which is fine for the handful of images a retrieval grid shows
or the per-sample metadata a pairs file needs, and never loads more than one sample at a time.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dml.data.manifest import load_manifest
from dml.data.reading import (
    BadSamplePolicy,
    decode_image,
    read_shard,
    split_shard_specs,
)


def iter_split_samples(shard_dir: str | Path, splits: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Raw WebDataset sample dicts (``__key__`` plus bytes per extension) of ``splits``, in shard
    order. Bad samples are passed over without a word: the evaluation that needs these
    look-ups has already stopped on them or warned about them and counted them."""
    manifest = load_manifest(shard_dir)
    for split in splits:
        for shard in split_shard_specs(manifest, shard_dir, split):
            yield from read_shard(shard, BadSamplePolicy("skip", warn=False))


def read_images_by_key(shard_dir: str | Path, splits: Iterable[str], keys: Collection[str]) -> dict[str, np.ndarray]:
    """Decoded images (H, W) grey or (H, W, 3) RGB uint8 of ``keys``, found in ``splits``' shards.

    Keys not found are simply absent from the result. Peak memory: the wanted images plus
    one raw sample.
    """
    wanted = set(keys)
    images: dict[str, np.ndarray] = {}
    for sample in iter_split_samples(shard_dir, splits):
        key = sample["__key__"]
        if key not in wanted:
            continue
        image = decode_image(sample, BadSamplePolicy("skip", warn=False))
        if image is not None:
            images[key] = np.asarray(image)  # oriented L or RGB (dml.data.pixels)
        if len(images) == len(wanted):
            break
    return images


def read_sample_metadata(shard_dir: str | Path, splits: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per key the ``<key>.json`` record `dml prepare` wrote (source id, original label, ...)."""
    records: dict[str, dict[str, Any]] = {}
    for sample in iter_split_samples(shard_dir, splits):
        if "json" in sample:
            records[sample["__key__"]] = json.loads(sample["json"])
    return records
