"""Image transforms for training and evaluation, built from `DataConfig`.

Grey and RGB inputs are both accepted: every image is converted to the channel count the
model expects (``data.channels``) before resizing, so a grey dataset feeds an RGB backbone and
the other way round.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from dml.config import DataConfig
from dml.data.pixels import faithful_pixels

# The one resize filter of the pipeline (training, evaluation, parity, export). On PIL images
# torchvision's Resize is PIL's ``Image.resize((width, height), Image.Resampling.BILINEAR)``
# (PIL filters always antialias). Model cards state this name (`dml.models.Preprocessing`).
RESIZE_INTERPOLATION = "bilinear"
_RESIZE_MODE = T.InterpolationMode(RESIZE_INTERPOLATION)


class ConvertMode:
    """Any decoded PIL image -> grey ("L") or RGB for the model; a class so DataLoader workers
    can pickle it. The pixels are first read by the pipeline's one rule
    (`dml.data.pixels.faithful_pixels`: orientation, scaling of wide pixels, transparency)."""

    def __init__(self, channels: int):
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, image: Image.Image) -> Image.Image:
        image = faithful_pixels(image)
        return image if image.mode == self.mode else image.convert(self.mode)


def _normalize(config: DataConfig) -> T.Normalize:
    mean = list(config.mean) * (config.channels if len(config.mean) == 1 else 1)
    std = list(config.std) * (config.channels if len(config.std) == 1 else 1)
    return T.Normalize(mean, std)


def _train_pil_steps(config: DataConfig) -> list[Callable]:
    aug = config.augment
    size = config.image_size
    steps: list[Callable] = [ConvertMode(config.channels)]
    if aug.random_resized_crop:
        steps.append(T.RandomResizedCrop(size, scale=aug.crop_scale, interpolation=_RESIZE_MODE, antialias=True))
    else:
        steps.append(T.Resize((size, size), interpolation=_RESIZE_MODE, antialias=True))
    if aug.horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    if aug.rotation_degrees > 0:
        steps.append(T.RandomRotation(aug.rotation_degrees))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j if config.channels == 3 else 0))
    return steps


def build_train_transform(config: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Decode-side augmentation: resize (or random resized crop), flip, rotation, jitter.

    One image in, one normalised float tensor out. `TrainLoader` uses the equivalent split
    form (`build_train_uint8_transform` + `BatchNormalize`), which gives the same numbers.
    """
    return T.Compose([*_train_pil_steps(config), T.ToTensor(), _normalize(config)])


def build_train_uint8_transform(config: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """The augmentations of `build_train_transform`, ending in a uint8 (C, H, W) tensor."""
    return T.Compose([*_train_pil_steps(config), T.PILToTensor()])


class BatchNormalize:
    """uint8 batch (B, C, H, W) -> float, scaled to [0, 1] and normalised with the config's mean/std.

    Done once per batch instead of once per image: per-image ToTensor + Normalize was about a
    tenth of a loader worker's time on small images, and this is one vectorised op.
    """

    def __init__(self, config: DataConfig):
        norm = _normalize(config)
        self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().div_(255.0) - self.mean).div_(self.std)


class CenterCropFraction:
    """Keep the central ``fraction`` of a PIL image's width and height (at least 1 pixel each)."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        size = [max(1, round(height * self.fraction)), max(1, round(width * self.fraction))]
        return T.functional.center_crop(image, size)


def build_eval_transform(config: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic (centre crop +) resize + normalisation, the same at evaluation and export
    parity checks; ``data.center_crop`` is recorded in the model's preprocessing and card."""
    crop = [CenterCropFraction(config.center_crop)] if config.center_crop is not None else []
    return T.Compose(
        [
            ConvertMode(config.channels),
            *crop,
            T.Resize((config.image_size, config.image_size), interpolation=_RESIZE_MODE, antialias=True),
            T.ToTensor(),
            _normalize(config),
        ]
    )
