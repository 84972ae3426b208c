"""Metric-learning losses: margin softmax heads, the sharded partial-FC head, centre loss,
pair losses and miners. Every name here is public API (see the design notes)."""

from dml.losses.center import CenterLoss
from dml.losses.full_fc import MarginHead, SubCenterArcFace
from dml.losses.margins import ArcFace, CombinedMargin, CosFace, NormalizedSoftmax, SphereFace, dynamic_margins
from dml.losses.miners import DistanceWeightedMiner, MultiSimilarityMiner, PairMasks, Triplets
from dml.losses.pairs import ContrastiveLoss, MultiSimilarityLoss, TripletMarginLoss
from dml.losses.partial_fc import PartialFC

__all__ = [
    "ArcFace",
    "CenterLoss",
    "CombinedMargin",
    "ContrastiveLoss",
    "CosFace",
    "DistanceWeightedMiner",
    "MarginHead",
    "MultiSimilarityLoss",
    "MultiSimilarityMiner",
    "NormalizedSoftmax",
    "PairMasks",
    "PartialFC",
    "SphereFace",
    "SubCenterArcFace",
    "TripletMarginLoss",
    "Triplets",
    "dynamic_margins",
]
