"""Progress off a terminal: tqdm's bar becomes periodic log lines (CI logs, pods), and
`dml prepare` reports listing, planning and writing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from data_fixtures import make_folder_tree
from dml.progress import progress


@pytest.mark.parametrize("total", [1, 7, 250])
def test_lines_end_at_the_total_and_name_the_work(total, caplog, monkeypatch):
    monkeypatch.setenv("DML_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="dml.progress"), progress(total=total, desc="train", unit="step") as bar:
        for step in range(total):
            bar.update(1)
            bar.set_postfix(loss=f"{1.0 / (step + 1):.3f}", refresh=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "dml.progress"]
    assert lines[0].startswith("train: 0/") and lines[-1].startswith(f"train: {total}/{total} step (100%)")
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and len(lines) <= total + 2
    assert all("\r" not in line and "\n" not in line for line in lines)


def test_interval_limits_the_lines(caplog, monkeypatch):
    monkeypatch.setenv("DML_PROGRESS_SECONDS", "3600")
    with caplog.at_level(logging.INFO, logger="dml.progress"):
        for _ in progress(range(1000), desc="embed query", unit="batch"):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "dml.progress"]
    assert len(lines) <= 3 and lines[-1].startswith("embed query: 1000/1000 batch (100%)")


def test_hidden_on_other_ranks(caplog):
    with caplog.at_level(logging.INFO, logger="dml.progress"):
        for _ in progress(range(5), desc="train", unit="step", show=False):
            pass
    assert not [r for r in caplog.records if r.name == "dml.progress"]


def test_prepare_logs_listing_planning_and_writing_when_not_a_terminal(tmp_path):
    make_folder_tree(tmp_path / "src", classes=4, per_class=6, bad=False)
    env = {**os.environ, "DML_PROGRESS_SECONDS": "0"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dml.cli",
            "prepare",
            f"prepare.source.path={tmp_path / 'src'}",
            f"prepare.output_dir={tmp_path / 'shards'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "prepare: listing: 28 path" in err  # 4 class folders + 24 files
    assert "prepare: planning: 24/24 img (100%)" in err
    assert "prepare: 24/24 img (100%)" in err
