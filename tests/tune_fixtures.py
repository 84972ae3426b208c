"""A tiny class-split shard set, run config and search space for the `dml tune` tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from train_fixtures import tiny_shards, tiny_train_config


def class_split_shards(tmp_path: Path, classes: int = 8, per_class: int = 8) -> Path:
    """Half the classes train, the other half are test classes (query / gallery)."""
    return tiny_shards(
        tmp_path, classes, per_class, {"mode": "class", "train_fraction": 0.5, "query_fraction": 0.5}, max_samples=16
    )


def write_tune_files(tmp_path: Path, space: dict, **study) -> tuple[Path, Path]:
    """run.yaml (tiny training, validation every 2 steps) and space.yaml with a ``study`` section."""
    config = tiny_train_config(
        tmp_path / "shards",
        tmp_path / "run",
        train={"eval_every": 2},
        evaluate={"plots": False, "query_split": "query", "gallery_split": "gallery"},
    )
    config["train"].update({"eval_split": "query", "eval_gallery_split": "gallery"})
    run_path, space_path = tmp_path / "run.yaml", tmp_path / "space.yaml"
    run_path.write_text(yaml.safe_dump(config))
    space_path.write_text(yaml.safe_dump({**space, "study": {"study_dir": str(tmp_path / "study"), **study}}))
    return run_path, space_path
