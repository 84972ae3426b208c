"""`data.center_crop`: evaluation and export keep the image's centre, and the model card says so."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dml.config import DataConfig, DMLConfig
from dml.data.transforms import build_eval_transform
from dml.export import export_model
from dml.models.model_file import build_model, load_final_model, save_final_model


def framed(size: int, inner: int) -> Image.Image:
    """A black square with a centred white square of side ``inner``."""
    pixels = np.zeros((size, size), np.uint8)
    start = (size - inner) // 2
    pixels[start : start + inner, start : start + inner] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size, fraction", [(40, 0.5), (63, 0.4), (100, 0.25)])
def test_eval_transform_keeps_only_the_centre(size, fraction):
    image = framed(size, int(size * fraction) + 2)  # a white square a little larger than the crop
    config = DataConfig(image_size=16, channels=1, mean=(0.0,), std=(1.0,))
    cropped = build_eval_transform(config.model_copy(update={"center_crop": fraction}))(image)
    whole = build_eval_transform(config)(image)
    assert torch.all(cropped == 1.0)  # white everywhere: the black frame was cut off
    assert whole.mean() < 0.5


def test_center_crop_travels_from_config_to_model_and_card(tmp_path):
    config = DMLConfig.model_validate(
        {
            "model": {"backbone": "resnet18", "embedding_dim": 16},
            "data": {"image_size": 32, "channels": 1, "center_crop": 0.8},
        }
    )
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert model.preprocessing.center_crop == 0.8
    save_final_model(model, config, tmp_path / "model.pt", data_digest="x")
    loaded, _ = load_final_model(tmp_path / "model.pt")
    assert loaded.preprocessing.center_crop == 0.8 and loaded.preprocessing.to_dict()["center_crop"] == 0.8
    result = export_model(loaded, tmp_path / "export", torch.randn(4, 1, 32, 32), formats=("onnx",))
    card = json.loads(result.card_path.read_text())
    assert card["preprocessing"]["center_crop"] == 0.8
    assert "central 0.8 of each side" in card["preprocessing"]["applied"]
    without = build_model(config.model_copy(update={"data": config.data.model_copy(update={"center_crop": None})}))
    assert without.preprocessing.center_crop is None and "center_crop" not in without.preprocessing.to_dict()
