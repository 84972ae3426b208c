"""A backbone, pooling and input size that do not fit together are refused when the model is
built, as a one-line ConfigError naming the keys (and exit 2 from `dml train`), never as a
library traceback at the first training step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dml.config import load_config
from dml.errors import ConfigError
from dml.models.model_file import build_model
from train_fixtures import tiny_shards, tiny_train_config, write_config

ROOT = Path(__file__).resolve().parents[1]

MISFITS = [
    # ViT patch 16: every size that is not a multiple of it
    *[(["model.backbone=test_vit", f"data.image_size={size}"], "divisible by patch size") for size in (17, 30, 47)],
    (["model.backbone=test_resnet", "model.pooling=cls"], "class token"),
    (["model.backbone=test_resnet", "model.pooling=avg+cls"], "class token"),
]


@pytest.mark.parametrize(("overrides", "reason"), MISFITS)
def test_misfits_are_one_line_config_errors(overrides, reason):
    with pytest.raises(ConfigError, match=reason) as caught:
        build_model(load_config(None, overrides))
    message = str(caught.value)
    assert "\n" not in message and "model.backbone=" in message and "data.image_size=" in message


@pytest.mark.parametrize("size", [16, 32, 48])
def test_fitting_sizes_build(size):
    model = build_model(load_config(None, ["model.backbone=test_vit", f"data.image_size={size}", "model.pooling=cls"]))
    assert model.training  # the probe leaves the mode as it found it


def test_dml_train_exits_2_with_one_line(tmp_path):
    config = tiny_train_config(tiny_shards(tmp_path), tmp_path / "run")
    config["model"].update({"backbone": "test_resnet", "pooling": "cls"})
    path = write_config(tmp_path / "c.yaml", config)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dml.cli", "train", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "class token" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr
