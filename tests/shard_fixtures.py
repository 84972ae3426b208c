"""Shard sets of an exact shape (samples per shard, per split), written directly with the
project's tar writer and a manifest, for reader tests that need many shapes quickly."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from dml.data.tar_members import DeterministicTarWriter, iter_tar_members
from dml.files import sha256_file


def tiny_png(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_members(key: str, label: int, seed: int) -> list[tuple[str, bytes]]:
    """The three members `dml prepare` writes for one sample, in its order."""
    meta = json.dumps({"label": label, "source_id": key}).encode()
    return [(f"{key}.png", tiny_png(seed)), (f"{key}.cls", str(label).encode()), (f"{key}.json", meta)]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    writer = DeterministicTarWriter(path)
    for name, data in members:
        writer.add(name, data)
    writer.close()


def write_shard_set(root: Path, shapes: dict[str, list[int]], classes: int = 3) -> Path:
    """``shapes``: split -> samples in each of its shards. Sample ``i`` of a split has key
    ``<split>-<i:05d>`` and class ``i % classes``. Returns ``root`` (with manifest.json)."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, sizes in shapes.items():
        shards, index = [], 0
        class_counts: Counter[int] = Counter()
        for number, size in enumerate(sizes):
            members = []
            counts: Counter[int] = Counter()
            for _ in range(size):
                label = index % classes
                members += sample_members(f"{split}-{index:05d}", label, seed=index)
                counts[label] += 1
                index += 1
            name = f"{split}-{number:06d}.tar"
            write_tar(root / name, members)
            class_counts.update(counts)
            shards.append(
                {"name": name, "count": size, "bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
            )
        splits[split] = {
            "count": index,
            "num_classes": len(class_counts),
            "shards": shards,
            "class_counts": {str(k): class_counts[k] for k in sorted(class_counts)},
        }
    manifest = {
        "format_version": 1,
        "created_by": "dml prepare",
        "classes": [f"class{c}" for c in range(classes)],
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def split_keys(shard_dir: Path, split: str) -> list[str]:
    """Every sample key of ``split``, as `write_shard_set` named them."""
    count = json.loads((shard_dir / "manifest.json").read_text())["splits"][split]["count"]
    return [f"{split}-{i:05d}" for i in range(count)]


def rewrite_tar(path: Path, change) -> None:
    """Rewrite a shard through ``change(name, data) -> (name, data) | None`` (None drops the member)."""
    with open(path, "rb") as stream:
        members = list(iter_tar_members(stream, str(path)))
    write_tar(path, [m for m in (change(name, data) for name, data in members) if m is not None])
