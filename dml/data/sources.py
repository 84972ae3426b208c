"""Raw labelled-image readers: folder tree, CSV/Parquet manifest, IDX files, Omniglot npz.

A source lists lightweight `Record`s (id, label, split hint) up front, so the shard plan can
be made deterministically before any pixel is decoded, and reads one record's image on demand
(inside a worker process). Reading returns either encoded file bytes or a uint8 array.
"""

from __future__ import annotations

import contextlib
import gzip
import stat
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from dml.data.array_pixels import pixel_scale, to_uint8
from dml.data.folder_listing import list_folder
from dml.data.records import IMAGE_EXTENSIONS, ImagePayload, Record, Rejection  # noqa: F401 (re-exported)
from dml.data.table_listing import list_table
from dml.errors import DataError
from dml.names import unknown_name
from dml.registries import SOURCES


class Source(Protocol):
    """What `write_shards` needs from a source."""

    description: dict

    def records(self) -> list[Record]:
        """Every listed input in a stable order, refused ones carrying their `Rejection`."""
        ...

    def read(self, record: Record) -> ImagePayload:
        """The encoded image bytes (or a uint8 array) of ``record``."""

    def size_hint(self, record: Record) -> int:
        """About how many bytes ``record``'s image takes in a shard, for planning shard sizes."""


def _require(path: Path, what: str, folder: bool) -> None:
    """A one-line error unless ``path`` exists and is a folder (``folder``) or a file."""
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if folder and not path.is_dir():
        raise DataError(f"{what} {path} is a file, not a folder")
    if not folder and path.is_dir():
        raise DataError(f"{what} {path} is a folder, not a file")


@contextlib.contextmanager
def _parsing(path: Path, what: str) -> Iterator[None]:
    """Turn any failure of a parser (gzip, numpy, zip) on the user's file into
    a one-line `DataError` naming the file; wrap only the calls that parse that file."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - parsers raise many types for bad files; all mean "unreadable"
        reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise DataError(f"{path}: not a readable {what}: {reason}") from None


class FolderSource:
    """An image-folder tree: ``root/<class name>/<image file>``.

    Every path under the root is listed: image files inside class folders are samples; every
    other path is a record rejected with its reason (rules in `dml.data.folder_listing`).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        _require(self.root, "image folder", folder=True)
        self.description = {"kind": "folder", "path": str(self.root)}
        self._sizes: dict[str, int] = {}  # filled by records(), so planning stats each file once

    def records(self) -> list[Record]:
        # One scandir per folder and one stat per file (pathlib's rglob + is_file + a later
        # stat cost three syscalls and Path objects per file).
        """Every image file under the root, one class per first-level folder."""
        listing = list_folder(self.root)
        self._sizes = listing.sizes
        return listing.records

    def read(self, record: Record) -> ImagePayload:
        """The file's bytes."""
        return (self.root / record.source_id).read_bytes()

    def size_hint(self, record: Record) -> int:
        """The file's size in bytes (from the listing when it has it)."""
        size = self._sizes.get(record.source_id)
        return size if size is not None else _file_size(self.root / record.source_id)


class TableSource:
    """A CSV or Parquet manifest with columns ``path,label[,split]``.

    Relative paths are resolved against the manifest file's folder. Every row is listed:
    bad, duplicate and conflicting rows as rejected records (rules in `dml.data.table_listing`).
    """

    def __init__(self, table: str | Path):
        self.table = Path(table)
        _require(self.table, "manifest table", folder=False)
        self.base = self.table.parent
        self.description = {"kind": "parquet" if self.table.suffix == ".parquet" else "csv", "path": str(self.table)}

    def records(self) -> list[Record]:
        """Every row of the table, bad ones rejected (see `dml.data.table_listing`)."""
        return list_table(self.table)

    def read(self, record: Record) -> ImagePayload:
        """The file's bytes; raises ValueError when the path is not a regular file."""
        path = self._path(record)
        if not stat.S_ISREG(path.stat().st_mode):  # a fifo blocked the run for ever, a device filled memory
            raise ValueError(f"not a regular file: {path}")
        return path.read_bytes()

    def _path(self, record: Record) -> Path:
        path = Path(record.source_id)
        return path if path.is_absolute() else self.base / path

    def size_hint(self, record: Record) -> int:
        """The file's size in bytes."""
        return _file_size(self._path(record))


