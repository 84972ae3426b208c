"""insightface's RecordIO face sets (``train.rec`` + ``train.idx`` + ``property``), read without MXNet.

Layout of ``train.rec``: records, each a little-endian uint32 magic ``0xced7230a``, a uint32
whose low 29 bits are the part length and top 3 bits a continuation flag, the part's bytes,
then zero padding to a multiple of 4 bytes. A payload whose bytes held the magic at a 4-byte
aligned position was written as several parts (flag 1 = first, 2 = middle, 3 = last) with the
magic removed at each cut; the reader puts it back. A payload starts with the header
``<IfQQ`` (flag, label, id, id2); when flag > 0 an array of ``flag`` float32 labels follows
(the first is the class). The rest is the encoded image (JPEG), stored in the shards as is.

``train.idx`` lists ``key<TAB>byte offset`` per record. In insightface's sets record 0 is a
header without image whose labels ``(end, ...)`` say the images are records ``1 .. end - 1``
(the records after them describe identities, not images); without it every record is an image.
``property`` holds ``num_classes,height,width``.

Listing reads only the first 32 bytes (36 with an array label) of each record through a memory map (vectorised), so
a set of millions of records is planned without reading its images; a record whose label
cannot be read (bad magic, cut file, index past the end) makes the whole file a `DataError`
naming the file, the record and the problem. Images are read per record with ``os.pread``
in each worker; an undecodable image is rejected by the shard writer with its reason.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dml.data.records import ImagePayload, Record
from dml.errors import DataError

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
IMAGE_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
PART_HEADER = struct.Struct("<II")  # magic, cflag << 29 | length


def padded(length: int) -> int:
    """``length`` rounded up to a multiple of 4 (the part's size in the file without its header)."""
    return (length + 3) & ~3


@dataclass(frozen=True)
class RecordIOPaths:
    """The files of one set: the ``.rec``, its ``.idx`` and the optional ``property``."""

    rec: Path
    idx: Path
    prop: Path | None

    @classmethod
    def find(cls, path: str | Path) -> RecordIOPaths:
        """Accept a folder holding ``train.rec`` or a ``.rec`` file; raise `DataError` if parts lack."""
        path = Path(path)
        rec = path / "train.rec" if path.is_dir() else path
        if not rec.is_file():
            raise DataError(f"RecordIO file not found: {rec}")
        idx = rec.with_suffix(".idx")
        if not idx.is_file():
            raise DataError(f"{rec}: its index {idx.name} is missing (needed to find the records)")
        prop = rec.parent / "property"
        return cls(rec, idx, prop if prop.is_file() else None)


def read_index(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key<TAB>offset`` lines into (keys, offsets) int64 arrays sorted by key.

    Raises `DataError` naming the file and line for a malformed line or a repeated key.
    """
    keys, offsets = [], []
    with path.open("r", encoding="ascii", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                key, offset = int(parts[0]), int(parts[1])
                if len(parts) != 2 or key < 0 or offset < 0:
                    raise ValueError
            except (ValueError, IndexError):
                raise DataError(
                    f"{path}: line {number} is not 'index<TAB>byte offset': {line.strip()[:60]!r}"
                ) from None
            keys.append(key)
            offsets.append(offset)
    if not keys:
        raise DataError(f"{path}: the index lists no records")
    keys_a, offsets_a = np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    order = np.argsort(keys_a, kind="stable")
    keys_a, offsets_a = keys_a[order], offsets_a[order]
    repeated = keys_a[1:][keys_a[1:] == keys_a[:-1]]
    if repeated.size:
        raise DataError(f"{path}: record index {int(repeated[0])} is listed more than once")
    return keys_a, offsets_a


def read_property(path: Path) -> dict[str, int]:
    """``num_classes,height,width`` -> dict; raise `DataError` naming the file if malformed."""
    text = path.read_text(errors="replace").strip()
    try:
        num_classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"{path}: expected 'num_classes,height,width', found {text[:60]!r}") from None
    return {"num_classes": num_classes, "height": height, "width": width}


@dataclass(frozen=True)
class RecordPrefixes:
    """The fixed-size start of every record listed in the index (arrays aligned with ``keys``)."""

    keys: np.ndarray  # int64 record indices
    offsets: np.ndarray  # int64 byte offsets
    cflag: np.ndarray  # uint32 continuation flag of the first part
    length: np.ndarray  # int64 length of the first part
    flag: np.ndarray  # uint32 header flag: number of array labels
    label: np.ndarray  # float32: scalar label, or the first array label when flag > 0


def _fail(paths: RecordIOPaths, keys: np.ndarray, bad: np.ndarray, problem: str) -> None:
    if bad.any():
        count, first = int(bad.sum()), int(keys[np.argmax(bad)])
        more = f" ({count} records)" if count > 1 else ""
        raise DataError(f"{paths.rec}: record {first}{more}: {problem}")


def read_prefixes(paths: RecordIOPaths, keys: np.ndarray, offsets: np.ndarray) -> RecordPrefixes:
    """Read the headers of the records at ``offsets`` through a memory map, checking each.

    Raises `DataError` (file, first bad record, count) for an offset that is not 4-aligned or
    points past the end, a bad magic, a part that runs past the end of the file (truncated),
    or a payload shorter than its image header and label array.
    """
    size = paths.rec.stat().st_size
    _fail(paths, keys, offsets % 4 != 0, "its offset in the index is not a multiple of 4 (not a RecordIO offset)")
    _fail(
        paths,
        keys,
        offsets + PART_HEADER.size + IMAGE_HEADER.size > size,
        f"its offset in the index points past the end of the file ({size} bytes): index or file cut short",
    )
    words = np.memmap(paths.rec, dtype="<u4", mode="r", shape=(size // 4,))
    at = offsets // 4
    magic = np.asarray(words[at])
    _fail(paths, keys, magic != MAGIC, f"bad magic number (expected 0x{MAGIC:08x}): the index does not match the file")
    lrec = np.asarray(words[at + 1])
    cflag, length = lrec >> LENGTH_BITS, (lrec & LENGTH_MASK).astype(np.int64)
    _fail(paths, keys, (cflag != 0) & (cflag != 1), "starts with a continuation part (the index points mid-record)")
    _fail(
        paths,
        keys,
        offsets + PART_HEADER.size + length > size,
        f"runs past the end of the file ({size} bytes): the file is truncated",
    )
    flag = np.asarray(words[at + 2])
    whole = cflag == 0  # split records (cflag 1) are checked when read whole
    _fail(
        paths,
        keys,
        whole & (length < IMAGE_HEADER.size + 4 * flag.astype(np.int64)),
        "payload is shorter than its header and label array",
    )
    # The first array label sits right after the 24-byte header (word 8); a whole record with
    # flag > 0 is long enough for it (checked above), others read their scalar label (word 3).
    array_label = np.minimum(at + 8, len(words) - 1)
    label = np.where(flag > 0, words[array_label], words[at + 3]).astype(np.uint32).view(np.float32)
    prefixes = RecordPrefixes(keys, offsets, cflag, length, flag, label)
    del words
    return prefixes


def label_name(value: float) -> str:
    """A class name for a float label: ``"12"`` for 12.0, the float's repr otherwise."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


class RecordIOSource:
    """A `Source` over an insightface RecordIO set (``prepare.source.kind: recordio``).

    ``path`` is the folder holding ``train.rec`` / ``train.idx`` / ``property`` or a ``.rec``
    file with its ``.idx`` beside it. Record ids are ``<rec name>:<index>``; labels are the
    record's class (``str(int(label))``).
    """

    def __init__(self, path: str | Path):
        self.paths = RecordIOPaths.find(path)
        self.property = read_property(self.paths.prop) if self.paths.prop else None
        self.description: dict[str, Any] = {"kind": "recordio", "path": str(self.paths.rec), "property": self.property}
        self._keys = np.empty(0, np.int64)
        self._offsets = np.empty(0, np.int64)
        self._lengths = np.empty(0, np.int64)
        self._fd: int | None = None
        self._fd_pid: int | None = None

    def records(self) -> list[Record]:
        """Every image record of the ``.rec`` file in index order, labelled by its header.

        Raises DataError for a record whose header cannot be split.
        """
        keys, offsets = read_index(self.paths.idx)
        prefixes = read_prefixes(self.paths, keys, offsets)
        images = self._image_positions(prefixes)
        self._keys, self._offsets, self._lengths = keys, offsets, prefixes.length
        labels = prefixes.label[images].tolist()
        split = [i for i in images.tolist() if prefixes.cflag[i] != 0]
        names = [label_name(v) for v in labels]
        for i in split:  # rare: the magic occurred in the payload; read the whole record for its label
            try:
                labels_i = split_payload(self.payload(int(keys[i])))[0]
            except ValueError as exc:
                raise DataError(f"{self.paths.rec}: record {int(keys[i])}: {exc}") from None
            names[int(np.searchsorted(images, i))] = label_name(labels_i[0])
        self._check_property(set(names))
        prefix = self.paths.rec.name
        return [Record(f"{prefix}:{int(k)}", name) for k, name in zip(keys[images].tolist(), names, strict=True)]

    def _image_positions(self, p: RecordPrefixes) -> np.ndarray:
        """Positions (into the index arrays) of the image records, using record 0's header if any."""
        everything = np.arange(len(p.keys))
        is_header = (
            len(p.keys) > 0
            and p.keys[0] == 0
            and p.cflag[0] == 0
            and p.flag[0] > 0
            and p.length[0] == IMAGE_HEADER.size + 4 * int(p.flag[0])
        )
        if not is_header:
            self.description["header"] = None
            return everything
        end = float(p.label[0])
        if not end.is_integer() or end < 1:
            raise DataError(f"{self.paths.rec}: header record 0 gives image range end {end}, not a positive integer")
        end = int(end)
        inside = (p.keys >= 1) & (p.keys < end)
        if int(inside.sum()) != end - 1:
            raise DataError(
                f"{self.paths.idx}: the header record says images are records 1..{end - 1}, "
                f"but the index lists {int(inside.sum())} of them"
            )
        self.description["header"] = {"images": [1, end - 1], "records_after_images": int((p.keys >= end).sum())}
        return everything[inside]

    def _check_property(self, classes: set[str]) -> None:
        if self.property and self.property["num_classes"] != len(classes):
            log.warning(
                "%s says %d classes; the records hold %d", self.paths.prop, self.property["num_classes"], len(classes)
            )

    def _position_of(self, key: int) -> int:
        pos = int(np.searchsorted(self._keys, key))
        if pos >= len(self._keys) or self._keys[pos] != key:
            raise ValueError(f"record {key} is not in {self.paths.idx.name}")
        return pos

    def _read_at(self, offset: int, size: int) -> bytes:
        if self._fd is None or self._fd_pid != os.getpid():  # one descriptor per worker process
            self._fd, self._fd_pid = os.open(self.paths.rec, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise ValueError(f"{self.paths.rec.name} ends inside the record at byte {offset}")
        return data

    def payload(self, key: int) -> bytes:
        """The whole payload of record ``key`` (parts joined); ValueError if it is damaged."""
        pos = self._position_of(key)
        offset, expected = int(self._offsets[pos]), int(self._lengths[pos])  # listed length: one read
        parts = []
        while True:
            data = self._read_at(offset, PART_HEADER.size + expected)
            magic, lrec = PART_HEADER.unpack_from(data)
            cflag, length = lrec >> LENGTH_BITS, lrec & LENGTH_MASK
            if magic != MAGIC or length != expected:
                raise ValueError(f"record changed since it was listed (bad magic or length at byte {offset})")
            parts.append(data[PART_HEADER.size :])
            if cflag in (0, 3):
                return MAGIC_BYTES.join(parts)
            offset += PART_HEADER.size + padded(length)
            expected = self._part_length(offset)

    def _part_length(self, offset: int) -> int:
        magic, lrec = PART_HEADER.unpack(self._read_at(offset, PART_HEADER.size))
        if magic != MAGIC:
            raise ValueError(f"bad magic number in a continuation part at byte {offset}")
        return lrec & LENGTH_MASK

    def read(self, record: Record) -> ImagePayload:
        """The encoded image bytes of ``record``."""
        return split_payload(self.payload(record_key(record)))[1]

    def size_hint(self, record: Record) -> int:
        """The record's length in bytes."""
        return int(self._lengths[self._position_of(record_key(record))])


def record_key(record: Record) -> int:
    """The RecordIO index of a record id ``<rec name>:<index>``."""
    return int(record.source_id.rsplit(":", 1)[1])


def split_payload(payload: bytes) -> tuple[tuple[float, ...], bytes]:
    """Split a payload into (labels, image bytes); one label unless the header flag gives an array.

    Raises ValueError when the payload is shorter than its header and label array.
    """
    if len(payload) < IMAGE_HEADER.size:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than the {IMAGE_HEADER.size}-byte header")
    flag, label, _, _ = IMAGE_HEADER.unpack_from(payload)
    if flag == 0:
        return (label,), payload[IMAGE_HEADER.size :]
    end = IMAGE_HEADER.size + 4 * flag
    if len(payload) < end:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than its {flag} labels")
    labels = struct.unpack_from(f"<{flag}f", payload, IMAGE_HEADER.size)
    return tuple(labels), payload[end:]
