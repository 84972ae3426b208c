"""The embeddings an evaluation ran on, saved so its metrics can be recomputed without the model.

Layout of the directory (``<output_dir>/embeddings`` by default)::

    <split>.npy  <split>_labels.npy  <split>_keys.json   one set per split (see `Embeddings`)
    verification_<name>.npy  verification_<name>_is_same.npy   a face verification set (pair layout)
    meta.json                                            where they came from (model, data)

``meta.json`` carries the model file's sha256 and the data manifest's sha256, so a report
built from saved embeddings still names the exact model and data behind its numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dml.errors import DMLError, first_line
from dml.eval.embed import Embeddings
from dml.eval.verification_sets import PairEmbeddings

META_FILE = "meta.json"
FORMAT = "dml.embeddings/1"


@dataclass
class EmbeddingSet:
    """Query embeddings, optional gallery embeddings, and provenance (``meta``)."""

    query_split: str
    query: Embeddings
    gallery_split: str | None = None
    gallery: Embeddings | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    verification: list[PairEmbeddings] = field(default_factory=list)

    def splits(self) -> list[str]:
        """The embedded splits: the query split, then the gallery split when there is a gallery."""
        if self.gallery is not None and self.gallery_split is not None:
            return [self.query_split, self.gallery_split]
        return [self.query_split]

    def save(self, directory: str | Path) -> Path:
        """Write every split and ``meta.json`` (rank 0 only); returns the directory."""
        directory = Path(directory)
        self.query.save(directory, self.query_split)
        if self.gallery is not None and self.gallery_split is not None:
            self.gallery.save(directory, self.gallery_split)
        for pairs in self.verification:
            np.save(directory / f"verification_{pairs.name}.npy", pairs.vectors)
            np.save(directory / f"verification_{pairs.name}_is_same.npy", pairs.is_same)
        meta = {
            **self.meta,
            "format": FORMAT,
            "query_split": self.query_split,
            "gallery_split": self.gallery_split,
            "verification_sets": {pairs.name: pairs.source for pairs in self.verification},
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        return directory


def load_embedding_set(
    directory: str | Path, query_split: str, gallery_split: str | None, verification_sets: list[str] | None = None
) -> EmbeddingSet:
    """Load the saved ``query_split`` (and ``gallery_split``, and the named face
    ``verification_sets``) embeddings from ``directory``.

    A missing directory, split, verification set or ``meta.json`` is a one-line `DMLError`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DMLError(f"embeddings directory not found: {directory}")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise DMLError(f"{directory} holds no {META_FILE}: not an embeddings directory written by `dml evaluate`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise DMLError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    query = _load_split(directory, query_split)
    gallery = _load_split(directory, gallery_split) if gallery_split is not None else None
    sources = meta.get("verification_sets", {})
    verification = []
    for name in verification_sets or []:
        if name not in sources:
            raise DMLError(
                f"no saved embeddings for verification set '{name}' in {directory} "
                f"(has: {', '.join(sources) or 'none'}): evaluate with the model instead"
            )
        verification.append(
            PairEmbeddings(
                name,
                sources[name],
                np.load(directory / f"verification_{name}.npy"),
                np.load(directory / f"verification_{name}_is_same.npy"),
            )
        )
    return EmbeddingSet(query_split, query, gallery_split, gallery, meta, verification)


def _load_split(directory: Path, split: str) -> Embeddings:
    missing = [
        name
        for name in (f"{split}.npy", f"{split}_labels.npy", f"{split}_keys.json")
        if not (directory / name).is_file()
    ]
    if missing:
        raise DMLError(f"no saved embeddings for split '{split}' in {directory} (missing {', '.join(missing)})")
    try:
        embeddings = Embeddings.load(directory, split)
    except (ValueError, OSError, json.JSONDecodeError) as exc:  # object arrays (no pickles), damaged files
        raise DMLError(
            f"saved embeddings of split '{split}' in {directory} cannot be read: {first_line(exc)}"
        ) from None
    vectors, labels = embeddings.vectors, embeddings.labels
    problem = None
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not np.issubdtype(vectors.dtype, np.floating):
        problem = f"{split}.npy must be a non-empty 2-D float array (N, D), got {vectors.dtype} {vectors.shape}"
    elif not np.isfinite(vectors).all():
        bad_rows = np.flatnonzero(~np.isfinite(vectors).all(1))
        problem = f"{split}.npy holds NaN or infinite values in {len(bad_rows)} rows (first: {bad_rows[:5].tolist()})"
    elif labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.str_)):
        problem = f"{split}_labels.npy must be a 1-D integer or string array, got {labels.dtype} {labels.shape}"
    if problem:
        raise DMLError(f"{directory}: {problem}")
    if not (len(embeddings.keys) == len(embeddings.vectors) == len(embeddings.labels)):
        raise DMLError(
            f"saved embeddings of split '{split}' in {directory} are inconsistent: "
            f"{len(embeddings.keys)} keys, {len(embeddings.vectors)} vectors, "
            f"{len(embeddings.labels)} labels"
        )
    return embeddings
