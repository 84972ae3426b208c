"""Embedding neck: backbone feature map (N, C, H, W) -> L2-normalised embedding (N, D).

Backbones without an NCHW map (ViT tokens, Swin's NHWC map) are first brought to one by
`dml.models.tokens` (``layout``); for tokens each descriptor pools the class token
(``"cls"``) or the patch tokens.

Single descriptor (``pooling`` is ``"avg"``, ``"max"`` or ``"gem"``)::

    [batch feature erasing, train only] -> pool -> [BatchNorm1d(C)] -> [Dropout]
        -> Linear(C, D) -> [BatchNorm1d(D)] -> L2 normalise

Combination of global descriptors (``pooling`` like ``"avg+max+gem"``), after Jun, Ko, Kim,
Kim and Kim, "Combination of Multiple Global Descriptors for Image Retrieval" (CGD, 2019).
The variant implemented here: each of the k descriptors is computed from the same (optionally
erased) feature map, passed through its own optional BatchNorm1d(C) and dropout, projected
by its own Linear(C, D_k) and L2-normalised; the k parts are concatenated in the order given,
optionally batch-normalised as a whole, and L2-normalised again. D is split as evenly as
possible, the first descriptors taking one extra dimension each when D is not divisible by k
(D = 512 with k = 3 gives 171 + 171 + 170). Differences from the paper: CGD's auxiliary
classification loss on the first descriptor is left to the training losses, and the per-part
BatchNorm / dropout are options the paper does not have.

The forward pass in eval mode contains no data-dependent Python control flow, so the neck
traces and exports to ONNX with a dynamic batch dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dml.models.pooling import parse_pooling
from dml.models.tokens import ToFeatureMap, build_descriptor_pool


def split_embedding_dim(embedding_dim: int, parts: int) -> list[int]:
    """Split ``embedding_dim`` into ``parts`` sizes that differ by at most one, largest first.

    Raises ValueError when ``parts`` < 1 or exceeds ``embedding_dim``.
    """
    if parts < 1 or embedding_dim < parts:
        raise ValueError(f"embedding_dim {embedding_dim} cannot be split among {parts} descriptors")
    base, extra = divmod(embedding_dim, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


class DescriptorBranch(nn.Module):
    """One global descriptor: pool -> [BatchNorm1d] -> [Dropout] -> Linear. (N, C, H, W) -> (N, out_dim)."""

    def __init__(
        self,
        pool: nn.Module,
        in_channels: int,
        out_dim: int,
        feature_bn: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.feature_bn = nn.BatchNorm1d(in_channels) if feature_bn else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = nn.Linear(in_channels, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pool, batch-norm, dropout and project a feature map (N, C, H, W) to (N, out_dim)."""
        pooled = self.pool(features)
        return self.projection(self.dropout(self.feature_bn(pooled)))


class EmbeddingNeck(nn.Module):
    """Pool a feature map into an L2-normalised embedding; see the module docstring for the layout.

    Args:
        in_channels: channels C of the backbone feature map.
        embedding_dim: output size D.
        pooling: ``"avg"``, ``"max"``, ``"gem"`` or a ``+``-joined combination (CGD).
        feature_bn: BatchNorm1d on each pooled descriptor before projection.
        dropout: dropout probability before each projection, in [0, 1).
        embedding_bn: BatchNorm1d on the (concatenated) embedding before normalisation.
        erasing: optional training-time module applied to the feature map first
            (``BatchFeatureErasing``); must be the identity in eval mode.
        gem_p, gem_learnable: initial exponent of GeM and whether it is trained.
        layout: the backbone output's layout, ``"nchw"``, ``"nhwc"`` or ``"tokens"``
            ((N, T, C) with ``prefix_tokens`` class / register tokens first; ``has_class_token``
            says whether the first is a class token, which ``"cls"`` pooling needs).

    Note: BatchNorm1d in training mode needs more than one sample per batch.
    """

    def __init__(
        self,
        in_channels: int,
        embedding_dim: int,
        pooling: str = "gem",
        feature_bn: bool = False,
        dropout: float = 0.0,
        embedding_bn: bool = True,
        erasing: nn.Module | None = None,
        gem_p: float = 3.0,
        gem_learnable: bool = True,
        layout: str = "nchw",
        prefix_tokens: int = 0,
        has_class_token: bool = False,
    ) -> None:
        super().__init__()
        if layout == "tokens" and erasing is not None:
            raise ValueError("batch feature erasing (bfe) needs a feature-map backbone, not ViT tokens")
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        names = parse_pooling(pooling)
        part_dims = split_embedding_dim(embedding_dim, len(names))
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.pooling = "+".join(names)
        self.to_map = ToFeatureMap(layout)
        self.erasing = erasing if erasing is not None else nn.Identity()
        self.branches = nn.ModuleList(
            DescriptorBranch(
                build_descriptor_pool(name, layout, prefix_tokens, has_class_token, gem_p, gem_learnable),
                in_channels,
                dim,
                feature_bn,
                dropout,
            )
            for name, dim in zip(names, part_dims, strict=True)
        )
        self.embedding_bn = nn.BatchNorm1d(embedding_dim) if embedding_bn else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised embedding (N, embedding_dim) of a feature map (N, in_channels, H, W).

        Raises ValueError for a feature map of another shape (checked outside jit tracing).
        """
        features = self.to_map(features)
        # Skipped under jit tracing (ONNX export), where shape entries are traced values.
        """L2-normalised embedding (N, embedding_dim) of a feature map (N, in_channels, H, W).

        Raises ValueError for a feature map of another shape (checked outside jit tracing).
        """
        if not torch.jit.is_tracing() and (features.dim() != 4 or features.shape[1] != self.in_channels):
            raise ValueError(
                f"embedding neck expects a feature map (N, {self.in_channels}, H, W) (backbone output "
                f"layout {self.to_map.layout!r}), got shape {tuple(features.shape)}"
            )
        features = self.erasing(features)
        parts = [branch(features) for branch in self.branches]
        if len(parts) == 1:
            embedding = parts[0]
        else:
            # CGD: every descriptor is normalised on its own before concatenation.
            embedding = torch.cat([F.normalize(part, dim=1) for part in parts], dim=1)
        return F.normalize(self.embedding_bn(embedding), dim=1)
