"""The full-FC margin head for one process: the whole class-centre matrix (with K sub-centres
per class, `SubCenterArcFace`) scored against every sample, a margin function from
`dml.losses.margins`, and the softmax cross-entropy (`MarginHead`).

Its sharded, sampled counterpart for millions of classes or several processes is
`dml.losses.partial_fc.PartialFC`; the margins themselves (cosine -> logits) are in
`dml.losses.margins`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SubCenterArcFace(nn.Module):
    """Class cosines from K sub-centres per class (Deng et al., "Sub-center ArcFace:
    Boosting Face Recognition by Automatically Purifying Web Faces", ECCV 2020).

    Holds ``weight`` (num_classes * k, D); rows ``c*k .. c*k + k - 1`` are the sub-centres of
    class c. `forward(embeddings (N, D)) -> cosine (N, num_classes)` is, for each class, the
    largest cosine between the L2-normalised embedding and that class's normalised
    sub-centres. Pass the result with the labels to any margin (e.g. ``ArcFace(m=...)``,
    including per-class margins from `dynamic_margins`). With k = 1 it is the plain
    normalised linear layer of an ArcFace head.
    """

    def __init__(self, embedding_dim: int, num_classes: int, k: int = 3):
        super().__init__()
        if embedding_dim < 1 or num_classes < 1 or k < 1:
            raise ValueError(f"embedding_dim, num_classes and k must be >= 1, got {embedding_dim}, {num_classes}, {k}")
        self.embedding_dim, self.num_classes, self.k = embedding_dim, num_classes, k
        self.weight = nn.Parameter(torch.empty(num_classes * k, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)  # the scale is irrelevant: rows are normalised

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine (N, num_classes) of the embeddings (N, D) to each class: the max over its k
        sub-centres, both sides L2-normalised, in the embeddings' dtype.

        Raises ValueError for embeddings not (N, embedding_dim).
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must have shape (N, {self.embedding_dim}), got {tuple(embeddings.shape)}")
        weight = self.weight.to(embeddings.dtype)
        cosine = F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1))
        if self.k == 1:
            return cosine
        return cosine.view(-1, self.num_classes, self.k).amax(dim=2)

    @torch.no_grad()
    def dominant_subcenters(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(num_classes,) index in [0, k) of the sub-centre closest to most of each class's
        samples (classes absent from ``labels`` get 0). The paper keeps these after training
        and drops the rest together with samples far from them.

        Raises ValueError for labels not (N,).
        """
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        weight = F.normalize(self.weight.to(embeddings.dtype), dim=1).view(self.num_classes, self.k, -1)
        own = torch.einsum("nd,nkd->nk", F.normalize(embeddings, dim=1), weight[labels])
        nearest = own.argmax(dim=1)
        votes = torch.zeros(self.num_classes, self.k, dtype=torch.long, device=labels.device)
        votes.index_put_((labels, nearest), torch.ones_like(nearest), accumulate=True)
        return votes.argmax(dim=1)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, k={self.k}"


class MarginHead(nn.Module):
    """Full-FC margin-softmax head for one process: cosine, margin, cross-entropy.

    ``forward(embeddings (N, D), labels (N,)) -> scalar``: mean over the batch of the
    softmax cross-entropy of ``margin(cosine, labels)``, where cosine is between the
    L2-normalised embeddings and the L2-normalised class centres ``weight``
    ((num_classes * sub_centers, D); with sub_centers > 1 the class cosine is the max over
    the class's sub-centres, see `SubCenterArcFace`). `logits` returns the (N, C) logits.

    Args:
        margin: any margin module of `dml.losses.margins` (ArcFace, CosFace, ...).
    """

    def __init__(self, embedding_dim: int, num_classes: int, margin: nn.Module, sub_centers: int = 1):
        super().__init__()
        self.centres = SubCenterArcFace(embedding_dim, num_classes, k=sub_centers)
        self.margin = margin

    @property
    def weight(self) -> nn.Parameter:
        """The class centres (num_classes * sub_centers, D), not normalised."""
        return self.centres.weight

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits (N, C) with the margin on each row's target column (see the margin module)."""
        return self.margin(self.centres(embeddings), labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean softmax cross-entropy of the margin logits; embeddings (N, D), labels (N,) -> scalar.

        Raises ValueError for labels not (N,) or outside [0, num_classes).
        """
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and bool(((labels < 0) | (labels >= self.centres.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.centres.num_classes})")
        logits = self.logits(embeddings, labels)
        # cross-entropy in float32 at least: fp16 logits with a large scale would overflow the sum
        return F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, labels)
