"""Building models from config, and saving, finding and loading the final model of a run.

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
from dml.errors import ConfigError, DMLError, first_line
from dml.models.embedder import build_embedding_model
from dml.models.preprocessing import Preprocessing

FORMAT = "dml.model/1"
MODEL_FILE = "model.pt"  # the final model inside a run folder


def build_model(
    config: DMLConfig | None = None, model: ModelConfig | None = None, data: DataConfig | None = None
) -> nn.Module:
    """The embedding model of ``config`` (or of explicit model/data sections), checked with one
    forward pass of a (1, channels, image_size, image_size) zero image.

    Raises TypeError when neither ``config`` nor both sections are given, and `ConfigError` (one
    line naming the keys) when the backbone, pooling and input size do not fit together, e.g. a
    ViT at a size that is not a multiple of its patch, ``cls`` pooling on a CNN, or an input
    smaller than the backbone's kernels.
    """
    if config is not None:
        model, data = model or config.model, data or config.data
    if model is None or data is None:
        raise TypeError("build_model needs a config, or both the model and the data section")
    try:
        built = build_embedding_model(
            model.backbone,
            embedding_dim=model.embedding_dim,
            pooling=model.pooling,
            in_chans=data.channels,
            pretrained_path=model.pretrained_path,
            input_size=(data.channels, data.image_size, data.image_size),
            embedding_bn=model.embedding_bn,
            dropout=model.dropout,
            bfe=model.bfe,
        )
        probe_forward(built, data)
    except DMLError:
        raise
    except (ValueError, AssertionError, RuntimeError) as error:  # timm and torch say it as an exception
        raise ConfigError(
            f"model.backbone={model.backbone!r}, model.pooling={model.pooling!r}, data.image_size="
            f"{data.image_size}, data.channels={data.channels}: the model cannot be built: {first_line(error)}"
        ) from None

    # The model is trained on the data config's normalisation, not timm's pretrained one:
    # record that, so evaluation and export feed it what it learned on.
    def expand(v: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(v) * data.channels if len(v) == 1 else tuple(v)

    built.preprocessing = Preprocessing(
        (data.channels, data.image_size, data.image_size),
        expand(data.mean),
        expand(data.std),
        built.preprocessing.interpolation,
        center_crop=data.center_crop,
    )
    return built


def probe_forward(model: nn.Module, data: DataConfig) -> None:
    """One no-grad forward of a zero image at the configured size in eval mode (BatchNorm on a
    batch of one), so a misfit shows when the model is built, not at the first training step."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, data.channels, data.image_size, data.image_size))
    finally:
        model.train(was_training)


def model_file_in(run_dir: str | Path) -> Path:
    """Where a run folder keeps its final model: ``<run_dir>/model.pt``."""
    return Path(run_dir) / MODEL_FILE


def find_model_file(path: str | Path, setting: str | None = None) -> Path:
    """``path`` itself when it is a file, else ``model.pt`` inside that run folder.

    Raises `DMLError` when there is no such file, naming ``setting`` (the config key that gave
    ``path``, e.g. "evaluate.model_path") when given.
    """
    path = Path(path)
    if path.is_dir():
        path = model_file_in(path)
    if not path.is_file():
        where = f" ({setting})" if setting else ""
        raise DMLError(f"no trained model at {path}{where}: run `dml train` first")
    return path


def save_final_model(
    model: nn.Module,
    config: DMLConfig,
    path: Path,
    data_digest: str,
    model_section: str = "model",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save weights + the config sections needed to rebuild them (atomic).

    ``model_section`` names where the model config lives ("model", or "distill.student").
    """
    model_config = config
    for part in model_section.split("."):
        model_config = getattr(model_config, part)
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": model_config.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "data_digest": data_digest,
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_model_file(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The payload of a ``model.pt`` (weights and the configs that built them), not yet built.

    Loaded with ``weights_only=True``: no arbitrary unpickling. Raises `DMLError` naming the
    file when it is missing, unreadable (truncated, empty, random bytes) or not a dml model.
    """
    path = find_model_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise DMLError(
            f"{path} cannot be read as a dml model (truncated, empty or not a torch file of "
            f"plain tensors: {first_line(exc, 160)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise DMLError(
            f"{path} is not a dml model file (no {FORMAT!r} format record): pass a model.pt "
            f"written by `dml train` or `dml distill`"
        )
    return payload


def load_final_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model in eval mode; returns (model, payload without weights).

    ``path`` is a ``model.pt`` or a run folder holding one. Raises `DMLError` (one line) when
    the file is missing, damaged, or its weights do not fit the model it describes.
    """
    path = find_model_file(path)
    payload = read_model_file(path)
    try:
        model = build_model(
            model=ModelConfig.model_validate(payload["model"]), data=DataConfig.model_validate(payload["data"])
        )
        model.load_state_dict(payload.pop("state_dict"))
    except (KeyError, ValueError, RuntimeError) as exc:  # pydantic's ValidationError is a ValueError
        raise DMLError(f"{path}: the weights do not fit the model it describes ({first_line(exc, 160)})") from None
    return model.to(device).eval(), payload
