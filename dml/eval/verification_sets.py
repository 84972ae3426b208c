"""Face verification sets (`train.verification_sets`, `evaluate.verification_sets`): load
them, embed their images with a model on every rank, and score them with the 10-fold protocol.

A set is an insightface `.bin` (`dml.eval.bin_reader`) or an LFW-style pairs file read against
a folder of images ``<folder>/<name>/<file ending in the image number>`` (LFW's
``Aaron_Peirsol/Aaron_Peirsol_0001.jpg``, ORL's ``s21/3.pgm``). Each distinct image is
decoded and embedded once; pairs refer to images by row.

Embedding is collective when a process group is up: rank r embeds the r-th contiguous share
of the images and every rank receives all embeddings (``all_gather_object``), so every rank
computes the same metrics and no rank waits on another's result. A rank that cannot decode
an image reports it through the same gather, and every rank then raises the same one-line
`DataError`, so a bad image never leaves the other ranks hanging.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dml.config import DataConfig, VerificationSetConfig
from dml.data.transforms import build_eval_transform
from dml.distributed import gather_objects, get_rank, get_world_size
from dml.errors import DataError
from dml.eval.bin_reader import read_verification_bin
from dml.eval.embed import embed_batches
from dml.eval.face_verification import face_verification_metrics
from dml.eval.pairs_lookup import image_number, read_pairs_checked

log = logging.getLogger(__name__)


@dataclass
class VerificationSet:
    """Encoded ``images`` (each distinct image once), ``pair_rows`` (P, 2) int64 into them
    and ``is_same`` (P,) bool, in file order."""

    name: str
    source: str
    images: list[bytes]
    pair_rows: np.ndarray
    is_same: np.ndarray


def _folder_index(folder: Path) -> dict[tuple[str, int], Path]:
    """(identity folder name, image number) -> file, for the files one level under ``folder``."""
    index: dict[tuple[str, int], Path] = {}
    for person in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(person.iterdir()):
            number = image_number(file.name)
            if number is not None and file.is_file():
                index.setdefault((person.name, number), file)
    return index


def _load_pairs_folder(spec: VerificationSetConfig) -> VerificationSet:
    pairs_path, folder = Path(spec.path), Path(spec.folder or "")
    pairs = read_pairs_checked(pairs_path)
    if not folder.is_dir():
        raise DataError(f"image folder of {pairs_path} not found: {folder}")
    index = _folder_index(folder)
    files: dict[Path, int] = {}
    rows = np.empty((len(pairs), 2), np.int64)
    for number, pair in enumerate(pairs):
        for side, key in enumerate(((pair.name1, pair.index1), (pair.name2, pair.index2))):
            if key not in index:
                raise DataError(
                    f"{pairs_path}: pair {number + 1} names image {key[1]} of '{key[0]}', which is not in {folder}"
                )
            rows[number, side] = files.setdefault(index[key], len(files))
    images = [path.read_bytes() for path in files]
    return VerificationSet(
        spec.set_name, f"{pairs_path} on {folder}", images, rows, np.array([p.is_same for p in pairs], bool)
    )


def load_verification_set(spec: VerificationSetConfig) -> VerificationSet:
    """Read one set; any unreadable or malformed input is a one-line `DataError`."""
    if spec.folder is None:
        content = read_verification_bin(spec.path)
        rows = np.arange(len(content.images), dtype=np.int64).reshape(-1, 2)
        loaded = VerificationSet(spec.set_name, spec.path, content.images, rows, content.is_same)
    else:
        loaded = _load_pairs_folder(spec)
    log.info(
        "verification set %s: %d pairs (%d same), %d images from %s",
        loaded.name,
        len(loaded.is_same),
        int(loaded.is_same.sum()),
        len(loaded.images),
        loaded.source,
    )
    return loaded


def _decode(data: bytes, transform, where: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return transform(image)
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for undecodable bytes
        raise DataError(f"{where}: cannot decode image: {type(exc).__name__}: {exc}") from None


def _embed_share(
    model: torch.nn.Module,
    images: Sequence[bytes],
    start: int,
    data: DataConfig,
    device: torch.device,
    flip: bool,
    batch_size: int,
    source: str,
) -> np.ndarray:
    transform = build_eval_transform(data)
    parts = []
    for offset in range(0, len(images), batch_size):
        batch = [
            _decode(images[i], transform, f"{source}: image {start + i}")
            for i in range(offset, min(offset + batch_size, len(images)))
        ]
        parts.append(embed_batches(model, torch.stack(batch).to(device), flip).cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def embed_images(
    model: torch.nn.Module,
    images: Sequence[bytes],
    data: DataConfig,
    device: torch.device,
    flip: bool = False,
    batch_size: int = 64,
    source: str = "verification set",
) -> np.ndarray:
    """Embeddings (N, D) float32 of encoded ``images``, preprocessed like evaluation
    (`build_eval_transform` of ``data``); collective over the process group when there is
    one. Raises `DataError` on every rank when any rank meets an undecodable image."""
    world, rank = get_world_size(), get_rank()
    start, stop = rank * len(images) // world, (rank + 1) * len(images) // world
    was_training = model.training
    model.eval()
    try:
        mine: Any = _embed_share(model, images[start:stop], start, data, device, flip, batch_size, source)
    except DataError as exc:
        if world == 1:
            raise
        mine = str(exc)
    finally:
        model.train(was_training)
    parts = gather_objects(mine)
    errors = [part for part in parts if isinstance(part, str)]
    if errors:
        raise DataError(errors[0])
    dim = next((p.shape[1] for p in parts if len(p)), 0)
    return np.concatenate([p.reshape(-1, dim) for p in parts]).astype(np.float32)


@dataclass
class PairEmbeddings:
    """A set's embeddings in the `.bin` layout: ``vectors`` (2P, D), pair i in rows 2i, 2i + 1."""

    name: str
    source: str
    vectors: np.ndarray
    is_same: np.ndarray


