"""`dml tune` end to end on tiny data: a 2-trial, 2-fold study killed mid-trial and resumed.

Real processes throughout: `dml tune` and its `dml train` children are killed with SIGKILL
(the whole process group, as a machine losing the job would), the SQLite study is read back
with Optuna, and the resumed study must keep its finished work, mark the killed trial failed
and retry its values, and end with best.yaml, report.json, plots and the seeds' test results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from dml.config import load_config
from tune_fixtures import class_split_shards, write_tune_files

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.timeout(1500)]  # minutes under a loaded machine

SPACE = {"loss.scale": {"low": 8, "high": 32, "log": True}, "loss.margin": {"low": 0.1, "high": 0.4}}


def _tune(run: Path, space: Path, *extra: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dml.cli", "tune", "--config", str(run), "--space", str(space), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def _wait_for_training(metrics: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and "eval_map_at_r" in metrics.read_text()):
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "the first fold never logged a validation MAP@R"
        time.sleep(0.5)


def _trials(study_dir: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{study_dir / 'study.db'}"
    return optuna.load_study(study_name="dml-tune", storage=storage).get_trials()


def test_study_killed_mid_trial_resumes_and_reports(tmp_path):
    class_split_shards(tmp_path)
    run, space = write_tune_files(tmp_path, SPACE, n_trials=2, folds=2, seeds=1, parallel=1, nproc_per_node=2)
    study_dir = tmp_path / "study"
    first = _tune(run, space)
    _wait_for_training(study_dir / "trials" / "trial-0000" / "fold-0" / "metrics.jsonl", first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed = _trials(study_dir)
    assert [t.state for t in killed] == [optuna.trial.TrialState.RUNNING]

    again = _tune(run, space)  # without --resume an existing study is refused in one line
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 2 and "pass --resume" in out.strip().splitlines()[-1]

    resumed = _tune(run, space, "--resume")
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    trials = _trials(study_dir)
    states = [t.state.name for t in trials]
    assert states[0] == "FAIL" and states.count("COMPLETE") == 2, states
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.params == killed[0].params and retry.state.name == "COMPLETE"

    for trial in trials[1:]:  # every trial fold is an ordinary run folder
        for fold in (0, 1):
            run_dir = Path(trial.user_attrs["trial_dir"]) / f"fold-{fold}"
            assert {"config.yaml", "metrics.jsonl", "model.pt", "train_result.json"} <= {
                p.name for p in run_dir.iterdir()
            }
    report = json.loads((study_dir / "report.json").read_text())
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert report["best"]["number"] == best.number and report["trials_finished"] == 2
    assert len(report["test"]["per_seed"]) == 1 and 0.0 <= report["test"]["map_at_r"]["mean"] <= 1.0
    assert set(report["concatenated"]) == {"map_at_r", "precision_at_1", "r_precision"}
    assert Path(report["plots"]["optimization_history"]).is_file()
    config = load_config(study_dir / "best.yaml")  # dml train takes it as it is
    assert (config.loss.scale, config.loss.margin) == (best.params["loss.scale"], best.params["loss.margin"])
    assert "tune: best config:" in out and not list(study_dir.rglob("*.tmp"))
