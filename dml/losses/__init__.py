"""Metric-learning losses: margin softmax heads, centre loss, pair losses and miners.

`PartialFC` (the sharded head) lives in `dml.losses.partial_fc`.
"""

from dml.losses.center import CenterLoss
from dml.losses.margin_head import MarginHead, SubCenterArcFace
from dml.losses.margins import (ArcFace, CombinedMargin, CosFace, NormalizedSoftmax, SphereFace,
                                dynamic_margins)
from dml.losses.miners import DistanceWeightedMiner, MultiSimilarityMiner, PairMasks, Triplets
from dml.losses.pairs import ContrastiveLoss, MultiSimilarityLoss, TripletMarginLoss

__all__ = [
    "ArcFace", "CosFace", "SphereFace", "CombinedMargin", "NormalizedSoftmax", "dynamic_margins",
    "SubCenterArcFace", "MarginHead", "CenterLoss",
    "TripletMarginLoss", "ContrastiveLoss", "MultiSimilarityLoss",
    "MultiSimilarityMiner", "DistanceWeightedMiner", "PairMasks", "Triplets",
]
