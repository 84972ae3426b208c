"""One writer per shard folder: `dml prepare` runs that would write the same shards exclude each other.

Two runs into one ``prepare.output_dir`` deleted each other's ``.tmp`` files and both failed
with a bare "No such file or directory", leaving a half-written folder. Each run now holds an
advisory lock (``flock``) in ``<output_dir>/.progress/`` while it writes: a whole run holds
``run.lock`` exclusively; a partition (``--partition i/N``) holds it shared, so the
partitions of one cluster job write side by side, plus ``part-i-of-N.lock`` exclusively.
The kernel drops the locks when the process ends, however it ends, so a killed run never
blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from dml.errors import DataError


def _lock(path: Path, mode: int, stack: contextlib.ExitStack, who: str) -> None:
    handle = stack.enter_context(open(path, "a+b"))  # noqa: SIM115 - the stack closes it
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataError(
            f"{path.parent.parent}: {who} is already writing into this folder; wait for it to end "
            "(or stop it), then run again with --resume"
        ) from None


@contextlib.contextmanager
def hold_output_dir(progress_dir: Path, partition: tuple[int, int] | None) -> Iterator[None]:
    """Hold the write locks of ``progress_dir`` (``<output_dir>/.progress``) for the block.

    Raises `DataError` (one line) when another run that writes the same shards holds them.
    """
    progress_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if partition is None:
            _lock(progress_dir / "run.lock", fcntl.LOCK_EX, stack, "another `dml prepare` run")
        else:
            _lock(progress_dir / "run.lock", fcntl.LOCK_SH, stack, "a `dml prepare` run without --partition")
            index, count = partition
            _lock(
                progress_dir / f"part-{index}-of-{count}.lock",
                fcntl.LOCK_EX,
                stack,
                f"another run of --partition {index}/{count}",
            )
        yield