def _file_size(path: Path) -> int:
    """Bytes of ``path``; 0 when it cannot be stat'ed (reading it later rejects it with the reason)."""
    try:
        return path.stat().st_size
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return 0


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_header(data: bytes, path: Path) -> tuple[str, tuple[int, ...]]:
    """Element dtype and shape from the start of an IDX file (raises `DataError` if bad)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated inside its header")
    return IDX_DTYPES[dtype_code], struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])


def idx_header(path: Path) -> tuple[str, tuple[int, ...]]:
    """The element dtype and array shape an IDX file declares, reading only its header."""
    with _parsing(path, "IDX file"), _open_maybe_gz(path) as handle:
        head = handle.read(4)
        head += handle.read(4 * head[3]) if len(head) == 4 else b""
    return _idx_header(head, path)


def idx_shape(path: Path) -> tuple[int, ...]:
    """The array shape an IDX file declares, reading only its header."""
    return idx_header(path)[1]


def _integer_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """``labels`` as int64; a non-integral or non-finite value is a one-line `DataError`
    (``int()`` truncated 0.5 to class 0 without a word)."""
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            first = int(np.argmax(bad))
            raise DataError(f"{path}: label {first} is {labels[first]}, not an integer class")
    return labels.astype(np.int64)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format, gzipped or not) into a numpy array. Raises DataError for a truncated file."""
    with _parsing(path, "IDX file"), _open_maybe_gz(path) as handle:
        data = handle.read()
    dtype, shape = _idx_header(data, path)
    array = np.frombuffer(data, dtype=dtype, offset=4 + 4 * len(shape))
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


class IdxSource:
    """MNIST-style IDX pairs in one folder: ``<prefix>-images-idx3-ubyte[.gz]`` with
    ``<prefix>-labels-idx1-ubyte[.gz]``. The prefix (``train``, ``t10k``) is the split hint:
    ``train`` trains, anything else is held out in ``split.mode: source``.
    """

    def __init__(self, root: str | Path, class_names: list[str] | None = None):
        self.root = Path(root)
        _require(self.root, "IDX folder", folder=True)
        self.class_names = class_names
        self.pairs = self._find_pairs()
        if not self.pairs:
            raise DataError(f"no '*-images-idx3-ubyte[.gz]' files with matching labels in {self.root}")
        self.description = {"kind": "idx", "path": str(self.root), "files": sorted(self.pairs)}
        self._images: dict[str, tuple[np.ndarray, str]] = {}  # prefix -> (images, pixel scale)

    def _find_pairs(self) -> dict[str, tuple[Path, Path]]:
        pairs = {}
        for images in sorted(self.root.glob("*-images-idx3-ubyte*")):
            prefix = images.name.split("-images-")[0]
            labels = list(self.root.glob(f"{prefix}-labels-idx1-ubyte*"))
            if labels:
                pairs[prefix] = (images, labels[0])
        return pairs

    def _label_name(self, value: int) -> str:
        if self.class_names is not None:
            if value >= len(self.class_names):
                raise DataError(f"label {value} has no entry in source.class_names ({len(self.class_names)} names)")
            return self.class_names[value]
        return str(value)

    def records(self) -> list[Record]:
        """Every image of the IDX pairs (train split for ``train``, test otherwise).

        Raises DataError when images and labels do not match or a label has no class name.
        """
        out: list[Record] = []
        for prefix, (images_path, labels_path) in sorted(self.pairs.items()):
            labels = _integer_labels(read_idx(labels_path), labels_path)
            dtype, shape = idx_header(images_path)
            if len(shape) != 3 or labels.ndim != 1 or shape[0] != len(labels):
                raise DataError(
                    f"{images_path} holds images of shape {shape} but {labels_path.name} holds labels "
                    f"of shape {labels.shape}; expected (N, H, W) images and N labels"
                )
            if dtype != ">u1":  # other types need their value range: fail here, before any shard
                self._loaded(prefix)
            split = "train" if prefix == "train" else "test"
            out.extend(Record(f"{prefix}:{i}", self._label_name(int(v)), split) for i, v in enumerate(labels))
        return out

    def _loaded(self, prefix: str) -> tuple[np.ndarray, str]:
        if prefix not in self._images:  # loaded lazily, once per worker process
            images = read_idx(self.pairs[prefix][0])
            self._images[prefix] = images, pixel_scale(images, self.pairs[prefix][0])
        return self._images[prefix]

    def read(self, record: Record) -> ImagePayload:
        """The image as a uint8 array (H, W)."""
        prefix, index = record.source_id.rsplit(":", 1)
        images, scale = self._loaded(prefix)
        return to_uint8(images[int(index)], scale)

    def size_hint(self, record: Record) -> int:
        """28 * 28: the raw bytes of one MNIST-sized image."""
        return 28 * 28  # raw bytes of one MNIST-sized image; PNG is rarely larger


