"""TensorBoard files read back with TensorBoard's own reader (training scalars, the evaluation
embedding projector with sprite and labels), and the report's UMAP / t-SNE / PCA maps."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dml.config import DMLConfig
from dml.eval.maps import draw_embedding_maps, map_rows
from dml.train.metrics_log import read_metrics
from train_fixtures import tiny_shards, tiny_train_config

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 4-step run and its evaluation, with TensorBoard on and all three maps."""
    from dml.eval.run import run_evaluate
    from dml.train.run import run_train

    root = tmp_path_factory.mktemp("tensorboard")
    config = tiny_train_config(tiny_shards(root), root / "run", train={"max_steps": 4, "checkpoint_every": 100})
    config["evaluate"] = {
        "model_path": str(root / "run"),
        "output_dir": str(root / "run" / "eval"),
        "gallery_split": None,
        "grid_queries": 0,
        "maps": ["pca", "umap", "tsne"],
    }
    config["tracking"] = {"tensorboard": True}
    config = DMLConfig.model_validate(config)
    run_train(config)
    return root / "run", run_evaluate(config)


def test_training_scalars_open_with_tensorboards_reader(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"loss_main", "lr", "images_per_s", "max_rss_mb"} <= set(events.Tags()["scalars"])
    records = [r for r in read_metrics(run_dir) if "loss_main" in r]
    assert [(e.step, e.value) for e in events.Scalars("loss_main")] == [
        (r["step"], pytest.approx(r["loss_main"], rel=1e-6)) for r in records
    ]
    assert [e.step for e in events.Scalars("lr")] == [1, 2, 3, 4]


def test_projector_has_the_embeddings_labels_and_sprite(tracked_run):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    run_dir, _result = tracked_run
    folder = run_dir / "eval" / "tensorboard"
    config = text_format.Parse((folder / "projector_config.pbtxt").read_text(), ProjectorConfig())
    [embedding] = config.embeddings
    vectors = np.loadtxt(folder / embedding.tensor_path, delimiter="\t", ndmin=2)
    names = (folder / embedding.metadata_path).read_text().splitlines()
    manifest = json.loads((run_dir.parent / "shards" / "manifest.json").read_text())
    assert vectors.shape == (manifest["splits"]["query"]["count"], 16)
    assert len(names) == len(vectors) and set(names) <= set(manifest["classes"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    side = math.ceil(math.sqrt(len(vectors)))
    assert list(embedding.sprite.single_image_dim) == [32, 32]
    with Image.open(folder / embedding.sprite.image_path) as sprite:
        assert sprite.size == (32 * side, 32 * side)


def test_report_shows_every_configured_map(tracked_run):
    run_dir, result = tracked_run
    report = json.loads(Path(result.report_path).read_text())
    assert {"embedding_map", "embedding_map_umap", "embedding_map_tsne"} <= set(report["plots"])
    markdown = Path(result.markdown_path).read_text()
    for file in ("embedding_map.png", "embedding_map_umap.png", "embedding_map_tsne.png"):
        assert (run_dir / "eval" / file).is_file() and f"]({file})" in markdown


@pytest.mark.parametrize("count,limit", [(5, 10), (10, 10), (11, 10), (1000, 37), (3, 1)])
def test_map_sample_is_seeded_sorted_and_bounded(count, limit):
    rows = map_rows(count, limit, seed=3)
    assert len(rows) == min(count, limit) and len(np.unique(rows)) == len(rows)
    assert np.all(np.diff(rows) > 0) and rows.max() < count
    assert np.array_equal(rows, map_rows(count, limit, seed=3))


def test_maps_of_separated_classes_are_trustworthy_and_name_their_trust(tmp_path, caplog):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32)) * 4
    labels = np.repeat(np.arange(4), 40)
    vectors = centres[labels] + rng.normal(size=(160, 32)) * 0.3
    with caplog.at_level(logging.INFO, logger="dml.eval.maps"):
        drawn = draw_embedding_maps(
            vectors, labels, ["pca", "umap", "tsne"], tmp_path, ["a", "b", "c", "d"], seed=0, limit=120
        )
    assert set(drawn) == {"embedding_map", "embedding_map_umap", "embedding_map_tsne"}
    trusts = [
        float(r.getMessage().split("trustworthiness ")[1].split()[0])
        for r in caplog.records
        if "trustworthiness" in r.getMessage()
    ]
    assert len(trusts) == 3 and min(trusts) > 0.9
    for file in drawn.values():
        with Image.open(tmp_path / file) as image:
            assert image.size[0] > 400


def test_too_few_samples_draw_no_map(tmp_path):
    assert draw_embedding_maps(np.eye(4), np.arange(4), ["pca"], tmp_path, None, seed=0, limit=100) == {}
