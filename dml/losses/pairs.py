"""Pair-based metric losses on a batch: triplet margin, contrastive, multi-similarity.

All take ``forward(embeddings (B, D), labels (B,)) -> scalar`` and L2-normalise the
embeddings themselves (callers may pass normalised or raw embeddings). Distances are the
Euclidean distance between normalised embeddings, d = sqrt(2 - 2 cos), in [0, 2]
(triplet, contrastive); multi-similarity uses the cosine similarity. Pairs are ordered and
exclude i == j. Every computation is on (B, B) matrices: no (B, B, B) tensor is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dml.losses.distances import (
    check_embeddings_and_labels,
    cosine_similarity_matrix,
    label_masks,
    mean_of_nonzero,
    normalized_euclidean_matrix,
)
from dml.losses.miners import PairMasks, Triplets

TRIPLET_MINING = ("all", "hard", "semihard", "easy", "batch_hard")


class TripletMarginLoss(nn.Module):
    """Triplet loss ``relu(d_ap - d_an + margin)`` over mined triplets of the batch.

    Mining (anchor a, positive p != a with a's label, negative n with another label), with
    ``t = d_an - d_ap`` and ``mm = mining_margin`` (default: ``margin``):
    - ``"all"``: every triplet with t <= mm (with mm == margin that is every triplet with
      a non-zero loss, so the same as using all triplets);
    - ``"hard"``: t <= min(0, mm), the negative is no farther than the positive;
    - ``"semihard"``: 0 < t <= mm;
    - ``"easy"``: t > mm. With mm == margin all of these have zero loss, so the loss is
      0; give a smaller ``mining_margin`` to use them;
    - ``"batch_hard"`` (Hermans et al., "In Defense of the Triplet Loss", 2017): per anchor,
      only its farthest positive and closest negative (``mining_margin`` unused).
    These match pytorch-metric-learning's TripletMarginMiner(mm, type) /
    BatchHardMiner followed by its TripletMarginLoss(margin).

    Reduction: mean over the triplets whose loss is > 0 (0 if there are none).
    Distance: Euclidean between L2-normalised embeddings (normalised here).

    Peak memory O(B^2): the triplets are never enumerated. For each anchor the negative
    distances are sorted once; for each anchor-positive pair the number and sum of the
    negative distances in the mined interval of d_an come from prefix sums and a binary
    search, which gives the exact sum of the triplet losses and their count. About ten
    (B, B) tensors are alive at once (B = 1024: ~80 MB in float64, ~40 MB in float32).
    Time O(B^2 log B).

    ``forward(embeddings, labels, triplets=None)``: given explicit `Triplets`, exactly those
    are used and ``mining`` is ignored; without them a triplet ``miner`` (e.g.
    `DistanceWeightedMiner`), if given, picks them.
    """

    def __init__(
        self,
        margin: float = 0.05,
        mining: str = "all",
        mining_margin: float | None = None,
        miner: nn.Module | None = None,
    ):
        super().__init__()
        if mining not in TRIPLET_MINING:
            raise ValueError(f"mining must be one of {TRIPLET_MINING}, got {mining!r}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin, self.mining = float(margin), mining
        self.mining_margin = self.margin if mining_margin is None else float(mining_margin)
        self.miner = miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, triplets: Triplets | None = None) -> torch.Tensor:
        """Mean hinge ``max(0, d(a, p) - d(a, n) + margin)`` over the mined (or given) triplets;
        distances between L2-normalised embeddings (B, D), labels (B,). A scalar (0 with no triplet).

        Raises ValueError for mismatched shapes.
        """
        check_embeddings_and_labels(embeddings, labels)
        distance = normalized_euclidean_matrix(embeddings)
        if triplets is None and self.miner is not None:
            triplets = self.miner(embeddings, labels)
        if triplets is not None:
            anchor, positive, negative = triplets
            losses = F.relu(distance[anchor, positive] - distance[anchor, negative] + self.margin)
            return mean_of_nonzero(losses, distance)
        positive, negative = label_masks(labels)
        if self.mining == "batch_hard":
            return self._batch_hard(distance, positive, negative)
        total, count = self._sum_over_mined_triplets(distance, positive, negative)
        if int(count) == 0:
            return distance.sum() * 0.0
        return total / count

    def _batch_hard(self, distance: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        usable = positive.any(dim=1) & negative.any(dim=1)
        hardest_positive = distance.masked_fill(~positive, float("-inf")).max(dim=1).values
        hardest_negative = distance.masked_fill(~negative, float("inf")).min(dim=1).values
        losses = F.relu(hardest_positive[usable] - hardest_negative[usable] + self.margin)
        return mean_of_nonzero(losses, distance)

    def _sum_over_mined_triplets(
        self, distance: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the non-zero triplet losses, their number) for the mined triplets."""
        negative_distance = distance.masked_fill(~negative, float("inf"))
        sorted_negative, _ = negative_distance.sort(dim=1)  # non-negatives (inf) sort last
        finite = sorted_negative.masked_fill(torch.isinf(sorted_negative), 0.0)
        prefix = F.pad(finite.cumsum(dim=1), (1, 0))  # prefix[a, i] = sum of a's i nearest negatives
        keys = sorted_negative.detach().contiguous()
        anchor_positive = distance.detach()

        def below(threshold: torch.Tensor, inclusive: bool) -> torch.Tensor:
            # per (a, p): how many of a's negatives have d_an < threshold (<= if inclusive)
            return torch.searchsorted(keys, threshold.contiguous(), right=inclusive)

        high = below(anchor_positive + self.margin, inclusive=False)  # non-zero loss
        low = torch.zeros_like(high)
        mined_limit = anchor_positive + self.mining_margin
        if self.mining in ("all", "hard", "semihard"):
            high = torch.minimum(high, below(mined_limit, inclusive=True))
        if self.mining == "hard":
            high = torch.minimum(high, below(anchor_positive, inclusive=True))
        elif self.mining == "semihard":
            low = below(anchor_positive, inclusive=True)
        elif self.mining == "easy":
            low = below(mined_limit, inclusive=True)
        count = (high - low).clamp_min(0).masked_fill(~positive, 0)
        high = torch.maximum(high, low)
        negative_sum = prefix.gather(1, high) - prefix.gather(1, low)
        per_pair = count * (distance + self.margin) - negative_sum
        total = per_pair.masked_fill(~positive, 0.0).sum()
        return total, count.sum()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, mining_margin={self.mining_margin}"


class ContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell et al. 2006) with margins on the (unsquared) distance.

    Positive pairs: ``relu(d - pos_margin)``; negative pairs: ``relu(neg_margin - d)``.
    Reduction: the mean over positive pairs with a non-zero loss plus the mean over negative
    pairs with a non-zero loss (each 0 if there are none), as in pytorch-metric-learning.
    Distance: Euclidean between L2-normalised embeddings. Peak memory O(B^2).

    ``forward(embeddings, labels, pairs=None)``: `PairMasks` restrict the pairs; without
    them, ``miner`` (if given) picks them, else all pairs are used.
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, miner: nn.Module | None = None):
        super().__init__()
        self.pos_margin, self.neg_margin, self.miner = float(pos_margin), float(neg_margin), miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, pairs: PairMasks | None = None) -> torch.Tensor:
        """Mean of the positive-pair hinge ``max(0, d - pos_margin)`` and the negative-pair hinge
        ``max(0, neg_margin - d)`` over the used pairs; embeddings (B, D), labels (B,) -> scalar.

        Raises ValueError for mismatched shapes.
        """
        check_embeddings_and_labels(embeddings, labels)
        positive, negative = _pairs_to_use(embeddings, labels, pairs, self.miner)
        distance = normalized_euclidean_matrix(embeddings)
        zero = torch.zeros_like(distance)
        positive_losses = torch.where(positive, F.relu(distance - self.pos_margin), zero)
        negative_losses = torch.where(negative, F.relu(self.neg_margin - distance), zero)
        return mean_of_nonzero(positive_losses, distance) + mean_of_nonzero(negative_losses, distance)

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"