class OmniglotSource:
    """The Omniglot npz layout: ``images_background.npz`` / ``images_evaluation.npz`` holding
    ``images`` bool (classes, 20, 105, 105) with True = white background and ``labels``
    (classes, 20); other image types are scaled by `dml.data.array_pixels` (uint8 as is).
    Background characters are the ``train`` hint, evaluation ones ``test``; class names are
    ``background/<i>`` and ``evaluation/<i>`` so the two sets stay disjoint.
    """

    FILES: ClassVar[dict[str, str]] = {"background": "images_background.npz", "evaluation": "images_evaluation.npz"}

    def __init__(self, root: str | Path):
        self.root = Path(root)
        _require(self.root, "Omniglot folder", folder=True)
        self.files = {k: self.root / v for k, v in self.FILES.items() if (self.root / v).exists()}
        if not self.files:
            raise DataError(f"no images_background.npz or images_evaluation.npz in {self.root}")
        self.description = {"kind": "omniglot", "path": str(self.root), "files": sorted(self.files)}
        self._images: dict[str, tuple[np.ndarray, str]] = {}  # part -> (images, pixel scale)

    def records(self) -> list[Record]:
        """Every character image, classes named ``background/<i>`` / ``evaluation/<i>``."""
        out: list[Record] = []
        for part, path in sorted(self.files.items()):
            (num_classes, per_class), dtype = _omniglot_shape(path)
            if dtype not in (np.bool_, np.uint8):  # other types need their value range: fail here
                self._loaded(part)
            split = "train" if part == "background" else "test"
            for c in range(num_classes):
                out.extend(Record(f"{part}:{c}:{j}", f"{part}/{c:04d}", split) for j in range(per_class))
        return out

    def _loaded(self, part: str) -> tuple[np.ndarray, str]:
        if part not in self._images:  # loaded lazily, once per worker process
            with _parsing(self.files[part], "npz file"), np.load(self.files[part]) as npz:
                images = npz["images"]
            self._images[part] = images, pixel_scale(images, self.files[part])
        return self._images[part]

    def read(self, record: Record) -> ImagePayload:
        """The image as a uint8 array (105, 105), strokes dark on white."""
        part, c, j = record.source_id.split(":")
        images, scale = self._loaded(part)
        # bool: True = white background maps to 255, so strokes are dark, as on paper.
        return to_uint8(images[int(c), int(j)], scale)

    def size_hint(self, record: Record) -> int:
        """105 * 105: the raw bytes of one image."""
        return 105 * 105


NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an npz file, read from the headers (no array is loaded)."""
    shapes = {}
    with _parsing(path, "npz file"), zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                header_reader = NPY_HEADER_READERS.get(version)
                # Format 3.0 (rare: unicode field names) has no public header reader: load it.
                if header_reader:
                    shape, _, dtype = header_reader(member)
                else:
                    array = np.lib.format.read_array(member)
                    shape, dtype = array.shape, array.dtype
            shapes[name.removesuffix(".npy")] = shape, dtype
    return shapes


def _omniglot_shape(path: Path) -> tuple[tuple[int, int], np.dtype]:
    """((classes, samples per class), image dtype) of an Omniglot npz, after checking its two
    arrays agree."""
    shapes = _npy_shapes(path)
    if "images" not in shapes or "labels" not in shapes:
        raise DataError(f"{path} needs arrays 'images' and 'labels' (has: {', '.join(sorted(shapes)) or 'none'})")
    (images, dtype), (labels, _) = shapes["images"], shapes["labels"]
    if len(labels) != 2 or len(images) != 4 or images[:2] != labels:
        raise DataError(
            f"{path}: 'images' {images} and 'labels' {labels} do not match; expected "
            "(classes, per_class, H, W) images and (classes, per_class) labels"
        )
    return labels, dtype


def open_source(kind: str, path: str, class_names: list[str] | None = None) -> Source:
    """Build the reader for ``kind`` (``auto`` guesses from the path) or raise a one-line error.

    Raises DataError for a missing path or an unknown kind.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"source path not found: {p}")
    if kind == "auto":
        if p.suffix == ".rec" or (p / "train.rec").is_file():
            kind = "recordio"
        elif p.is_file():
            kind = "parquet" if p.suffix == ".parquet" else "csv"
        elif any(p.glob("*-images-idx3-ubyte*")):
            kind = "idx"
        elif any(p.glob("images_*.npz")):
            kind = "omniglot"
        else:
            kind = "folder"
    if kind not in SOURCES:
        raise DataError(unknown_name(kind, SOURCES.names(), "source kind"))
    return SOURCES.build(kind, p, settings={"class_names": class_names})
