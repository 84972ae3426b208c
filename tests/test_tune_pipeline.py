"""`dml pipeline tune`: the `dml tune` study as a Prefect flow (trials as mapped tasks) on tiny
data, under Prefect's own temporary server (a throwaway PREFECT_HOME, no API URL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import optuna
import pytest

from dml.config import load_config
from tune_fixtures import class_split_shards, write_tune_files

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.timeout(1500)]  # minutes under a loaded machine


def test_pipeline_tune_runs_the_study_as_mapped_tasks(tmp_path):
    class_split_shards(tmp_path)
    run, space = write_tune_files(
        tmp_path, {"loss.margin": [0.1, 0.3]}, n_trials=2, folds=2, seeds=1, parallel=2, sampler="grid"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=tempfile.mkdtemp(dir=tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dml.cli",
            "pipeline",
            "tune",
            "--config",
            str(run),
            "--space",
            str(space),
            "pipeline.launcher=torchrun",
        ],  # folds under local torchrun
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    study_dir = tmp_path / "study"
    trials = optuna.load_study(study_name="dml-tune", storage=f"sqlite:///{study_dir / 'study.db'}").get_trials()
    assert sorted(t.params["loss.margin"] for t in trials) == [0.1, 0.3]  # the grid, each value once
    assert all(t.state.name == "COMPLETE" for t in trials)
    logs = done.stdout + done.stderr
    assert all(f"trial {t.number}: COMPLETE" in logs for t in trials)  # logged by the flow's trial tasks
    assert "Task run failed" not in logs
    report = json.loads((study_dir / "report.json").read_text())
    best = max(trials, key=lambda t: t.value)
    assert report["best"]["number"] == best.number and len(report["test"]["per_seed"]) == 1
    assert load_config(study_dir / "best.yaml").loss.margin == best.params["loss.margin"]
    assert "pipeline tune: best config:" in done.stdout
    for trial in trials:  # every fold trained through the pipeline's torchrun launcher, its metrics read back
        for fold in range(2):
            fold_dir = study_dir / "trials" / f"trial-{trial.number:04d}" / f"fold-{fold}"
            assert "(launcher torchrun" in (fold_dir / "logs" / "tune-fold.log").read_text()
            assert (fold_dir / "model.pt").is_file()
        assert len(trial.intermediate_values) >= 2 and trial.value == pytest.approx(
            sum(trial.user_attrs["fold_map_at_r"]) / 2
        )
