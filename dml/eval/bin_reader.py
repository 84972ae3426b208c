"""Reading insightface's `.bin` verification sets (LFW, CFP-FP, AgeDB-30, ...) safely.

A `.bin` file is a pickle of ``(images, is_same)``: ``images`` a list of encoded images
(JPEG / PNG bytes), ``is_same`` a list of bools, one per pair; images 2i and 2i + 1 form
pair i. insightface writes them with Python 2's pickle (protocol 2, image strings that
Python 3 reads as bytes with ``encoding="bytes"``) and Python 3's (protocol 4: bytes).

The file is untrusted: plain ``pickle.load`` would run any callable the file names. Here
`RestrictedUnpickler.find_class` refuses every global, so only the pickle opcodes that
build plain values remain (lists, tuples, bytes, bools, ints, strings, dicts); the result is
then checked to be exactly a pair of (list of bytes, list of bools). Nothing in a refused
file is ever called.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dml.errors import DataError


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global: no class, function or reducer is looked up,
    so no code named by the file runs. Plain containers and scalars still load."""

    def find_class(self, module: str, name: str):
        """Refuse every global: raises pickle.UnpicklingError."""
        raise pickle.UnpicklingError(
            f"refuses global {module}.{name} (a verification .bin holds only lists of image bytes and bools)"
        )

    def persistent_load(self, pid):
        """Refuse persistent ids: raises pickle.UnpicklingError."""
        raise pickle.UnpicklingError("refuses persistent ids")


@dataclass
class BinPairs:
    """The content of a `.bin`: ``images`` 2P encoded images, ``is_same`` (P,) bool."""

    images: list[bytes]
    is_same: np.ndarray


def restricted_loads(data: bytes):
    """Unpickle ``data`` with `RestrictedUnpickler` (Python 2 strings read as bytes)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _flag(value: object) -> bool | None:
    """A same/different flag: a bool, or the ints 0 / 1; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def read_verification_bin(path: str | Path) -> BinPairs:
    """Read an insightface `.bin` verification set.

    Raises `DataError` (one line naming the file) when the file is missing, is not a pickle,
    names any global (e.g. a reducer that would run a command), or does not hold
    (list of P x 2 image bytes, list of P bools) with at least one pair.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"verification set not found: {path}")
    try:
        loaded = restricted_loads(path.read_bytes())
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: not a verification .bin: unpickling {exc}") from None
    except Exception as exc:  # noqa: BLE001 - truncated or garbled streams raise EOFError, ValueError, ...
        raise DataError(f"{path}: not a verification .bin: {type(exc).__name__}: {exc}") from None
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise DataError(f"{path}: expected a pickled (images, is_same) pair, got {type(loaded).__name__}")
    images, flags = loaded
    if not isinstance(images, (list, tuple)) or not isinstance(flags, (list, tuple)):
        raise DataError(
            f"{path}: images and is_same must be lists, got {type(images).__name__} and {type(flags).__name__}"
        )
    bad = next((i for i, image in enumerate(images) if not isinstance(image, (bytes, bytearray))), None)
    if bad is not None:
        raise DataError(f"{path}: image {bad} is {type(images[bad]).__name__}, expected encoded image bytes")
    same = [_flag(value) for value in flags]
    if None in same:
        bad = same.index(None)
        raise DataError(f"{path}: is_same[{bad}] is {flags[bad]!r}, expected a bool")
    if not same:
        raise DataError(f"{path}: holds no pairs")
    if len(images) != 2 * len(same):
        raise DataError(f"{path}: {len(images)} images for {len(same)} pairs (expected {2 * len(same)})")
    return BinPairs([bytes(image) for image in images], np.array(same, dtype=bool))


def write_verification_bin(path: str | Path, images: list[bytes], is_same: list[bool]) -> Path:
    """Write ``(images, is_same)`` as a `.bin` (pickle protocol 4), atomically; for making
    verification sets from own pairs (and for tests).

    Raises ValueError unless there are two images per pair.
    """
    if len(images) != 2 * len(is_same):
        raise ValueError(f"{len(images)} images for {len(is_same)} pairs (expected {2 * len(is_same)})")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pickle.dumps(([bytes(i) for i in images], [bool(s) for s in is_same]), protocol=4))
    tmp.replace(path)
    return path
