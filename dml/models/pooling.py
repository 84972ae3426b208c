"""Global pooling of a backbone feature map (N, C, H, W) into a descriptor (N, C).

Three descriptors are provided, named as in the retrieval literature:

- ``avg``: average pooling (SPoC, sum-pooled convolutional features);
- ``max``: max pooling (MAC, maximum activations of convolutions);
- ``gem``: generalised-mean pooling with a learnable exponent, from Radenovic, Tolias and
  Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation" (TPAMI 2018):
  ``f_c = (mean_{h,w} x_{c,h,w} ** p) ** (1 / p)``. p = 1 is average pooling and p -> inf
  approaches max pooling.

All poolings reduce over the spatial axes with plain tensor ops, so they trace and export to
ONNX for any input size without data-dependent Python control flow.
"""

from __future__ import annotations

import torch
from torch import nn

from dml.registries import POOLINGS, parse_pooling  # noqa: F401 (the spec parser is torch-free, for the config)


class AvgPool(nn.Module):
    """Global average pooling: (N, C, H, W) -> (N, C)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Mean over H and W: (N, C, H, W) -> (N, C)."""
        return features.mean(dim=(2, 3))


class MaxPool(nn.Module):
    """Global max pooling: (N, C, H, W) -> (N, C)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Max over H and W: (N, C, H, W) -> (N, C)."""
        return features.amax(dim=(2, 3))


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al. 2018): (N, C, H, W) -> (N, C).

    Args:
        p: initial exponent; must be positive. 3.0 is the value the paper starts from.
        eps: activations are clamped to at least ``eps`` before the power so that the
            fractional power and its gradient stay finite (feature maps after ReLU hold zeros;
            some backbones such as EfficientNet end in SiLU and may hold small negatives).
        learnable: if True, ``p`` is an ``nn.Parameter`` trained with the network (one scalar
            shared by all channels, as in the paper); otherwise a fixed buffer.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent p must be positive, got {p}")
        initial = torch.full((1,), float(p))
        if learnable:
            self.p = nn.Parameter(initial)
        else:
            self.register_buffer("p", initial)
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Generalised mean ``mean(clamp(x, eps)^p)^(1/p)`` over H and W: (N, C, H, W) -> (N, C)."""
        powered = features.clamp(min=self.eps).pow(self.p)
        return powered.mean(dim=(2, 3)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}, learnable={isinstance(self.p, nn.Parameter)}"


def build_global_pool(name: str, gem_p: float = 3.0, gem_learnable: bool = True) -> nn.Module:
    """The global pooling registered as ``name`` (`dml.registries.POOLINGS`); ValueError if none is."""
    return POOLINGS.build(name, settings={"gem_p": gem_p, "gem_learnable": gem_learnable})