def embed_verification_set(
    model: torch.nn.Module,
    loaded: VerificationSet,
    data: DataConfig,
    device: torch.device,
    flip: bool = False,
    batch_size: int = 64,
) -> PairEmbeddings:
    """Embed every distinct image of ``loaded`` once (collective) and lay them out in pairs."""
    vectors = embed_images(model, loaded.images, data, device, flip, batch_size, loaded.source)
    return PairEmbeddings(loaded.name, loaded.source, vectors[loaded.pair_rows.reshape(-1)], loaded.is_same)


def score_pair_embeddings(pairs: PairEmbeddings, fars: Sequence[float]) -> dict[str, Any]:
    """`face_verification_metrics` of one set, with its name and source."""
    return {
        "name": pairs.name,
        "source": pairs.source,
        **face_verification_metrics(pairs.vectors, pairs.is_same, fars=fars),
    }


def flat_metrics(name: str, metrics: dict[str, Any], prefix: str = "ver_") -> dict[str, float]:
    """The scalar numbers of one set for metrics.jsonl / headlines: ``ver_<name>_accuracy``,
    ``_accuracy_std``, ``_best_threshold_accuracy``, ``_val_at_far_<far>``,
    ``_tar_at_far_<far>``, ``_roc_auc``, ``_eer`` (None values left out)."""
    val = metrics["val_at_far"]
    values: dict[str, Any] = {
        "accuracy": metrics["accuracy"],
        "accuracy_std": metrics["accuracy_std"],
        "best_threshold_accuracy": metrics["best_threshold_accuracy"],
        f"val_at_far_{val['far_target']:.0e}": val["val"],
        "roc_auc": metrics["roc_auc"],
        "eer": metrics["eer"],
    }
    values.update({f"tar_at_far_{key}": tar for key, tar in (metrics["tar_at_far"] or {}).items()})
    return {f"{prefix}{name}_{key}": float(value) for key, value in values.items() if value is not None}


def make_verification_evaluator(
    specs: Sequence[VerificationSetConfig],
    data: DataConfig,
    device: torch.device,
    fars: Sequence[float],
    flip: bool = False,
):
    """A callable ``model -> {ver_<name>_<metric>: value}`` for periodic evaluation in
    training (collective; every rank gets the same numbers), or None without sets. The sets
    are read once, here, on every rank: a bad file stops the run before its first step."""
    loaded = [load_verification_set(spec) for spec in specs]
    if not loaded:
        return None

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for one in loaded:
            pairs = embed_verification_set(model, one, data, device, flip, batch_size=max(64, data.batch_size))
            out.update(flat_metrics(one.name, score_pair_embeddings(pairs, fars)))
        return out

    return evaluate
