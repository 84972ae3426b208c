"""Teacher embeddings of the training split, computed once and reused across runs.

Layout, next to the data::

    <shard_dir>/teacher_cache/<teacher sha256[:16]>-<manifest sha256[:16]>-<split>-<view>/
        meta.json      format, both full hashes, split, view, count, embedding_dim, skipped
        vectors.npy    (N, D) float32, rows in key order
        keys.json      the N sample keys, sorted (the training loader's ``__key__``)

``view`` is ``flipavg`` when ``data.augment.horizontal_flip`` is on: the cached target is
then the teacher's embedding of the image averaged with that of its mirror image and
re-normalised, a flip-invariant target, because the cache cannot know which of the two
views the augmented training batch holds. Otherwise ``plain``. Images are embedded
un-augmented with the teacher's own preprocessing (size, mean, std); other augmentations
(crops, rotation, jitter) are not reflected, use ``teacher_embeddings: on_the_fly`` when
they matter.

A cache is used only when its meta.json names exactly the teacher weights and the manifest
of this run and its files hold the manifest's sample count (less the bad samples skipped
under ``data.bad_samples=skip``, recorded as ``skipped``); anything else (another teacher,
other data, a half-written or damaged folder) is rebuilt, never used. The folder is written
under a temporary name and renamed, so readers never see a partial cache.

Cost: N x D x 4 bytes on disk, memory-mapped by every rank (pages shared between ranks of a
node); the sorted key array is held in RAM (about N x longest key x 4 bytes) for
binary-search lookup. Building it gathers all N embeddings on every rank (as
`extract_embeddings` does) before rank 0 writes them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dml.config import DataConfig
from dml.data.manifest import load_manifest, manifest_digest
from dml.distill.teacher import TeacherRecord
from dml.distributed import barrier, broadcast_object, get_rank
from dml.errors import DataError
from dml.eval.embed import extract_embeddings
from dml.models.model_file import load_final_model

log = logging.getLogger(__name__)
CACHE_ROOT = "teacher_cache"
CACHE_FORMAT = "dml.teacher_cache/1"


def cache_meta(record: TeacherRecord, data: DataConfig) -> dict[str, Any]:
    """What a valid cache for this teacher and these shards must declare in meta.json.

    Raises DataError when the manifest has no ``data.train_split``.
    """
    manifest = load_manifest(data.shard_dir)
    if data.train_split not in manifest["splits"]:
        raise DataError(f"split '{data.train_split}' not in manifest (has: {', '.join(manifest['splits'])})")
    return {
        "format": CACHE_FORMAT,
        "teacher_sha256": record.sha256,
        "manifest_sha256": manifest_digest(data.shard_dir),
        "split": data.train_split,
        "view": "flipavg" if data.augment.horizontal_flip else "plain",
        "count": int(manifest["splits"][data.train_split]["count"]),
        "embedding_dim": record.embedding_dim,
    }


def cache_dir(shard_dir: str | Path, meta: dict[str, Any]) -> Path:
    """The folder a cache with ``meta`` lives in (see the module docstring)."""
    name = f"{meta['teacher_sha256'][:16]}-{meta['manifest_sha256'][:16]}-{meta['split']}-{meta['view']}"
    return Path(shard_dir) / CACHE_ROOT / name


def cache_problem(directory: Path, expected: dict[str, Any]) -> str | None:
    """Why the cache in ``directory`` cannot be used, or None when it matches ``expected``."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return "no meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return "meta.json is not valid JSON"
    differing = [k for k, v in expected.items() if meta.get(k) != v]
    if differing:
        return f"meta.json differs in {', '.join(differing)}"
    try:
        vectors = np.load(directory / "vectors.npy", mmap_mode="r")
        keys = json.loads((directory / "keys.json").read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable cache files ({exc})"
    rows = expected["count"] - int(meta.get("skipped", 0))  # bad samples skipped when it was built
    if vectors.shape != (rows, expected["embedding_dim"]) or len(keys) != rows:
        return f"holds {len(keys)} keys / vectors {vectors.shape}, expected {rows}"
    return None


def build_cache(
    record: TeacherRecord, data: DataConfig, directory: Path, meta: dict[str, Any], device: torch.device
) -> None:
    """Embed the training split with the teacher and write the cache (collective).

    Every rank embeds its share of the shards (`extract_embeddings`), the parts are gathered,
    rank 0 writes under a temporary name and renames; all ranks leave after a barrier.

    Raises DataError when the embedded keys repeat or do not account for every sample.
    """
    teacher, _ = load_final_model(record.model_path, device)
    view = record.data.model_copy(
        update={
            "shard_dir": data.shard_dir,
            "train_split": data.train_split,
            "num_workers": data.num_workers,
            "batch_size": data.batch_size,
            "bad_samples": data.bad_samples,
        }
    )
    embedded = extract_embeddings(teacher, view, data.train_split, device, flip=meta["view"] == "flipavg")
    skipped = meta["count"] - len(embedded.keys)  # > 0 only when data.bad_samples=skip dropped some
    if len(set(embedded.keys)) != len(embedded.keys) or skipped < 0 or (skipped and data.bad_samples != "skip"):
        raise DataError(
            f"teacher cache: embedded {len(embedded.keys)} samples "
            f"({len(set(embedded.keys))} distinct keys) of split '{data.train_split}', "
            f"the manifest lists {meta['count']}"
        )
    if skipped:
        log.warning(
            "teacher cache: %d of the %d samples of split '%s' were skipped as bad; training skips the same ones",
            skipped,
            meta["count"],
            data.train_split,
        )
    if get_rank() == 0:
        tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "vectors.npy", embedded.vectors.astype(np.float32))
        (tmp / "keys.json").write_text(json.dumps(embedded.keys))
        (tmp / "meta.json").write_text(
            json.dumps({**meta, "teacher_path": str(record.model_path), "skipped": skipped}, indent=1)
        )
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
        log.info("teacher cache: wrote %d x %d embeddings -> %s", *embedded.vectors.shape, directory)
    barrier()


