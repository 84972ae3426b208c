"""Resolving an LFW-style pairs file ('name i j' / 'name1 i name2 j') to embedding rows.

A pair names an image by identity and image number. In the shards an image is a key whose
``<key>.json`` record (written by `dml prepare`) holds its original label and source id,
e.g. label ``Aaron_Peirsol`` and source ``Aaron_Peirsol/Aaron_Peirsol_0001.jpg`` (LFW) or
label ``s21`` and source ``s21/3.pgm`` (ORL). The image number is the integer at the end of
the source's file stem, so both layouts resolve without configuration.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dml.errors import DataError, DMLError
from dml.eval.shard_lookup import read_sample_metadata
from dml.eval.verification import VerificationPair, pair_rows, read_pairs_file

log = logging.getLogger(__name__)
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def image_number(source_id: str) -> int | None:
    """The integer that ends the file stem of ``source_id`` ('a/b_0007.jpg' -> 7), or None."""
    stem = Path(source_id).name.split(".", 1)[0]
    match = _TRAILING_NUMBER.search(stem)
    return int(match.group(1)) if match else None


def rows_by_name_and_number(keys: Sequence[str], metadata: dict[str, dict]) -> dict[tuple[str, int], int]:
    """(original label, image number) -> row of ``keys``; keys without a number are skipped."""
    row_of: dict[tuple[str, int], int] = {}
    for row, key in enumerate(keys):
        record = metadata.get(key)
        if record is None:
            continue
        number = image_number(str(record.get("source", "")))
        if number is None:
            continue
        row_of.setdefault((str(record.get("label")), number), row)
    return row_of


def read_pairs_checked(pairs_file: str | Path) -> list[VerificationPair]:
    """The pairs of an LFW-style pairs file; a missing file, a malformed line or a file with
    no pairs is a one-line `DataError` naming the file."""
    path = Path(pairs_file)
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    try:
        pairs = read_pairs_file(path)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if not pairs:
        raise DataError(f"pairs file {path} lists no pairs")
    return pairs


def resolve_pairs_file(
    pairs_file: str | Path, keys: Sequence[str], shard_dir: str | Path, splits: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ((P, 2) int64 into ``keys``) and is_same flags (P,) of every pair in ``pairs_file``.

    ``keys`` are the embedding rows' keys, found in ``splits`` of ``shard_dir``. A missing
    file, a malformed line, or a pair naming an image that has no embedding is a `DMLError`.
    """
    path = Path(pairs_file)
    pairs = read_pairs_checked(path)
    row_of = rows_by_name_and_number(keys, read_sample_metadata(shard_dir, splits))
    log.info("pairs file %s: %d pairs over %d numbered images", path, len(pairs), len(row_of))
    try:
        return pair_rows(pairs, row_of)
    except ValueError as exc:
        raise DMLError(f"pairs file {path}: {exc} in split(s) {', '.join(splits)}") from None
