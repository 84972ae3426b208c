"""One training per run folder: `dml train` / `dml distill` runs into the same ``run_dir`` exclude each other.

Two runs in one folder (a resume started while the killed run's workers still trained, their
launcher gone) wrote one metrics.jsonl in turns and rotated away each other's checkpoints.
Rank 0 holds an advisory lock (``flock``) on ``<run_dir>/.run.lock`` for the whole run and
writes its pid there; every rank learns whether it got the lock, so all stop together. The
kernel drops the lock when the process ends, however it ends, so a killed run never blocks
the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from dml.distributed import broadcast_object, get_rank
from dml.errors import DMLError

LOCK_NAME = ".run.lock"


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, command: str) -> Iterator[None]:
    """Hold ``run_dir``'s run lock for the block (rank 0; collective: every rank calls it).

    Raises `DMLError` (one line, on every rank) when another process holds it.
    """
    with contextlib.ExitStack() as stack:
        problem = None
        if get_rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(run_dir / LOCK_NAME, "a+"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                handle.truncate(0)
                handle.write(f"{os.getpid()}\n")
                handle.flush()
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "?"
                problem = (
                    f"{run_dir} is in use by another `dml {command}` (pid {holder}); let it finish or stop it, "
                    "then run again (with --resume to continue)"
                )
        problem = broadcast_object(problem)
        if problem:
            raise DMLError(problem)
        yield
