"""Distributed embedding extraction: every rank embeds a disjoint part of a split, results
are gathered in key order, and saved as ``.npy`` + keys + labels so metrics can be recomputed
without the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dml.config import DataConfig
from dml.data.loader import EvalLoader
from dml.distributed import gather_objects, get_rank
from dml.errors import DataError
from dml.progress import progress

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """Embeddings of one split, sorted by key: ``vectors`` (N, D) float32 L2-normalised."""

    keys: list[str]
    vectors: np.ndarray
    labels: np.ndarray

    def save(self, directory: str | Path, name: str) -> Path:
        """Write ``<name>.npy`` (N, D), ``<name>_labels.npy`` (N,) and ``<name>_keys.json``; returns the first path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / f"{name}.npy", self.vectors)
        np.save(directory / f"{name}_labels.npy", self.labels)
        (directory / f"{name}_keys.json").write_text(json.dumps(self.keys))
        return directory / f"{name}.npy"

    @classmethod
    def load(cls, directory: str | Path, name: str) -> Embeddings:
        """Read the three files `save` wrote for ``name``."""
        directory = Path(directory)
        return cls(
            json.loads((directory / f"{name}_keys.json").read_text()),
            np.load(directory / f"{name}.npy"),
            np.load(directory / f"{name}_labels.npy"),
        )


@torch.no_grad()
def embed_batches(model: nn.Module, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Embed a batch; with ``flip`` average with the horizontally flipped view, re-normalised."""
    out = model(images)
    if flip:
        out = F.normalize(out + model(torch.flip(images, dims=[3])), dim=1)
    return out.float()


def _gather(keys: list[str], vectors: np.ndarray, labels: np.ndarray, error: DataError | None = None) -> Embeddings:
    """Every rank's part, in key order (collective). A rank that could not read its part sends
    its error instead, and every rank raises the first one, so none waits for the failed one."""
    parts = gather_objects((keys, vectors, labels, error))
    errors = [p[3] for p in parts if p[3] is not None]
    if errors:
        raise errors[0]
    all_keys = [k for p in parts for k in p[0]]
    dim = next((p[1].shape[1] for p in parts if len(p[0])), 0)
    all_vectors = np.concatenate([p[1].reshape(-1, dim) for p in parts]).astype(np.float32)
    all_labels = np.concatenate([p[2] for p in parts]).astype(np.int64)
    order = np.argsort(np.asarray(all_keys), kind="stable")
    return Embeddings([all_keys[i] for i in order], all_vectors[order], all_labels[order])


def extract_embeddings(
    model: nn.Module,
    data: DataConfig,
    split: str,
    device: torch.device,
    flip: bool = False,
    batch_size: int | None = None,
) -> Embeddings:
    """Embed ``split`` on all ranks (collective) and return every sample's embedding, in key order.

    Bad samples follow ``data.bad_samples``: with ``stop`` every rank raises the first rank's
    `DataError`; with ``skip`` fewer samples than the manifest lists come back (callers compare
    with the manifest's count).
    """
    was_training = model.training
    model.eval()
    loader = EvalLoader(data, split, batch_size=batch_size or max(64, data.batch_size))
    keys: list[str] = []
    vectors, labels = [], []
    show = get_rank() == 0
    error: DataError | None = None
    try:
        for batch_keys, images, batch_labels in progress(
            loader, desc=f"embed {split}", unit="batch", show=show, leave=False
        ):
            keys.extend(batch_keys)
            vectors.append(embed_batches(model, images.to(device), flip).cpu().numpy())
            labels.append(batch_labels.numpy())
    except DataError as exc:
        error = exc.with_traceback(None)
    model.train(was_training)
    local = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    local_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    return _gather(keys, local, local_labels, error)
