"""Process-group setup, rank helpers, object collectives and an autograd-aware all-gather.

Distributed is a property of the process, not a separate code path: with no torchrun
environment (or ``WORLD_SIZE=1``) no process group is created and every helper here answers
as rank 0 of a world of 1, so the same training code runs unchanged.

Backend choice: NCCL when CUDA is available and this process has a GPU of its own
(``LOCAL_RANK < device_count``), otherwise gloo on CPU with one logged line. The NCCL/CUDA
paths are selected at run time and are untested on the CPU-only machines this was written on.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
ProcessGroup = Any  # torch.distributed.ProcessGroup; kept loose so type hints never import it


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank, the world size, its local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group was created (world size 1)


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is required for distributed runs but is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _pick_backend(local_rank: int) -> str:
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        return "nccl"  # untested here: no GPU on the development machines
    log.info("no GPU for local rank %d: using the gloo backend on CPU", local_rank)
    return "gloo"


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's env vars, or run alone.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (defaults to ``RANK``: one node),
    ``MASTER_ADDR`` and ``MASTER_PORT``. ``WORLD_SIZE`` unset or 1 creates no process group.
    Calling it again after the group exists just describes the current process.

    Raises ValueError for an inconsistent RANK / WORLD_SIZE, a missing variable or an unknown backend.
    """
    if is_initialized():
        return _describe_current()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if world_size == 1:
        device = _device_for(local_rank, "nccl" if torch.cuda.is_available() else "gloo")
        return DistInfo(rank=0, world_size=1, local_rank=local_rank, device=device, backend=None)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"environment variable {name} is required when WORLD_SIZE={world_size}")
    _env_int("MASTER_PORT")
    backend = backend or _pick_backend(local_rank)
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    device = _device_for(local_rank, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout
        )
    else:
        # Under torchrun the store outlives a worker restart, and env:// adds no per-attempt
        # prefix: a restarted rank could read its peer's gloo address from the previous
        # attempt and connect to a dead port (seen in the worker-restart test).
        serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world_size,
            is_master=not serves and rank == 0,
            timeout=timeout,
        )
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"dml/attempt_{restart}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    log.info("joined process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def _device_for(local_rank: int, backend: str) -> torch.device:
    if backend == "nccl" and torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _describe_current() -> DistInfo:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = _env_int("LOCAL_RANK", rank)
    backend = str(dist.get_backend())
    return DistInfo(rank, world_size, local_rank, _device_for(local_rank, backend), backend)


