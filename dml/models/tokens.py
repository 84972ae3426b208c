"""Backbone outputs that are not an NCHW feature map, brought to one for the embedding neck.

Three layouts of a timm backbone's unpooled output (``num_classes=0, global_pool=""``):

- ``"nchw"``: a feature map (N, C, H, W): CNNs and conv/attention hybrids (CoAtNet, MaxViT);
- ``"nhwc"``: a channels-last map (N, H, W, C), e.g. Swin; permuted to NCHW;
- ``"tokens"``: a token sequence (N, T, C) from a ViT-family model (ViT / DeiT, DINOv2- and
  CLIP-architecture ViTs, EVA): ``num_prefix_tokens`` class / register tokens first, then
  the patch tokens. It is laid out as a (N, C, T, 1) map, and each descriptor pools
  either the class token (``"cls"``) or the patch tokens only (``"avg"`` = their mean,
  ``"max"``, ``"gem"`` = GeM over them), with the NCHW poolings of `dml.models.pooling`.

Everything here is shape-generic tensor code (slicing, transpose), so any token count, i.e.
any input size the backbone allows, passes through, and the neck still traces for ONNX.
"""

from __future__ import annotations

import torch
from torch import nn

from dml.models.pooling import build_global_pool

LAYOUTS = ("nchw", "nhwc", "tokens")
CLASS_TOKEN = "cls"


def backbone_layout(backbone: nn.Module) -> str:
    """The layout (one of ``LAYOUTS``) of a timm backbone's unpooled ``forward`` output."""
    if getattr(backbone, "output_fmt", None) == "NHWC":
        return "nhwc"
    if hasattr(backbone, "num_prefix_tokens"):  # timm's ViT family (VisionTransformer, Eva, ...)
        return "tokens"
    return "nchw"


def class_token_count(backbone: nn.Module) -> int:
    """1 if a token backbone's first token is a class token, else 0."""
    return int(getattr(backbone, "cls_token", None) is not None)


class ToFeatureMap(nn.Module):
    """Backbone output in ``layout`` -> (N, C, H, W); tokens (N, T, C) become (N, C, T, 1)."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown backbone layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        self.layout = layout

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The backbone's output as an NCHW map: NHWC is permuted, tokens (N, T, C) become (N, C, T, 1)."""
        if self.layout == "nhwc":
            return features.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            return features.transpose(1, 2).unsqueeze(3)
        return features

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}"


class ClassTokenPool(nn.Module):
    """The class token of a token map: (N, C, T, 1) -> (N, C)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The class token: (N, C, T, 1) -> (N, C)."""
        return features[:, :, 0, 0]


class PatchTokenPool(nn.Module):
    """An NCHW pooling applied to the patch tokens only (the ``prefix`` class / register
    tokens left out): (N, C, T, 1) -> (N, C)."""

    def __init__(self, pool: nn.Module, prefix: int) -> None:
        super().__init__()
        self.pool, self.prefix = pool, prefix

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The pooling over the patch tokens only: (N, C, T, 1) -> (N, C)."""
        return self.pool(features[:, :, self.prefix :])

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}"


def build_descriptor_pool(
    name: str,
    layout: str,
    prefix_tokens: int = 0,
    has_class_token: bool = False,
    gem_p: float = 3.0,
    gem_learnable: bool = True,
) -> nn.Module:
    """The pooling called ``name`` for a backbone of ``layout`` (see the module docstring).

    Raises ValueError for ``"cls"`` on a backbone without a class token (any feature map,
    or a ViT built without one).
    """
    if name == CLASS_TOKEN:
        if layout != "tokens" or not has_class_token:
            what = "a feature-map backbone" if layout != "tokens" else "a ViT built without a class token"
            raise ValueError(f"pooling 'cls' needs a backbone with a class token, got {what}; use avg, max or gem")
        return ClassTokenPool()
    pool = build_global_pool(name, gem_p, gem_learnable)
    return PatchTokenPool(pool, prefix_tokens) if layout == "tokens" else pool
