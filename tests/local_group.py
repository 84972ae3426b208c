"""A real process group on this machine for tests and benchmarks: `spawn_local_group` runs a
function in N fresh gloo processes on 127.0.0.1 and returns each rank's result.

A harness, not part of the library (real runs use torchrun). Benchmarks import it with
``tests/`` on ``sys.path``, as the tests do (see ``tests/conftest.py``).
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as torch_mp
from torch.multiprocessing.spawn import ProcessException

from dml.distributed import cleanup, free_local_port, init_distributed, torchrun_argv


def _local_worker(
    local_rank: int, fn: Callable, world_size: int, port: int, threads: int, queue: Any, args: tuple
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
    )
    torch.set_num_threads(threads)
    try:
        info = init_distributed(backend="gloo", timeout_s=300.0)
        result = fn(info, *args)
    except BaseException:
        # Queued before this process dies, so the parent can name the first failure, not
        # the "connection closed by peer" errors it causes on the other ranks.
        queue.put(pickle.dumps(("error", local_rank, traceback.format_exc())))
        raise
    finally:
        cleanup()
    queue.put(pickle.dumps(("result", local_rank, result)))  # a pipe write: delivered on return
    # Skip interpreter teardown. In about 1 of 10 runs of a 2-process test, a worker whose
    # result was already delivered aborted while exiting ("terminate called without an
    # active exception", SIGABRT: a native thread still joinable at static destruction);
    # nothing is left to flush here, so leave without running native destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_local_group(fn: Callable, world_size: int, args: tuple = (), threads_per_worker: int = 1) -> list:
    """Run ``fn(info, *args)`` in ``world_size`` fresh gloo processes on 127.0.0.1; return results by rank.

    ``fn`` must be importable (module level); results are pickled by value. If a worker
    raises, the others are stopped and a RuntimeError carrying the first failing rank's
    traceback is raised here.
    """
    ctx = torch_mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_local_port()
    procs = torch_mp.start_processes(
        _local_worker,
        args=(fn, world_size, port, threads_per_worker, queue, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    messages: list[tuple[str, int, Any]] = []

    def drain() -> None:
        while not queue.empty():
            messages.append(pickle.loads(queue.get()))

    try:
        while not procs.join(timeout=0.2):
            drain()
    except ProcessException as err:
        drain()
        errors = [(rank, text) for kind, rank, text in messages if kind == "error"]
        if not errors:
            raise
        rank, text = errors[0]
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{text}") from err
    drain()
    results = {rank: value for kind, rank, value in messages if kind == "result"}
    return [results[r] for r in range(world_size)]


def torchrun_dml(nproc: int, *dml_args: str, max_restarts: int = 0) -> list[str]:
    """`dml.distributed.torchrun_argv` for ``dml.cli DML_ARGS`` on ``nproc`` local processes:
    the command the tests and benchmarks start multi-process runs with."""
    return torchrun_argv(nproc, list(dml_args), max_restarts)
