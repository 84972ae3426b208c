"""How the class-centre matrix is cut into per-rank shards, initialised, and gathered back.

Rows are split into contiguous shards, the first ``C % world`` ranks holding one extra row.
Initial values are drawn in fixed global blocks of rows, each from its own seeded generator,
so the full matrix is the same whatever the world size (a 3-rank and a 1-rank run start
from identical centres).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from dml.distributed import ProcessGroup, get_rank, get_world_size

INIT_BLOCK_ROWS = 4096
INIT_STD = 0.01  # as in the insightface reference; the head normalises rows, so only decay cares
_MASK64 = (1 << 64) - 1


def shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of rank ``rank``: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def mix_seed(*parts: int) -> int:
    """A well-spread non-negative 63-bit seed from integers (splitmix64-style mixing)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = ((value ^ (part & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        value ^= value >> 31
        value = (value * 0x94D049BB133111EB) & _MASK64
    return value >> 1


def init_centre_shard(num_classes: int, dim: int, start: int, end: int, seed: int) -> torch.Tensor:
    """Rows ``[start, end)`` of a normal(0, INIT_STD) matrix (num_classes, dim) fixed by ``seed``.

    Peak extra memory: one block of INIT_BLOCK_ROWS rows (only for blocks cut by the shard).
    """
    out = torch.empty(end - start, dim)
    generator = torch.Generator()
    for block in range(start // INIT_BLOCK_ROWS, (end - 1) // INIT_BLOCK_ROWS + 1 if end > start else 0):
        first = block * INIT_BLOCK_ROWS
        rows = min(INIT_BLOCK_ROWS, num_classes - first)
        lo, hi = max(start, first), min(end, first + rows)
        generator.manual_seed(mix_seed(seed, block))
        if (lo, hi) == (first, first + rows):  # whole block: draw straight into place
            out[lo - start : hi - start].normal_(0.0, INIT_STD, generator=generator)
        else:
            values = torch.empty(rows, dim).normal_(0.0, INIT_STD, generator=generator)
            out[lo - start : hi - start] = values[lo - first : hi - first]
    return out


def gather_shards_to_main(
    shard: torch.Tensor, num_classes: int, group: ProcessGroup | None = None
) -> torch.Tensor | None:
    """Concatenate every rank's shard (first dim = its rows) on rank 0 as one CPU tensor.

    Returns None on other ranks. Point-to-point sends, one shard at a time, so rank 0's
    device never holds more than one extra shard; host memory holds the full result.
    """
    rank, world = get_rank(group), get_world_size(group)
    if world == 1:
        return shard.detach().cpu().clone()
    to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    if rank != 0:
        dist.send(shard.detach().contiguous(), dst=to_global(0), group=group)
        return None
    full = torch.empty((num_classes, *shard.shape[1:]), dtype=shard.dtype)
    for source in range(world):
        start, end = shard_bounds(num_classes, world, source)
        if source == 0:
            full[start:end] = shard.detach().cpu()
            continue
        buffer = shard.new_empty((end - start, *shard.shape[1:]))
        dist.recv(buffer, src=to_global(source), group=group)
        full[start:end] = buffer.cpu()
    return full


class RowShardedState(NamedTuple):
    """What a row-sharded module hands a checkpoint: this rank's rows ``[start, end)`` of
    ``num_rows``, per-row ``tensors`` (first dimension = ``end - start``; any trailing shape,
    e.g. ``(rows, D)`` centres, ``(rows, k, D)`` sub-centres, ``(rows,)`` margins) and a small
    ``meta`` dict that is the same on every rank (no tensors)."""

    meta: dict[str, Any]
    num_rows: int
    start: int
    end: int
    tensors: dict[str, torch.Tensor]
