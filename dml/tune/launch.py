"""Run one `dml train` as a child process (torchrun when a trial trains on several
processes), watching its ``metrics.jsonl`` while it runs so a trial can report and prune.

The child's output goes to a log file beside its run folder; it is stopped with the tuner
(the kernel's parent-death signal), so a killed study leaves no training behind.

A caller may instead pass a `FoldTrainer` (`dml pipeline tune` passes one that starts the
fold through the pipeline's launcher, e.g. a Kubernetes Job): it runs in a thread while this
module watches the same ``metrics.jsonl``, which must therefore be on a filesystem the tuner
shares with the training. Such a trainer cannot be stopped: a pruned fold trains to its end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dml.data.workers import arm_parent_death_signal
from dml.distributed import torchrun_argv

POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 20.0


class TrainFailed(Exception):
    """A training child exited non-zero; the message names its log's last line and path."""


FAIL_REASON = "fail_reason"  # the user attribute a failed trial keeps its one-line reason in


FoldTrainer = Callable[[Path, Path, int], None]
"""Trains one run config to its end: ``(config_path, run_dir, nproc_per_node)``, where
``run_dir`` is the config's ``train.run_dir``; raises `TrainFailed` when the training fails."""


def train_command(config_path: Path, nproc_per_node: int) -> list[str]:
    """The argv of `dml train --config CONFIG`, under torchrun when ``nproc_per_node`` > 1."""
    train = ["-m", "dml.cli", "train", "--config", str(config_path)]
    if nproc_per_node == 1:
        return [sys.executable, *train]
    return torchrun_argv(nproc_per_node, train[2:])


def _new_records(path: Path, seen: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of ``path`` after the first ``seen`` bytes, and the new offset."""
    if not path.exists():
        return [], seen
    with path.open("rb") as handle:
        handle.seek(seen)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return records, seen + end


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _last_line(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _watch_trainer(
    train_fold: FoldTrainer,
    config_path: Path,
    run_dir: Path,
    nproc_per_node: int,
    on_record: Callable[[dict[str, Any]], bool],
) -> bool:
    """`run_training` with ``train_fold`` in a thread; records after a stop are not reported."""
    failure: list[Exception] = []

    def train() -> None:
        try:
            train_fold(config_path, run_dir, nproc_per_node)
        except Exception as exc:  # noqa: BLE001 - re-raised in the watching thread
            failure.append(exc)

    worker = threading.Thread(target=train, name=f"train-{run_dir.name}", daemon=True)
    worker.start()
    metrics, seen, stopped = run_dir / "metrics.jsonl", 0, False
    while True:
        finished = not worker.is_alive()
        records, seen = _new_records(metrics, seen)
        if not stopped:
            stops = [on_record(record) for record in records]  # every record reported, then stop
            stopped = any(stops)
        if finished:
            break
        time.sleep(POLL_SECONDS)
    if failure:
        raise failure[0]
    return not stopped


def run_training(
    config_path: Path,
    run_dir: Path,
    nproc_per_node: int,
    on_record: Callable[[dict[str, Any]], bool],
    train_fold: FoldTrainer | None = None,
) -> bool:
    """Train with ``config_path`` (whose ``train.run_dir`` is ``run_dir``), passing each new
    metrics record to ``on_record``; ``on_record`` returning True stops the child at once.
    With ``train_fold`` the training is that callable's instead of a local child (not stoppable:
    records after the stop are ignored and the call returns when it ends).

    Returns True when it ran to the end, False when stopped by ``on_record``. Raises
    `TrainFailed` when the child exits non-zero (log: ``run_dir`` + ``.log``).
    """
    if train_fold is not None:
        return _watch_trainer(train_fold, config_path, run_dir, nproc_per_node, on_record)
    log_path = run_dir.with_name(run_dir.name + ".log")
    metrics, seen = run_dir / "metrics.jsonl", 0
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            train_command(config_path, nproc_per_node),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=arm_parent_death_signal,
        )
        try:
            while True:
                finished = process.poll() is not None
                records, seen = _new_records(metrics, seen)
                stops = [on_record(record) for record in records]  # every record reported, then stop
                if any(stops):
                    _stop(process)
                    return False
                if finished:
                    break
                time.sleep(POLL_SECONDS)
        except BaseException:
            _stop(process)
            raise
    if process.returncode != 0:
        raise TrainFailed(f"dml train exited {process.returncode}: {_last_line(log_path)} (log: {log_path})")
    return True
