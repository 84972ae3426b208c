"""What an image must look like before it enters an embedding model.

Evaluation, distillation and export read this from ``EmbeddingModel.preprocessing`` instead of
guessing: decode by the pipeline's rule (`dml.data.pixels`), resize to ``input_size`` with
``interpolation``, scale pixels to [0, 1], then ``(x - mean) / std`` per channel. The resize
filter is the one the pipeline's transforms use (`dml.data.transforms.RESIZE_INTERPOLATION`),
not the backbone's pretrained default: a model card must describe how the model was fed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from timm.data import resolve_data_config
from torch import nn

from dml.data.transforms import RESIZE_INTERPOLATION


@dataclass(frozen=True)
class Preprocessing:
    """Input contract of a model.

    Attributes:
        input_size: (channels, height, width) the model is trained and exported at.
        mean, std: per-channel normalisation of [0, 1] pixels; one value per channel.
        interpolation: resize filter name as timm spells it ("bilinear", "bicubic", ...);
            the pipeline's own filter unless a caller states another.
        center_crop: fraction of each side kept around the centre before resizing (None: the
            whole image), e.g. to cut aligned face crops' borders at evaluation and export.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = RESIZE_INTERPOLATION
    center_crop: float | None = None

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (channels, height, width) of positive ints, got {self.input_size}")
        channels = self.input_size[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values each, got {self.mean} and {self.std}")
        if self.center_crop is not None and not 0.0 < self.center_crop <= 1.0:
            raise ValueError(f"center_crop must be a fraction in (0, 1], got {self.center_crop}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists instead of tuples), e.g. for a model card; ``center_crop``
        only when set."""
        out = {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }
        if self.center_crop is not None:
            out["center_crop"] = self.center_crop
        return out


def resolve_preprocessing(
    backbone: nn.Module, in_chans: int, input_size: int | Sequence[int] | None = None
) -> Preprocessing:
    """Derive the preprocessing of a timm backbone from its ``pretrained_cfg``.

    mean / std / default size come from ``timm.data.resolve_data_config`` (the config of the
    model's default pretrained tag, even though no weights are loaded). The interpolation is
    the pipeline's (``RESIZE_INTERPOLATION``), which every transform resizes with, not timm's
    pretrained default (bicubic for many backbones). With ``in_chans == 1`` the RGB mean and
    std are each averaged into one value.

    Args:
        input_size: override of the spatial size: an int (square), (height, width), or
            (channels, height, width) whose channels must equal ``in_chans``.
    """
    config = resolve_data_config(model=backbone)
    mean = tuple(float(v) for v in config["mean"])
    std = tuple(float(v) for v in config["std"])
    if in_chans == 1 and len(mean) != 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    height, width = _spatial_size(input_size, in_chans) if input_size is not None else config["input_size"][1:]
    return Preprocessing(
        input_size=(in_chans, int(height), int(width)),
        mean=mean,
        std=std,
        interpolation=RESIZE_INTERPOLATION,
    )


def _spatial_size(input_size: int | Sequence[int], in_chans: int) -> tuple[int, int]:
    size: tuple[int, ...]
    if isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        size = tuple(int(v) for v in input_size)
        if len(size) == 3:
            if size[0] != in_chans:
                raise ValueError(f"input_size {tuple(input_size)} has {size[0]} channels but in_chans is {in_chans}")
            size = size[1:]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be an int, (height, width) or (channels, height, width), got {input_size!r}")
    return size[0], size[1]
