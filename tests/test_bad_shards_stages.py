"""`dml evaluate` and `dml train` on cut shards (the truncated-shard reproduction): one line
and exit 2 by default; with ``data.bad_samples=skip`` they finish and say how much was skipped."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from dml.cli import main
from dml.config import DMLConfig
from dml.data.manifest import load_manifest, manifest_digest
from dml.models.model_file import build_model, save_final_model
from dml.train.metrics_log import read_metrics
from train_fixtures import tiny_shards, tiny_train_config, write_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_shards")
    shards = tiny_shards(root)
    base = tiny_train_config(
        shards,
        root / "run",
        evaluate={"model_path": str(root / "model.pt"), "output_dir": str(root / "eval"), "gallery_split": None},
    )
    save_final_model(
        build_model(DMLConfig.model_validate(base)),
        DMLConfig.model_validate(base),
        root / "model.pt",
        manifest_digest(shards),
    )
    return {"root": root, "shards": shards, "base": base}


def cut_after_sample(path: Path, samples: int) -> None:
    """Cut a shard at the block after the last member of its ``samples``-th sample."""
    with tarfile.open(path) as tar:
        last = [m for m in tar.getmembers() if m.name.endswith(".json")][samples - 1]
    end = last.offset_data + last.size
    with open(path, "r+b") as handle:
        handle.truncate(end + -end % 512)


def run_cli(capsys, command: str, config: Path, *overrides: str) -> tuple[int, str]:
    code = main([command, "--config", str(config), *overrides])
    return code, (capsys.readouterr().err.strip().splitlines() or [""])[-1]


def test_evaluate_on_a_cut_query_shard(workspace, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(workspace["shards"], shards)
    cut_after_sample(shards / "query-000001.tar", 2)
    listed = load_manifest(shards)["splits"]["query"]["count"]
    missing = load_manifest(shards)["splits"]["query"]["shards"][1]["count"] - 2
    config = write_config(
        tmp_path / "c.yaml", {**workspace["base"], "data": {**workspace["base"]["data"], "shard_dir": str(shards)}}
    )
    code, line = run_cli(capsys, "evaluate", config, f"evaluate.output_dir={tmp_path / 'stop'}")
    assert code == 2 and "query-000001.tar" in line and f"({missing} missing)" in line
    assert not (tmp_path / "stop" / "report.json").exists()
    code, _ = run_cli(capsys, "evaluate", config, f"evaluate.output_dir={tmp_path / 'skip'}", "data.bad_samples=skip")
    report = json.loads((tmp_path / "skip" / "report.json").read_text())
    assert code == 0
    assert report["counts"]["num_query"] == listed - missing and report["counts"]["manifest_query"] == listed
    assert report["counts"]["skipped_query"] == missing
    assert f"over {listed - missing} of the {listed} query samples" in report["notes"][0]
    assert "bad samples were skipped" in (tmp_path / "skip" / "report.md").read_text()


def test_train_on_a_cut_train_shard(workspace, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(workspace["shards"], shards)
    for shard in shards.glob("train-*.tar"):  # every one, so the resampled stream surely meets one
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    base = {**workspace["base"], "data": {**workspace["base"]["data"], "shard_dir": str(shards)}}
    config = write_config(tmp_path / "c.yaml", base)
    code, line = run_cli(capsys, "train", config, f"train.run_dir={tmp_path / 'stop'}")
    assert code == 2 and line.startswith("dml train: error: ") and re.search(r"train-\d+\.tar: sample \S+: ", line)
    code, _ = run_cli(capsys, "train", config, f"train.run_dir={tmp_path / 'skip'}", "data.bad_samples=skip")
    assert code == 0 and (tmp_path / "skip" / "model.pt").exists()
    steps = [r for r in read_metrics(tmp_path / "skip") if "loss_main" in r]
    assert steps and all("skipped_samples" in r for r in steps) and steps[-1]["skipped_samples"] > 0
