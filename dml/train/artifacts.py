"""Building models from config and saving / loading the final model of a run.

``model.pt`` holds the weights together with the model and data config that built them and
the hash of the data manifest, so later stages (distill, evaluate, export) rebuild the exact
model without the training config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dml.config import DataConfig, DMLConfig, ModelConfig
from dml.errors import DMLError
from dml.models import Preprocessing, build_embedding_model

FORMAT = "dml.model/1"


def build_model(config: DMLConfig | None = None, model: ModelConfig | None = None,
                data: DataConfig | None = None) -> nn.Module:
    """The embedding model of ``config`` (or of explicit model/data sections)."""
    model = model or config.model
    data = data or config.data
    built = build_embedding_model(model.backbone, embedding_dim=model.embedding_dim, pooling=model.pooling,
                                  in_chans=data.channels, pretrained_path=model.pretrained_path,
                                  input_size=(data.channels, data.image_size, data.image_size),
                                  embedding_bn=model.embedding_bn, dropout=model.dropout, bfe=model.bfe)
    # The model is trained on the data config's normalisation, not timm's pretrained one:
    # record that, so evaluation and export feed it what it learned on.
    expand = (lambda v: tuple(v) * data.channels if len(v) == 1 else tuple(v))
    built.preprocessing = Preprocessing((data.channels, data.image_size, data.image_size),
                                        expand(data.mean), expand(data.std), built.preprocessing.interpolation,
                                        center_crop=data.center_crop)
    return built


def save_final_model(model: nn.Module, config: DMLConfig, path: Path, data_digest: str,
                     model_section: str = "model", extra: dict[str, Any] | None = None) -> Path:
    """Save weights + the config sections needed to rebuild them (atomic).

    ``model_section`` names where the model config lives ("model", or "distill.student").
    """
    model_config = config
    for part in model_section.split("."):
        model_config = getattr(model_config, part)
    payload = {"format": FORMAT, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "model": model_config.model_dump(mode="json"), "data": config.data.model_dump(mode="json"),
               "data_digest": data_digest, **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_final_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model in eval mode; returns (model, payload without weights)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise DMLError(f"no trained model at {path}: run `dml train` first")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise DMLError(f"{path} is not a dml model file")
    model = build_model(model=ModelConfig.model_validate(payload["model"]),
                        data=DataConfig.model_validate(payload["data"]))
    model.load_state_dict(payload.pop("state_dict"))
    return model.to(device).eval(), payload

