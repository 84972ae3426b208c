"""`dml prepare` workers die with their run, a lost worker is one line that points at
`--resume`, and `--resume` rewrites finished shards whose bytes changed."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import make_folder_tree, write_idx
from dml.cli import main
from dml.data.manifest import load_manifest
from dml.data.shards import write_shards
from processes import alive, children
from test_prepare import prepare_config, shard_hashes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process state from /proc")

DEADLINE_S = 120.0  # generous bound for waits on a loaded machine; no test asserts a duration
IMAGES = 4000


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def big_idx(tmp_path) -> Path:
    """IDX images large enough that 2 workers need many shards (and some seconds)."""
    root = tmp_path / "idx"
    root.mkdir()
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (IMAGES, 96, 96)), gz=False)
    write_idx(root / "train-labels-idx1-ubyte", np.arange(IMAGES) % 10, gz=False)
    return root


def prepare_argv(source: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dml.cli",
        "prepare",
        f"prepare.source.path={source}",
        f"prepare.output_dir={out}",
        "prepare.workers=2",
        "prepare.shards.max_samples=20",
        *extra,
    ]


def start_prepare(source: Path, out: Path, log: Path) -> subprocess.Popen:
    # Output goes to a file, not a pipe: orphaned workers would hold a pipe open for ever.
    with open(log, "w") as stream:
        return subprocess.Popen(prepare_argv(source, out), stdout=stream, stderr=subprocess.STDOUT)


def start_and_find_workers(source: Path, out: Path, log: Path) -> tuple[subprocess.Popen, list[int]]:
    """Start `dml prepare` with 2 workers; return it and its worker pids once a shard is done."""
    run = start_prepare(source, out, log)
    wait_for(lambda: any((out / ".progress").glob("*.tar.json")) or run.poll() is not None, "the first shard")
    workers = children(run.pid)
    if run.poll() is not None or len(workers) != 2:
        run.kill()
        raise AssertionError(
            f"prepare finished before the kill or has no 2 workers ({workers}): {log.read_text()[-2000:]}"
        )
    return run, workers


def test_workers_die_when_prepare_is_killed(tmp_path, big_idx):
    out = tmp_path / "out"
    run, workers = start_and_find_workers(big_idx, out, tmp_path / "log.txt")
    try:
        run.kill()
        run.wait()
        wait_for(lambda: not any(alive(w) for w in workers), "the orphaned workers to die")
        written = {p.name for p in out.glob("*.tar")}
        assert 0 < len(written) < IMAGES // 20  # the run stopped part-way; the workers wrote no more
    finally:
        for pid in [w for w in workers if alive(w)]:
            os.kill(pid, signal.SIGKILL)
    assert {p.name for p in out.glob("*.tar")} == written


def test_lost_worker_is_one_line_and_resume_finishes(tmp_path, big_idx):
    out = tmp_path / "out"
    run, workers = start_and_find_workers(big_idx, out, tmp_path / "log.txt")
    try:
        os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
        run.wait(timeout=DEADLINE_S)
        err = (tmp_path / "log.txt").read_text()
    finally:
        run.kill()
        for pid in [w for w in workers if alive(w)]:
            os.kill(pid, signal.SIGKILL)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert run.returncode == 2 and "Traceback" not in err
    assert len(errors) == 1 and "worker process was lost" in errors[0] and "--resume" in errors[0], err[-2000:]
    assert not list(out.glob("*.tmp")) and not any(alive(w) for w in workers)
    resumed = subprocess.run(prepare_argv(big_idx, out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    counts = load_manifest(out)["counts"]
    assert counts["inputs"] == counts["written"] == IMAGES
    assert main(["prepare", "--verify", str(out)]) == 0


def test_parent_pid_watch_alone_ends_an_orphan(tmp_path):
    """Without prctl (other systems), the pid watch ends the worker; a sibling that does not
    call `die_with_parent` lives on, so the test can tell the two apart."""
    script = textwrap.dedent("""
        import os, sys, time
        from dml.data.workers import die_with_parent
        parent = os.getpid()
        for watched in (True, False):
            if os.fork() == 0:
                if watched:
                    die_with_parent(parent, use_prctl=False)
                time.sleep(600)
                os._exit(0)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    kids: list[int] = []
    try:
        wait_for(lambda: len(children(parent.pid)) == 2, "two children")
        kids = sorted(children(parent.pid))
        parent.kill()
        parent.communicate()
        wait_for(lambda: not alive(kids[0]) or not alive(kids[1]), "the watched child to end")
        assert sum(alive(k) for k in kids) == 1  # exactly one ended: the watched one
    finally:
        for pid in [k for k in kids if alive(k)]:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("altered", [1, 3])
def test_resume_rewrites_altered_shards(tmp_path, caplog, altered):
    make_folder_tree(tmp_path / "src", classes=4, per_class=6, bad=False)
    config = prepare_config(tmp_path / "src", tmp_path / "out")
    write_shards(config)
    original = {name: (tmp_path / "out" / name).read_bytes() for name in shard_hashes(tmp_path / "out")}
    rng = np.random.default_rng(altered)
    victims = sorted(rng.choice(sorted(original), altered, replace=False))
    for name in victims:
        data = bytearray(original[name])
        data[int(rng.integers(0, len(data)))] ^= 0x01
        (tmp_path / "out" / name).write_bytes(bytes(data))
    assert main(["prepare", "--verify", str(tmp_path / "out")]) == 1
    with caplog.at_level(logging.WARNING, logger="dml"):
        write_shards(config, resume=True)
    rewritten = sorted(
        Path(r.getMessage().split()[1]).name for r in caplog.records if "differs from the sha256" in r.getMessage()
    )
    assert rewritten == victims
    assert {n: (tmp_path / "out" / n).read_bytes() for n in original} == original
    assert main(["prepare", "--verify", str(tmp_path / "out")]) == 0
