"""Miners: pick the informative pairs or triplets of a batch for a pair loss.

A miner is an `nn.Module` called as ``miner(embeddings (B, D), labels (B,))`` under
``torch.no_grad`` semantics (its output carries no gradient). Pair miners return
`PairMasks` ((B, B) boolean masks, O(B^2) memory), triplet miners return `Triplets`
(three (T,) index tensors). Pass them to the losses: ``loss(embeddings, labels, pairs=...)``
or ``loss(embeddings, labels, triplets=...)``, or give the loss a ``miner=``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dml.losses.distances import (
    check_embeddings_and_labels,
    cosine_similarity_matrix,
    label_masks,
    normalized_euclidean_matrix,
)


class PairMasks(NamedTuple):
    """Selected pairs as (B, B) bool masks: ``positive[i, j]`` keeps the positive pair (i, j)
    (same label, i != j), ``negative[i, k]`` the negative pair (i, k)."""

    positive: torch.Tensor
    negative: torch.Tensor


class Triplets(NamedTuple):
    """Selected triplets as three (T,) long tensors of row indices into the batch."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


class MultiSimilarityMiner(nn.Module):
    """Pair mining of Wang et al., "Multi-Similarity Loss with General Pair Weighting for
    Deep Metric Learning" (CVPR 2019), on cosine similarity S of normalised embeddings.

    Keeps negative pair (i, k) if ``S_ik + epsilon > min_{j in P_i} S_ij`` (harder than the
    hardest positive, with slack) and positive pair (i, j) if
    ``S_ij - epsilon < max_{k in N_i} S_ik``. An anchor without negatives keeps no
    positives and vice versa. Output: `PairMasks`. Peak memory O(B^2).
    """

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> PairMasks:
        """Pair masks (B, B) of the informative pairs: positives less similar than the hardest
        negative plus epsilon, negatives more similar than the hardest positive minus epsilon.

        Embeddings (B, D), labels (B,); raises ValueError for mismatched shapes. No gradient.
        """
        check_embeddings_and_labels(embeddings, labels)
        similarity = cosine_similarity_matrix(embeddings.detach())
        positive, negative = label_masks(labels)
        hardest_negative = similarity.masked_fill(~negative, float("-inf")).amax(dim=1, keepdim=True)
        hardest_positive = similarity.masked_fill(~positive, float("inf")).amin(dim=1, keepdim=True)
        keep_positive = positive & (similarity - self.epsilon < hardest_negative)
        keep_negative = negative & (similarity + self.epsilon > hardest_positive)
        return PairMasks(keep_positive, keep_negative)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


class DistanceWeightedMiner(nn.Module):
    """Distance-weighted negative sampling of Wu et al., "Sampling Matters in Deep Embedding
    Learning" (ICCV 2017), on Euclidean distance d between normalised embeddings.

    For every positive pair (a, p) one negative n is drawn, with replacement, with
    probability proportional to ``1 / q(d_an)``, where
    ``q(d) ~ d^(D-2) * (1 - d^2/4)^((D-3)/2)`` is the density of distances between points
    uniform on the unit sphere in D dimensions; d is clamped below at ``cutoff`` (limits the
    weight of very close negatives) and negatives at ``d >= nonzero_loss_cutoff`` get weight
    0. Anchors with no negative of non-zero weight yield no triplets.
    Output: `Triplets`, one per positive pair (T <= B^2). Peak memory O(B^2).

    Args:
        generator: optional `torch.Generator` for reproducible draws (on the embeddings' device).
        seed: without a generator, draws come from a generator seeded with ``seed`` and made on
            the embeddings' device at the first call, so every rank of a job mining the same
            gathered batch draws the same triplets; None: torch's global generator.
    """

    def __init__(
        self,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if not 0.0 <= cutoff < nonzero_loss_cutoff:
            raise ValueError(f"need 0 <= cutoff < nonzero_loss_cutoff, got {cutoff}, {nonzero_loss_cutoff}")
        self.cutoff, self.nonzero_loss_cutoff = float(cutoff), float(nonzero_loss_cutoff)
        self.generator, self.seed = generator, seed

    def negative_weights(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, B) float64 sampling probabilities of each anchor's negatives (rows sum to 1,
        or are all zero for anchors that cannot be sampled)."""
        dim = embeddings.shape[1]
        distance = normalized_euclidean_matrix(embeddings.detach().double())
        clamped = distance.clamp(self.cutoff, min(self.nonzero_loss_cutoff, 2.0 - 1e-6))
        log_weight = (2.0 - dim) * clamped.log() - (dim - 3) / 2.0 * (1.0 - 0.25 * clamped * clamped).log()
        _, negative = label_masks(labels)
        usable = negative & (distance < self.nonzero_loss_cutoff)
        log_weight = log_weight.masked_fill(~usable, float("-inf"))
        # subtract each row's max before exp: with D ~ 128 the raw weights span 1e100
        row_max = log_weight.amax(dim=1, keepdim=True).clamp_min(-1e30)
        weight = (log_weight - row_max).exp()
        total = weight.sum(dim=1, keepdim=True)
        return torch.where(total > 0, weight / total.clamp_min(1e-300), torch.zeros_like(weight))

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        """One (anchor, positive, negative) index triplet per positive pair of a usable anchor,
        each (T,); its negative is drawn by `negative_weights` (inverse distance density).

        Embeddings (B, D), labels (B,); raises ValueError for mismatched shapes. No gradient.
        """
        check_embeddings_and_labels(embeddings, labels)
        device = embeddings.device
        weight = self.negative_weights(embeddings, labels)
        positive, _ = label_masks(labels)
        positive &= (weight.sum(dim=1) > 0).unsqueeze(1)
        anchor, pos = positive.nonzero(as_tuple=True)  # sorted by anchor
        if anchor.numel() == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return Triplets(empty, empty.clone(), empty.clone())
        per_anchor = positive.sum(dim=1)
        sampled_rows = per_anchor > 0
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        draws = torch.multinomial(
            weight[sampled_rows], int(per_anchor.max()), replacement=True, generator=self.generator
        )
        # the j-th positive of an anchor takes that anchor's j-th draw
        row_of_anchor = torch.cumsum(sampled_rows.long(), 0) - 1
        first = torch.cumsum(per_anchor, 0) - per_anchor
        rank = torch.arange(anchor.numel(), device=device) - first[anchor]
        negative = draws[row_of_anchor[anchor], rank]
        return Triplets(anchor, pos, negative)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, nonzero_loss_cutoff={self.nonzero_loss_cutoff}"
