"""Optional preprocessing inside the exported graph, and the input tensors fed to an export.

By default an exported model takes what the PyTorch model takes: float32 NCHW images,
resized to the model's input size, scaled to [0, 1] and normalised per channel with the
model's mean / std (the model card documents this). With ``preprocessing_in_graph`` the
exported graph is ``PixelInputModel`` instead: it takes decoded, resized pixels as uint8
NHWC (N, H, W, C) in 0..255 — what an image decoder hands a deployment — and does the
scaling and normalisation itself. Resizing is never part of the graph: the card states the
size and the interpolation to resize with.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from dml.models import Preprocessing


class PixelInputModel(nn.Module):
    """uint8 pixels (N, H, W, C) in 0..255 -> ``model``'s embeddings (N, D).

    Computes ``((pixels / 255) - mean) / std`` per channel, moves channels first and calls
    ``model``. ``mean`` / ``std`` are buffers, so they are exported as graph constants.
    """

    mean: torch.Tensor  # (1, C, 1, 1) buffers
    std: torch.Tensor

    def __init__(self, model: nn.Module, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model = model
        channels = preprocessing.input_size[0]
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, channels, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (N, H, W, C) -> the wrapped model's embeddings (N, D)."""
        images = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self.model((images - self.mean) / self.std)


def normalized_to_pixels(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Invert the normalisation: float NCHW normalised images -> uint8 NHWC pixels (rounded).

    Used to feed the caller's (normalised) parity and calibration images to a
    ``PixelInputModel`` export; rounding to whole pixel values is the only change.
    """
    channels = preprocessing.input_size[0]
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, channels, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, channels, 1, 1)
    pixels = ((images.float() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


def as_image_batch(images: torch.Tensor | Iterable[torch.Tensor], name: str, channels: int) -> torch.Tensor:
    """One CPU float32 (N, C, H, W) tensor from a tensor or an iterable of batch tensors.

    Raises ValueError naming ``name`` if the result is empty or has the wrong shape.
    """
    if not isinstance(images, torch.Tensor):
        parts = [torch.as_tensor(batch) for batch in images]
        if not parts:
            raise ValueError(f"{name} is empty: pass at least one image")
        images = torch.cat(parts)
    if images.dim() != 4 or images.shape[1] != channels or images.shape[0] < 1:
        raise ValueError(f"{name} must be a (N >= 1, {channels}, H, W) image tensor, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must hold normalised float images, got dtype {images.dtype}")
    return images.detach().to("cpu", torch.float32).contiguous()


def chunks(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of at most ``batch_size`` rows."""
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]


def collect_images(batches: Iterable[tuple], max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate loader batches into (images (N, C, H, W), labels (N,)), stopping at ``max_images``.

    Accepts ``EvalLoader`` batches ``(keys, images, labels)`` and ``(images, labels)`` pairs.

    Raises ValueError when the loader yields no batch.
    """
    images, labels, count = [], [], 0
    for batch in batches:
        batch_images, batch_labels = batch[-2], batch[-1]
        images.append(batch_images)
        labels.append(torch.as_tensor(batch_labels))
        count += batch_images.shape[0]
        if max_images is not None and count >= max_images:
            break
    if not images:
        raise ValueError("collect_images got no batches: the split is empty")
    stacked, stacked_labels = torch.cat(images), torch.cat(labels)
    if max_images is not None:
        stacked, stacked_labels = stacked[:max_images], stacked_labels[:max_images]
    return stacked, stacked_labels