def get_rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (default: the world); 0 without a process group."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (default: the world); 1 without a process group."""
    return dist.get_world_size(group) if is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0 (and in a single-process run)."""
    return get_rank() == 0


def launched_rank() -> int:
    """The global rank the launcher gave this process: the process group's while there is one,
    else torchrun's ``RANK`` (0 when started alone), so it holds before joining and after
    leaving the group. Raises `ValueError` when ``RANK`` is not an integer."""
    return get_rank() if is_initialized() else _env_int("RANK", 0)


def barrier(group: ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group``; a no-op without a process group."""
    if is_initialized() and get_world_size(group) > 1:
        dist.barrier(group=group)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a world of 1). Collective."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in a world of 1). Collective."""
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Destroy the default process group if one exists (safe to call twice)."""
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group: ProcessGroup | None = None) -> torch.Tensor:
    """In-place all-reduce (``op`` "sum" or "max"); the identity in a world of 1. Not autograd-aware.

    Raises ValueError for another ``op``.
    """
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return tensor


def gather_sizes(local_size: int, device: torch.device, group: ProcessGroup | None = None) -> list[int]:
    """Every rank's ``local_size``, in rank order (one small all-gather)."""
    world = get_world_size(group)
    if world == 1:
        return [local_size]
    mine = torch.tensor([local_size], dtype=torch.long, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return torch.cat(sizes).tolist()


def all_gather_rows(
    tensor: torch.Tensor, group: ProcessGroup | None = None, sizes: list[int] | None = None
) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order; no gradient.

    Ranks may hold different numbers of rows (other dims must match): sizes are exchanged
    first, each rank pads to the largest, and the padding is trimmed after the gather.
    Peak extra memory: ``world x max_rows`` rows.
    """
    world = get_world_size(group)
    if world == 1:
        return tensor
    sizes = sizes if sizes is not None else gather_sizes(tensor.shape[0], tensor.device, group)
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    buckets = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buckets, padded.contiguous(), group=group)
    return torch.cat([bucket[:n] for bucket, n in zip(buckets, sizes, strict=True)], dim=0)


def sum_own_rows(
    grad: torch.Tensor, sizes: list[int], group: ProcessGroup | None = None, use_reduce_scatter: bool = True
) -> torch.Tensor:
    """Sum ``grad`` (all ranks' rows, same shape on every rank) across ranks; return this rank's rows.

    This is the adjoint of `all_gather_rows`. With ``use_reduce_scatter`` it is one padded
    reduce-scatter (gloo implements it in the pinned torch, NCCL always did); otherwise, for
    backends without reduce-scatter, one all-reduce of the whole gradient followed by a slice
    (``world``-times more traffic, same result).
    """
    rank, world = get_rank(group), get_world_size(group)
    starts = [sum(sizes[:i]) for i in range(world)]
    if not use_reduce_scatter:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total[starts[rank] : starts[rank] + sizes[rank]]
    longest = max(sizes)
    chunks = []
    for start, n in zip(starts, sizes, strict=True):
        chunk = grad.new_zeros((longest, *grad.shape[1:]))
        chunk[:n] = grad[start : start + n]
        chunks.append(chunk)
    out = grad.new_empty((longest, *grad.shape[1:]))
    dist.reduce_scatter(out, chunks, op=dist.ReduceOp.SUM, group=group)
    return out[: sizes[rank]]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather rows. Backward: sum the gradient over ranks, keep own rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup | None, use_reduce_scatter: bool):
        sizes = gather_sizes(tensor.shape[0], tensor.device, group)
        ctx.sizes, ctx.group, ctx.use_reduce_scatter = sizes, group, use_reduce_scatter
        return all_gather_rows(tensor, group, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        own = sum_own_rows(grad, ctx.sizes, ctx.group, ctx.use_reduce_scatter)
        return own, None, None


def all_gather_with_grad(
    tensor: torch.Tensor, group: ProcessGroup | None = None, use_reduce_scatter: bool = True
) -> torch.Tensor:
    """All-gather along dim 0 that gradients flow through.

    Returns ``(sum of every rank's rows, ...)`` in rank order; ranks may contribute different
    row counts (even 0). In backward, each rank receives the sum over all ranks of the
    gradient with respect to its own rows, which is the exact gradient of the sum of every
    rank's loss. Note that a DDP-wrapped model averages (not sums) gradients over ranks.
    In a world of 1 it returns ``tensor`` itself.
    """
    if get_world_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group, use_reduce_scatter)


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for local process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def describe_lone_process_as_group_of_one() -> None:
    """Give a process started without torchrun the env vars torchrun sets for one process
    (RANK 0, WORLD_SIZE 1, LOCAL_RANK 0, a free loopback MASTER port), unless already set.

    DeepSpeed initialises its own process group and, with no such variables, falls back to MPI
    discovery (``ModuleNotFoundError: mpi4py`` for a plain ``dml train``); with them it takes
    the same path as ``torchrun --nproc_per_node 1``.
    """
    if is_initialized() or "WORLD_SIZE" in os.environ:
        return
    for name, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(free_local_port())),
    ):
        os.environ.setdefault(name, value)


def torchrun_argv(
    nproc_per_node: int, dml_args: list[str], max_restarts: int = 0, launcher: list[str] | None = None
) -> list[str]:
    """argv of ``torchrun --standalone --nnodes 1 --nproc_per_node N --max-restarts M -m
    dml.cli DML_ARGS``. ``launcher`` is the torchrun command itself: by default ``python -m
    torch.distributed.run`` with this interpreter (no ``torchrun`` script on PATH needed); a
    container passes ``["torchrun"]``. The one builder of the local multi-process command
    (`dml tune`'s folds, the pipeline's torchrun and Kubernetes launchers, tests)."""
    import sys

    return [
        *(launcher or [sys.executable, "-m", "torch.distributed.run"]),
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc_per_node),
        "--max-restarts",
        str(max_restarts),
        "-m",
        "dml.cli",
        *dml_args,
    ]
