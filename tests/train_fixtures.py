"""A tiny shard set and training config that run in seconds on one CPU core."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from data_fixtures import make_folder_tree
from dml.config import DMLConfig
from dml.data.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]


def tiny_shards(
    tmp_path: Path, classes: int = 6, per_class: int = 12, split: dict | None = None, max_samples: int = 9
) -> Path:
    """``split``: the prepare split section (default: per sample, 3/4 train, leave-one-out query)."""
    make_folder_tree(tmp_path / "src", classes=classes, per_class=per_class, bad=False)
    out = tmp_path / "shards"
    config = DMLConfig.model_validate(
        {
            "prepare": {
                "source": {"path": str(tmp_path / "src")},
                "output_dir": str(out),
                "split": split or {"mode": "sample", "train_fraction": 0.75, "query_fraction": 1.0},
                "shards": {"max_samples": max_samples},
            }
        }
    ).prepare
    write_shards(config)
    return out


def tiny_train_config(shards: Path, run_dir: Path, **sections) -> dict:
    """A config dict for a seconds-long run; ``sections`` update top-level sections."""
    config: dict[str, Any] = {
        "seed": 0,
        "data": {
            "shard_dir": str(shards),
            "image_size": 32,
            "channels": 3,
            "batch_size": 6,
            "num_workers": 0,
            "shuffle_buffer": 20,
        },
        "model": {"backbone": "mobilenetv3_small_050", "embedding_dim": 16},
        "loss": {"kind": "arcface", "scale": 16.0, "margin": 0.2},
        "optimizer": {"lr": 0.01},
        "train": {"run_dir": str(run_dir), "epochs": 1, "checkpoint_every": 2, "log_every": 1, "keep_last": 2},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path
