"""Pairwise distances and label masks shared by the pair losses and miners (all O(B^2))."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_embeddings_and_labels(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ValueError unless embeddings is (B, D) floating point and labels is (B,) integer."""
    if embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError(
            f"embeddings must be a floating-point (B, D) tensor, got {embeddings.dtype} "
            f"of shape {tuple(embeddings.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def cosine_similarity_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, B) cosine similarities of the L2-normalised rows of ``embeddings`` (B, D)."""
    unit = F.normalize(embeddings, dim=1)
    return unit @ unit.t()


def normalized_euclidean_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, B) Euclidean distances between the L2-normalised rows, in [0, 2].

    Computed as sqrt(2 - 2 cos) with a 1e-12 floor under the root, so the gradient stays
    finite for identical rows (whose distance then reads 1e-6 instead of 0).
    """
    squared = (2.0 - 2.0 * cosine_similarity_matrix(embeddings)).clamp_min(1e-12)
    return squared.sqrt()


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) (B, B) bool masks: same label off the diagonal / different label."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive = same & ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return positive, ~same


def mean_of_nonzero(losses: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of the strictly positive entries of ``losses``; a zero that keeps the graph of
    ``anchor`` when there are none (so ``backward`` still works)."""
    nonzero = losses > 0
    count = nonzero.sum()
    if int(count) == 0:
        return anchor.sum() * 0.0
    return torch.where(nonzero, losses, torch.zeros_like(losses)).sum() / count
