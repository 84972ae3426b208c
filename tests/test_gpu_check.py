"""benchmarks/gpu_check.sh on a machine without a GPU: it says so and exits 0, writing nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from dml.config import DMLConfig

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA GPU" in done.stdout
    assert not out.exists()


def test_its_config_is_a_valid_dml_config(tmp_path):
    """The GPU run cannot be tried here; its config at least validates (names, keys, ranges)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    DMLConfig.model_validate(yaml.safe_load(yaml.safe_dump(gpu_check.config(tmp_path))))
