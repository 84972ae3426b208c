"""Tar shard members: deterministic writing and fast reading.

Shards are plain USTAR archives that any tar tool (and webdataset) reads. Headers carry no
time, owner or permissions of the writing machine, so the same samples always give
byte-identical shards. The reader parses headers by slicing instead of going through
`tarfile`, which was ~30% of the per-sample cost of a training loader (profiled in commit
9342bcf, benchmarks/data_throughput.py); it accepts regular files only (what `dml prepare`
writes) and says so on anything else.

Kept instead of webdataset's `TarWriter` (1.0.2 does take a fixed mtime): through `tarfile` it
made `dml prepare` of the quickstart set 1.7x slower (232 vs 395 samples/s, benchmarks/shard_writer.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

BLOCK = 512
RECORD = 20 * BLOCK  # tar's record size; archives are padded to a multiple of it


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def ustar_header(name: str, size: int) -> bytes:
    """A 512-byte USTAR header for a regular file with fixed mode/owner/time.

    Raises ValueError for a name longer than 100 bytes.
    """
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    header = bytearray(BLOCK)
    header[0 : len(encoded)] = encoded
    header[100:108] = _octal(0o444, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(0, 12)
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    checksum = sum(header)
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


class DeterministicTarWriter:
    """Append WebDataset samples (``key.ext`` members) to a tar with fixed headers.

    As a context manager it finishes the archive on success and only closes the file when
    the block raised (the caller discards the half-written file).
    """

    def __init__(self, path: Path):
        self._file = open(path, "wb")  # noqa: SIM115 - closed by __exit__ / close()
        self._written = 0

    def __enter__(self) -> DeterministicTarWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(OSError):  # flushing the buffer may fail again (disk full)
            self._file.close()

    def add(self, name: str, data: bytes) -> None:
        """Append member ``name`` holding ``data``, padded to whole 512-byte blocks."""
        padding = -len(data) % BLOCK
        self._file.write(ustar_header(name, len(data)) + data + b"\0" * padding)
        self._written += BLOCK + len(data) + padding

    def close(self) -> None:
        """Write the end-of-archive blocks, fsync and close the file."""
        end = 2 * BLOCK
        end += -(self._written + end) % RECORD
        self._file.write(b"\0" * end)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class TarMemberError(ValueError):
    """A tar member that cannot be read; ``member`` is its name ("" when the header is unreadable)."""

    def __init__(self, message: str, member: str = ""):
        super().__init__(message)
        self.member = member


def _parse_header(header: bytes, source: str) -> tuple[str, int]:
    kind = header[156:157]
    try:
        name = header[0:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:  # bad UTF-8 or a size that is not octal: not a header we wrote
        raise TarMemberError(f"{source}: unreadable tar header") from None
    name = f"{prefix}/{name}" if prefix else name
    if kind not in (b"0", b"\0"):
        raise TarMemberError(
            f"{source}: tar member type {kind!r} is not a regular file; shards must be written by `dml prepare`", name
        )
    return name, size


def iter_tar_members(stream: BinaryIO, source: str = "") -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) of each regular file in a tar stream.

    Ends at tar's end-of-archive (zero) block. Raises `TarMemberError` (a ValueError) on a
    member that ends early, a header that is not a regular file's, or a stream that stops
    before the end-of-archive block (``member`` "": cut between members or inside a header).
    """
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            raise TarMemberError(f"{source}: the file is cut off (no end-of-archive block)")
        if header.count(0) == BLOCK:
            return
        name, size = _parse_header(header, source)
        data = stream.read(size)
        if len(data) < size:
            raise TarMemberError(f"{source}: truncated tar member {name}", name)
        stream.read(-size % BLOCK)
        yield name, data


def member_key(name: str) -> tuple[str, str]:
    """``dir/stem.ext`` -> (sample key ``dir/stem``, extension ``ext``), as WebDataset groups members."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Group consecutive members ``<key>.<ext>`` of one shard into WebDataset sample dicts
    (unchecked; readers of a split go through `dml.data.reading.read_shard`)."""
    sample: dict[str, Any] | None = None
    with open(url, "rb", buffering=1 << 20) as stream:
        for name, data in iter_tar_members(stream, url):
            key, ext = member_key(name)
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = data
    if sample is not None:
        yield sample
