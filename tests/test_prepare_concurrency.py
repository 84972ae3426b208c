"""`dml prepare` runs that share an output folder, and runs that are stopped: a second writer of
the same shards is refused in one line (partitions of one job still write side by side), and
Ctrl-C or SIGTERM ends a run with one line, no `.tmp` and no worker traceback, after which
`--resume` finishes it."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dml.cli import main
from dml.data.manifest import load_manifest
from test_prepare_workers import big_idx, prepare_argv, wait_for  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and process groups")


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if ": error: " in line]


def _hold(path: Path, mode: int):
    """Take ``path``'s lock the way a running prepare holds it (in this process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+b")  # noqa: SIM115 - returned to the caller, who closes it
    fcntl.flock(handle, mode | fcntl.LOCK_NB)
    return handle


# (lock held by the other run, mode, argv extra of this run, refused?)
OVERLAPS = [
    ("run.lock", fcntl.LOCK_EX, [], True),  # whole run vs whole run
    ("run.lock", fcntl.LOCK_EX, ["--partition", "0/2"], True),  # whole run vs a partition
    ("run.lock", fcntl.LOCK_SH, [], True),  # a partition vs whole run
    ("part-0-of-2.lock", fcntl.LOCK_EX, ["--partition", "0/2"], True),  # the same partition twice
    ("part-1-of-2.lock", fcntl.LOCK_EX, ["--partition", "0/2"], False),  # another partition
]


@pytest.mark.parametrize("case", range(len(OVERLAPS)))
def test_a_second_writer_of_the_same_shards_is_refused(tmp_path, capsys, big_idx, case):  # noqa: F811
    lock, mode, extra, refused = OVERLAPS[case]
    out = tmp_path / "out"
    other = _hold(out / ".progress" / lock, mode)
    if lock.startswith("part"):
        other_run = _hold(out / ".progress" / "run.lock", fcntl.LOCK_SH)
    code = main(
        ["prepare", f"prepare.source.path={big_idx}", f"prepare.output_dir={out}", "prepare.max_per_class=4", *extra]
    )
    errors = _errors(capsys)
    if refused:
        assert code == 2 and len(errors) == 1 and "already writing into this folder" in errors[0], errors
        assert str(out) in errors[0] and not list(out.glob("*.tar*"))
    else:
        assert code == 0 and not errors
    other.close()
    if lock.startswith("part"):
        other_run.close()


def test_two_real_runs_into_one_folder_end_with_one_complete_set(tmp_path, big_idx):  # noqa: F811
    out = tmp_path / "out"
    argv = prepare_argv(big_idx, out, "prepare.max_per_class=150")
    runs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) in ([0, 0], [0, 2]), results  # 0, 0: one ended first
    for code, err in results:
        assert "Traceback" not in err
        if code == 2:
            assert "--resume" in next(line for line in err.splitlines() if ": error: " in line)
    assert load_manifest(out)["counts"]["written"] == 1500
    assert main(["prepare", "--verify", str(out)]) == 0
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("sig,group", [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGINT, False)])
def test_a_stopped_run_leaves_one_line_and_no_tmp_then_resume_finishes(tmp_path, big_idx, sig, group):  # noqa: F811
    out = tmp_path / "out"
    log = tmp_path / "log"
    with open(log, "w") as stream:  # Ctrl-C in a terminal signals the whole process group
        run = subprocess.Popen(
            prepare_argv(big_idx, out),
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # a shell's background job (`nohup make test &`) inherits SIGINT ignored, and Python then
            # never raises KeyboardInterrupt: give the child the default, as a terminal would
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    wait_for(lambda: len(list(out.glob("*.tar"))) >= 2 and any(out.glob("*.tmp")), "shards being written")
    os.killpg(run.pid, sig) if group else run.send_signal(sig)
    assert run.wait() == 130
    text = log.read_text()
    assert "Traceback" not in text, text
    stops = [line for line in text.splitlines() if line.startswith("dml prepare: interrupted")]
    assert len(stops) == 1 and "--resume" in stops[0], text
    assert not list(out.glob("*.tmp"))
    resumed = subprocess.run(prepare_argv(big_idx, out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert load_manifest(out)["counts"]["written"] == 4000


def test_large_image_warning_names_the_file_once(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,000 < 40 x 40 = 1,600 <= 2 x 1,000
    for name in ("a", "b"):
        (tmp_path / "src" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "src" / name / "big.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "src" / name / "small.png")
    with caplog.at_level(logging.WARNING, logger="dml.data.shards"):
        code = main(["prepare", f"prepare.source.path={tmp_path / 'src'}", f"prepare.output_dir={tmp_path / 'out'}"])
    assert code == 0 and "DecompressionBombWarning" not in capsys.readouterr().err
    named = sorted(r.getMessage().split(":")[0] for r in caplog.records if "exceeds limit" in r.getMessage())
    assert named == ["a/big.png", "b/big.png"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["written"] == 4