class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss of Wang et al. (CVPR 2019) on cosine similarity S.

    Per anchor i: ``(1/alpha) log(1 + sum_{j in P_i} exp(-alpha (S_ij - base)))
    + (1/beta) log(1 + sum_{k in N_i} exp(beta (S_ik - base)))``; a term with no pairs is 0.
    Reduction: mean over all B anchors (including those whose loss is 0).
    Embeddings are L2-normalised here. Peak memory O(B^2).

    ``forward(embeddings, labels, pairs=None)``: `PairMasks` (e.g. from
    `MultiSimilarityMiner`, as in the paper) restrict the pairs; without them ``miner``
    (if given) picks them, else all pairs are used.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, miner: nn.Module | None = None):
        super().__init__()
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"alpha and beta must be > 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.base, self.miner = float(alpha), float(beta), float(base), miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, pairs: PairMasks | None = None) -> torch.Tensor:
        """Multi-similarity loss (Wang et al. 2019) averaged over anchors; cosine similarities of
        embeddings (B, D), labels (B,) -> scalar.

        Raises ValueError for mismatched shapes.
        """
        check_embeddings_and_labels(embeddings, labels)
        positive, negative = _pairs_to_use(embeddings, labels, pairs, self.miner)
        similarity = cosine_similarity_matrix(embeddings)
        positive_term = _soft_plus_sum(-self.alpha * (similarity - self.base), positive) / self.alpha
        negative_term = _soft_plus_sum(self.beta * (similarity - self.base), negative) / self.beta
        return (positive_term + negative_term).mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}"


def _soft_plus_sum(exponents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, log(1 + sum over the row's masked entries of exp(x)); 0 for empty rows."""
    masked = exponents.masked_fill(~mask, float("-inf"))
    with_one = torch.cat([masked, torch.zeros_like(masked[:, :1])], dim=1)  # the "1 +" term
    return torch.logsumexp(with_one, dim=1)


def _pairs_to_use(
    embeddings: torch.Tensor, labels: torch.Tensor, pairs: PairMasks | None, miner: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) masks: the given pairs, else the miner's, else all pairs."""
    if pairs is None and miner is not None:
        pairs = miner(embeddings, labels)
    all_positive, all_negative = label_masks(labels)
    if pairs is None:
        return all_positive, all_negative
    size = (labels.shape[0], labels.shape[0])
    if tuple(pairs.positive.shape) != size or tuple(pairs.negative.shape) != size:
        raise ValueError(
            f"pair masks must have shape {size}, got {tuple(pairs.positive.shape)} and {tuple(pairs.negative.shape)}"
        )
    # a mask can only narrow the label-defined pairs: never turn a negative into a positive
    return pairs.positive.bool() & all_positive, pairs.negative.bool() & all_negative
