"""Row-sharded tensors on disk: each rank writes its own rows, any world size reads any rows.

A head whose class centres are split by rows over ranks (`dml.losses.PartialFC`) hands the
checkpoint a dict of tensors whose first dimension indexes *its* classes ``[start, end)``:
the weight ``(rows, D)``, optimizer state ``(rows, D)`` or ``(rows,)``, and whatever else is
kept per class (``(rows, k, D)`` sub-centres, ``(rows,)`` margins). `write_row_shard` writes
each tensor of one rank as a raw file ``<name>.rank<R>.bin`` (C order, native dtype, no
pickle) and returns that rank's index record; the checkpoint keeps every rank's record (which
global rows each file holds). `RowShardReader` fills a destination tensor with any row range
by reading only those bytes at their offsets (``readinto`` straight into the destination on
CPU, through one bounded buffer otherwise), so a rank of another world size holds its own
shard plus at most `CHUNK_BYTES`, never the whole matrix.

Why not ``torch.distributed.checkpoint``: its FileSystemReader ``torch.load``s every saved
chunk whole before narrowing it (a 1-rank save read on N ranks puts the full matrix in every
process), and its DTensor row sharding splits rows ``ceil(C / W)`` apart, not as our shards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHUNK_BYTES = 64 * 1024 * 1024  # bounded copy buffer for device tensors; rows per write/read chunk
INDEX_FORMAT = "dml.row_shards/1"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a row-shard index")
    return dtype


def _row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    size = dtype.itemsize
    for dim in shape[1:]:
        size *= dim
    return size


def _chunk_rows(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(row_bytes, 1))


def _as_bytes(block: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor (any dtype, bf16 included), no copy."""
    # ndarray has the buffer protocol; numpy's stubs declare it for Python >= 3.12 only
    return memoryview(block.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def file_name(name: str, rank: int) -> str:
    """File of tensor ``name``'s rows written by ``rank``: ``<name>.rank<rank:05d>.bin``."""
    return f"{name}.rank{rank:05d}.bin"


def write_row_shard(folder: Path, rank: int, start: int, end: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write this rank's rows ``[start, end)`` of every tensor in ``tensors`` under ``folder``.

    Each tensor's first dimension must be ``end - start``. CPU tensors are written from their
    own memory; device tensors are copied to the host `CHUNK_BYTES` at a time. Every file is
    fsynced. Returns the index record ``{"rank", "start", "end", "tensors": {name: {"file",
    "dtype", "shape"}}}``. Raises ValueError for a tensor with the wrong number of rows and
    OSError when the disk refuses the write.
    """
    record: dict[str, Any] = {"rank": rank, "start": start, "end": end, "tensors": {}}
    for name, tensor in tensors.items():
        if tensor.dim() == 0 or tensor.shape[0] != end - start:
            raise ValueError(
                f"row-sharded tensor {name!r} has shape {tuple(tensor.shape)}, expected {end - start} rows first"
            )
        tensor = tensor.detach()
        path = folder / file_name(name, rank)
        step = _chunk_rows(_row_bytes(tuple(tensor.shape), tensor.dtype))
        with open(path, "wb") as handle:
            for first in range(0, tensor.shape[0], step):
                block = tensor[first : first + step]
                handle.write(_as_bytes(block.contiguous().cpu() if block.device.type != "cpu" else block.contiguous()))
            handle.flush()
            os.fsync(handle.fileno())
        record["tensors"][name] = {"file": path.name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
    return record


def check_index(folder: Path, index: list[dict[str, Any]], num_rows: int) -> str | None:
    """One-line problem with a checkpoint's row shards, or None when they are whole.

    Checks that the records cover rows ``[0, num_rows)`` once, in order, that every record
    holds the same tensors with the same trailing shape and dtype, and that every file exists
    with exactly the bytes its rows need (a truncated or missing file is named).
    """
    records = sorted(index, key=lambda r: r["start"])
    expected_start = 0
    names = set(records[0]["tensors"]) if records else set()
    for record in records:
        if record["start"] != expected_start or record["end"] < record["start"]:
            return (
                f"row shards do not cover rows [0, {num_rows}) once (rank {record['rank']} holds "
                f"[{record['start']}, {record['end']}), expected to start at {expected_start})"
            )
        expected_start = record["end"]
        if set(record["tensors"]) != names:
            return f"rank {record['rank']} saved {sorted(record['tensors'])}, rank 0 saved {sorted(names)}"
        for _name, entry in record["tensors"].items():
            shape, dtype = tuple(entry["shape"]), _dtype(entry["dtype"])
            path = folder / entry["file"]
            want = (record["end"] - record["start"]) * _row_bytes(shape, dtype)
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != want:
                return f"{path} holds {path.stat().st_size} bytes, expected {want} (truncated?)"
    if expected_start != num_rows:
        return f"row shards cover rows [0, {expected_start}), expected [0, {num_rows})"
    return None


def _read_fully(handle, view: memoryview, name: str) -> None:
    """Fill ``view`` from ``handle`` (a raw read may return fewer bytes than asked)."""
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise ValueError(f"{handle.name} ended early while reading {name} (truncated?)")
        done += got


class RowShardReader:
    """Reads any row range of the tensors described by an index (see `write_row_shard`)."""

    def __init__(self, folder: Path, index: list[dict[str, Any]]):
        self.folder = Path(folder)
        self.records = sorted(index, key=lambda r: r["start"])

    def names(self) -> list[str]:
        """The names of the tensors saved (those of the first rank's record)."""
        return sorted(self.records[0]["tensors"]) if self.records else []

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Trailing shape (without rows) and dtype of tensor ``name``."""
        entry = self.records[0]["tensors"][name]
        return tuple(entry["shape"][1:]), _dtype(entry["dtype"])

    def read(self, name: str, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Global rows ``[start, end)`` of ``name`` into ``out`` (any device; allocated on CPU if None).

        Only the files holding those rows are opened and only those rows' bytes are read.
        Raises KeyError for an unknown name, ValueError for a shape/dtype mismatch with ``out``.
        """
        trailing, dtype = self.spec(name)
        if out is None:
            out = torch.empty((end - start, *trailing), dtype=dtype)
        if tuple(out.shape) != (end - start, *trailing) or out.dtype != dtype:
            raise ValueError(
                f"{name}: saved rows are {dtype} x {trailing}, destination is "
                f"{out.dtype} x {tuple(out.shape)} for {end - start} rows"
            )
        row_bytes = _row_bytes((0, *trailing), dtype)
        direct = out.device.type == "cpu" and out.is_contiguous()
        step = _chunk_rows(row_bytes)
        buffer = None if direct else torch.empty((min(step, max(end - start, 1)), *trailing), dtype=dtype)
        for record in self.records:
            lo, hi = max(start, record["start"]), min(end, record["end"])
            if lo >= hi:
                continue
            with open(self.folder / record["tensors"][name]["file"], "rb", buffering=0) as handle:
                for first in range(lo, hi, step):
                    last = min(hi, first + step)
                    target = out[first - start : last - start] if buffer is None else buffer[: last - first]
                    handle.seek((first - record["start"]) * row_bytes)
                    _read_fully(handle, _as_bytes(target), name)
                    if not direct:
                        out[first - start : last - start].copy_(target)
        return out
