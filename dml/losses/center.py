"""Center loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face
Recognition", ECCV 2016): pull each embedding towards a learned centre of its class."""

from __future__ import annotations

import torch
from torch import nn


class CenterLoss(nn.Module):
    """``forward(embeddings (B, D), labels (B,)) -> 0.5 * mean_i ||x_i - c_{y_i}||^2``.

    Reduction: mean over the batch of half the squared Euclidean distance to the own class
    centre (the paper sums over the batch; the mean keeps the weight independent of B).
    Embeddings are used as given (not normalised), so put it on the same features the main
    loss sees; add it with a weight, e.g. ``loss = arcface_loss + 0.01 * center_loss``.

    The centres ``centres`` (num_classes, D) are an ordinary parameter learned by the
    optimizer (instead of the paper's separate moving-average update). Give them their own
    learning rate with a parameter group, e.g.
    ``torch.optim.SGD([{"params": model.parameters()},
    {"params": center_loss.parameters(), "lr": 0.5}], lr=0.1)``.
    With plain SGD the step for centre c is ``lr * (sum over its samples of (c - x_i)) / B``.
    """

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(f"num_classes and embedding_dim must be >= 1, got {num_classes}, {embedding_dim}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.centres = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Half the mean squared distance of each embedding (B, D) to its class centre; a scalar.

        Raises ValueError for embeddings not (B, embedding_dim), labels not an integer (B,) tensor,
        an empty batch, or a label outside [0, num_classes).
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must have shape (B, {self.embedding_dim}), got {tuple(embeddings.shape)}")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.numel() == 0:
            raise ValueError("CenterLoss needs a non-empty batch")
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.num_classes})")
        own_centres = self.centres.to(embeddings.dtype)[labels.long()]
        return 0.5 * (embeddings - own_centres).pow(2).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"
