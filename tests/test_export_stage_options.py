"""`export.preprocessing_in_graph` reaches the export stage: with it, the exported ONNX model
takes uint8 NHWC pixels (`PixelInputModel`) and gives the trained model's embeddings."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from data_fixtures import make_folder_tree
from dml.config import DMLConfig
from dml.data.manifest import manifest_digest
from dml.data.shards import write_shards
from dml.export.run import run_export
from dml.models.model_file import build_model, save_final_model

SIZE = 16


@pytest.mark.parametrize("in_graph", [False, True], ids=["float-input", "pixels-in-graph"])
def test_export_preprocessing_in_graph_from_config(tmp_path, in_graph):
    make_folder_tree(tmp_path / "src", classes=2, per_class=4, bad=False)
    config = DMLConfig.model_validate(
        {
            "prepare": {
                "source": {"path": str(tmp_path / "src")},
                "output_dir": str(tmp_path / "shards"),
                "split": {"mode": "sample", "train_fraction": 0.5, "query_fraction": 1.0},
            },
            "data": {"shard_dir": str(tmp_path / "shards"), "image_size": SIZE, "channels": 1, "num_workers": 0},
            "model": {"backbone": "resnet18", "embedding_dim": 8, "pooling": "avg"},
            "export": {
                "model_path": str(tmp_path / "run"),
                "output_dir": str(tmp_path / "export"),
                "formats": ["onnx"],
                "parity_images": 4,
                "preprocessing_in_graph": in_graph,
            },
        }
    )
    write_shards(config.prepare)
    torch.manual_seed(0)
    model = build_model(config).eval()
    (tmp_path / "run").mkdir()
    save_final_model(model, config, tmp_path / "run" / "model.pt", manifest_digest(tmp_path / "shards"))
    result = run_export(config)
    assert result.card["preprocessing"]["in_graph"] is in_graph
    session = onnxruntime.InferenceSession(str(result.files["onnx"]), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 1), dtype=np.uint8)
    normalised = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    feed = pixels if in_graph else normalised.numpy()
    assert session.get_inputs()[0].type == ("tensor(uint8)" if in_graph else "tensor(float)")
    got = session.run(None, {session.get_inputs()[0].name: feed})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(normalised).numpy(), atol=1e-4)
