"""Batch Feature Erasing (BFE), a training-time regulariser on backbone feature maps.

From Dai, Chen, Gu, Zhu and Tan, "Batch DropBlock Network for Person Re-identification and
Beyond" (ICCV 2019; the first arXiv version was titled "Batch Feature Erasing ..."). In each
training step one rectangle of the feature map, of fixed size ``height_ratio * H`` by
``width_ratio * W`` at a random position, is zeroed for every image of the batch alike, so the
network must learn from the remaining, less discriminative regions. The paper's defaults for
person re-identification are height ratio 0.3 and width ratio 1.0 (whole horizontal stripes).

Difference from the paper: the paper applies the erasing in a second branch next to an
un-erased global branch; here it is applied to the single feature map that feeds the
embedding neck. In eval mode the module is the identity.
"""

from __future__ import annotations

import torch
from torch import nn


class BatchFeatureErasing(nn.Module):
    """Zero one random rectangle shared by the whole batch, in training mode only.

    Args:
        height_ratio: erased height as a fraction of the feature-map height, in (0, 1].
        width_ratio: erased width as a fraction of the feature-map width, in (0, 1].

    Shapes: (N, C, H, W) -> (N, C, H, W). The rectangle covers
    ``max(1, round(height_ratio * H))`` rows and ``max(1, round(width_ratio * W))`` columns;
    its position is drawn from torch's global RNG.
    """

    def __init__(self, height_ratio: float = 0.3, width_ratio: float = 1.0) -> None:
        super().__init__()
        for name, ratio in (("height_ratio", height_ratio), ("width_ratio", width_ratio)):
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"BatchFeatureErasing {name} must be in (0, 1], got {ratio}")
        self.height_ratio = float(height_ratio)
        self.width_ratio = float(width_ratio)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Eval mode returns before any shape-dependent Python, so export sees no branches here.
        """Features (N, C, H, W) with one random block, the same for the whole batch, set to zero
        in training; unchanged in eval mode.
        """
        if not self.training:
            return features
        height, width = features.shape[-2], features.shape[-1]
        erase_h = max(1, round(self.height_ratio * height))
        erase_w = max(1, round(self.width_ratio * width))
        top = int(torch.randint(0, height - erase_h + 1, (1,)).item())
        left = int(torch.randint(0, width - erase_w + 1, (1,)).item())
        # A multiplicative mask keeps autograd simple: erased cells get zero gradient.
        mask = features.new_ones((1, 1, height, width))
        mask[:, :, top : top + erase_h, left : left + erase_w] = 0
        return features * mask

    def extra_repr(self) -> str:
        return f"height_ratio={self.height_ratio}, width_ratio={self.width_ratio}"