@dataclass
class TeacherCache:
    """An opened cache: ``lookup(keys)`` returns the teacher embeddings of those samples.

    ``rebuilt`` tells whether this run had to (re)compute it.
    """

    directory: Path
    keys: np.ndarray
    vectors: np.ndarray
    rebuilt: bool

    @classmethod
    def open(cls, directory: Path, rebuilt: bool) -> TeacherCache:
        """Open a cache folder: ``keys.json`` and ``vectors.npy`` (N, D_teacher) memory-mapped."""
        keys = np.asarray(json.loads((directory / "keys.json").read_text()), dtype=str)
        return cls(directory, keys, np.load(directory / "vectors.npy", mmap_mode="r"), rebuilt)

    def lookup(self, keys: list[str]) -> np.ndarray:
        """(len(keys), D) float32 rows; a key not in the cache is a `DataError`."""
        wanted = np.asarray(keys, dtype=str)
        rows = np.searchsorted(self.keys, wanted)
        found = rows < len(self.keys)
        found[found] = self.keys[rows[found]] == wanted[found]
        if not found.all():
            raise DataError(f"sample '{wanted[~found][0]}' is not in the teacher cache {self.directory}")
        return np.asarray(self.vectors[rows], dtype=np.float32)


def ensure_teacher_cache(record: TeacherRecord, data: DataConfig, device: torch.device) -> TeacherCache:
    """Open the valid cache for this teacher and data, building it first if needed (collective).

    Rank 0 decides whether the cache is usable and tells the others, so every rank takes
    the same path even if the file system changes underneath.
    """
    meta = cache_meta(record, data)
    directory = cache_dir(data.shard_dir, meta)
    problem = broadcast_object(cache_problem(directory, meta) if get_rank() == 0 else None)
    if problem is not None:
        if directory.exists():
            log.info("teacher cache: %s is stale (%s): rebuilding", directory, problem)
        build_cache(record, data, directory, meta, device)
    else:
        log.info("teacher cache: reusing %s", directory)
    return TeacherCache.open(directory, rebuilt=problem is not None)


class CachedTeacher:
    """Teacher embeddings looked up by sample key instead of computed (see module docstring)."""

    def __init__(self, cache: TeacherCache, device: torch.device):
        self.cache, self.device = cache, device
        self.embedding_dim = cache.vectors.shape[1]

    def embed(self, images: torch.Tensor | None, keys: list[str] | None) -> torch.Tensor:
        """(B, D_teacher) float32 teacher embeddings of the batch's samples, on the device.

        Raises ValueError without ``keys``.
        """
        if keys is None:
            raise ValueError("cached teacher embeddings need the batch's sample keys (TrainLoader with_keys=True)")
        return torch.from_numpy(self.cache.lookup(list(keys))).to(self.device)
