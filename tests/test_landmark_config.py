"""Landmark recipe options reach the head from config: loss.sub_centers and loss.dynamic_margin
(margins from the manifest's training class counts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_fixtures import make_folder_tree
from dml.config import DMLConfig, load_config
from dml.data.manifest import load_manifest
from dml.data.shards import write_shards
from dml.errors import ConfigError
from dml.losses import dynamic_margins
from dml.train.checkpoint import HEAD_DIR, list_checkpoints, read_checkpoint
from dml.train.objective import train_class_margins
from dml.train.row_shards import RowShardReader
from dml.train.run import run_train
from train_fixtures import ROOT, tiny_train_config

DYNAMIC = {"m_min": 0.1, "m_max": 0.45, "power": 0.5}


def long_tail_shards(tmp_path: Path) -> Path:
    """5 classes with 16, 12, 8, 6 and 4 images; 3/4 of each class trains."""
    make_folder_tree(tmp_path / "src", classes=5, per_class=16, bad=False)
    for c, keep in enumerate((16, 12, 8, 6, 4)):
        for image in sorted((tmp_path / "src" / f"class_{c}").iterdir())[keep:]:
            image.unlink()
    out = tmp_path / "shards"
    write_shards(
        DMLConfig.model_validate(
            {
                "prepare": {
                    "source": {"path": str(tmp_path / "src")},
                    "output_dir": str(out),
                    "split": {"mode": "sample", "train_fraction": 0.75, "query_fraction": 1.0},
                }
            }
        ).prepare
    )
    return out


def test_sub_centres_and_dynamic_margins_train_from_config(tmp_path):
    shards = long_tail_shards(tmp_path)
    config = DMLConfig.model_validate(
        tiny_train_config(
            shards, tmp_path / "run", loss={"sub_centers": 3, "dynamic_margin": DYNAMIC}, train={"epochs": 1}
        )
    )
    run_train(config)
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    head = read_checkpoint(checkpoint)["objective"]["head"]
    assert head["sub_centers"] == 3 and head["class_margins"]
    rows = RowShardReader(checkpoint / HEAD_DIR, head["index"])
    assert rows.read("weight", 0, 5).shape == (5, 3, 16)
    margins = rows.read("class_margins", 0, 5)
    counts = load_manifest(shards)["splits"]["train"]["class_counts"]
    assert sorted(counts.values()) != [counts["0"]] * 5  # a real long tail
    expected = dynamic_margins([counts[str(c)] for c in range(5)], **DYNAMIC).double()
    assert torch.allclose(margins, expected)
    assert margins[0] == pytest.approx(0.1) and margins.max() == pytest.approx(0.45)


def test_classes_outside_the_training_split_do_not_stretch_the_margins(tmp_path):
    shards = long_tail_shards(tmp_path)
    config = DMLConfig.model_validate(tiny_train_config(shards, tmp_path / "run", loss={"dynamic_margin": DYNAMIC}))
    margins = train_class_margins(config, 7)  # two classes that never train
    assert margins[5:].tolist() == [pytest.approx(0.45)] * 2
    assert margins[:5].min() == pytest.approx(0.1) and margins[:5].max() == pytest.approx(0.45)
    with pytest.raises(ConfigError, match="no class counts for the training split 'nope'"):
        train_class_margins(
            config.model_copy(update={"data": config.data.model_copy(update={"train_split": "nope"})}), 7
        )


@pytest.mark.parametrize(
    "loss, message",
    [
        ({"kind": "sphereface", "dynamic_margin": DYNAMIC}, "dynamic_margin needs loss.kind arcface or cosface"),
        ({"kind": "triplet", "sub_centers": 2}, "sub_centers needs a margin head"),
        ({"sub_centers": 0}, "greater than or equal to 1"),
        ({"dynamic_margin": {"m_min": 0.5, "m_max": 0.2}}, r"m_min \(0.5\) must be <= m_max"),
    ],
)
def test_bad_landmark_options_are_refused_when_the_config_loads(loss, message):
    with pytest.raises(Exception, match=message):
        DMLConfig.model_validate({"loss": loss})


def test_the_landmark_recipe_loads_with_its_options():
    config = load_config(ROOT / "configs" / "landmark.yaml")
    assert config.loss.sub_centers == 3 and config.loss.dynamic_margin is not None
    assert config.model.pooling == "gem" and config.optimizer.freeze_backbone_steps > 0
    assert config.evaluate.reranking.methods == ("dba", "alpha_qe")
