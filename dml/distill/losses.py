"""Embedding distillation losses: absolute and relative teacher, RKD distance and angle.

Every function takes ``student`` (B, D) and ``teacher`` (B, D) with row i of both describing
the same image, and returns a scalar. The student must already live in the teacher's space
(same D) for the absolute loss; the relational losses only compare distances or angles
*within* each space, so they would work across dimensions, but `dml distill` always trains
the student at the teacher's width. The teacher is treated as a constant: callers pass a
tensor without gradient (the functions never differentiate through it).

Sources:
- absolute and relative teacher: Yu et al., "Learning Metrics from Teachers: Compact
  Networks for Image Embedding", CVPR 2019.
- RKD distance and angle: Park et al., "Relational Knowledge Distillation", CVPR 2019.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, same_dim: bool = True) -> None:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"student and teacher must be 2-D (B, D), got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher batches differ: {student.shape[0]} vs {teacher.shape[0]} rows")
    if same_dim and student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"student width {student.shape[1]} != teacher width {teacher.shape[1]}: "
            "project the student to the teacher's embedding dim first"
        )


def absolute_teacher_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: Literal["l2", "cosine"] = "cosine"
) -> torch.Tensor:
    """Pull each student embedding onto its teacher embedding (Yu et al.'s absolute teacher).

    ``l2``: mean over rows of the squared Euclidean distance ``||s_i - t_i||^2``.
    ``cosine``: mean over rows of ``1 - cos(s_i, t_i)`` (scale-free; for unit vectors it is
    half the ``l2`` value). An empty batch gives 0. Memory: O(B D).

    Raises ValueError for a ``kind`` other than 'l2' or 'cosine'.
    """
    _check_pair(student, teacher)
    teacher = teacher.detach().to(student.dtype)
    if student.shape[0] == 0:
        return student.sum() * 0.0
    if kind == "l2":
        return (student - teacher).pow(2).sum(dim=1).mean()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=1, eps=1e-12)).mean()
    raise ValueError(f"absolute loss kind must be 'l2' or 'cosine', got {kind!r}")


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of the B(B-1)/2 pairs i < j of the rows of ``x`` (B, D), in
    ``torch.triu_indices`` order. Computed from the Gram matrix (O(B^2) memory, no (B, B, D)
    tensor). Rows closer than 1e-6 count as coincident: distance 0, gradient 0."""
    squared_norms = x.pow(2).sum(dim=1)
    gram = x @ x.t()
    rows, cols = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    squared = squared_norms[rows] + squared_norms[cols] - 2.0 * gram[rows, cols]
    # Coincident rows: distance exactly 0 with zero gradient (sqrt's gradient is infinite at 0).
    return torch.where(squared > 1e-12, squared.clamp_min(1e-12).sqrt(), torch.zeros_like(squared))


def relative_teacher_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Match the in-batch distance matrices (Yu et al.'s relative teacher).

    Mean over the B(B-1)/2 pairs i < j of ``| d(s_i, s_j) - d(t_i, t_j) |`` with Euclidean
    ``d`` (an L1 penalty, so a few badly placed pairs do not dominate). Fewer than 2 rows
    give 0. Memory: O(B^2).
    """
    _check_pair(student, teacher, same_dim=False)
    if student.shape[0] < 2:
        return student.sum() * 0.0
    with torch.no_grad():
        target = pairwise_distances(teacher.detach().to(student.dtype))
    return (pairwise_distances(student) - target).abs().mean()


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss (Park et al.).

    Each space's pair distances are divided by that space's mean pair distance (so the
    student matches the teacher's *shape*, not its scale), then compared with the Huber loss
    (smooth L1, delta 1), averaged over the B(B-1)/2 pairs. Fewer than 2 rows give 0.
    Memory: O(B^2).
    """
    _check_pair(student, teacher, same_dim=False)
    if student.shape[0] < 2:
        return student.sum() * 0.0
    with torch.no_grad():
        target = pairwise_distances(teacher.detach().to(student.dtype))
        target = target / target.mean().clamp_min(1e-12)
    distances = pairwise_distances(student)
    distances = distances / distances.mean().clamp_min(1e-12)
    return F.smooth_l1_loss(distances, target, beta=1.0)


def _angle_cosines(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """cos of the angle at anchor j between points i and k, ``cos[a, i, k]`` for each anchor
    ``j = anchors[a]``: ``<e_ij, e_kj>`` with ``e_ij = (x_i - x_j) / ||x_i - x_j||``.
    Shape (A, B, B); the unit vectors cost (A, B, D) memory."""
    unit = F.normalize(x.unsqueeze(0) - x[anchors].unsqueeze(1), p=2, dim=2, eps=1e-12)
    return unit @ unit.transpose(1, 2)


def _angle_chunk_loss(student: torch.Tensor, teacher: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Sum of Huber(cos_s - cos_t) over the triplets (i, j, k) of distinct rows whose anchor
    j is in ``anchors``."""
    b = student.shape[0]
    with torch.no_grad():
        target = _angle_cosines(teacher, anchors)
        index = torch.arange(b, device=student.device)
        distinct = (
            (index.view(1, b, 1) != anchors.view(-1, 1, 1))
            & (index.view(1, 1, b) != anchors.view(-1, 1, 1))
            & (index.view(1, b, 1) != index.view(1, 1, b))
        )
    huber = F.smooth_l1_loss(_angle_cosines(student, anchors), target, beta=1.0, reduction="none")
    return (huber * distinct).sum()


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, anchor_chunk: int | None = None) -> torch.Tensor:
    """RKD angle-wise loss (Park et al.).

    For every ordered triplet (i, j, k) of distinct rows, the cosine of the angle at j,
    ``<e_ij, e_kj>`` with ``e_ij = (x_i - x_j) / ||x_i - x_j||``, is computed in both spaces;
    the loss is the Huber loss (smooth L1, delta 1) of their difference averaged over the
    B(B-1)(B-2) triplets. Fewer than 3 rows give 0.

    Memory is O(B^3) (plus O(B^2 D) for the unit difference vectors): batch 128 needs ~8 MB
    per (B, B, B) float32 tensor, batch 1024 ~4 GB. ``anchor_chunk`` bounds it: anchors are
    processed ``anchor_chunk`` at a time under activation checkpointing (recomputed in
    backward), so the peak is O(anchor_chunk * B * (B + D)) at the cost of a second forward.
    Same value and gradient either way.

    Raises ValueError for an ``anchor_chunk`` below 1.
    """
    _check_pair(student, teacher, same_dim=False)
    b = student.shape[0]
    if b < 3:
        return student.sum() * 0.0
    teacher = teacher.detach().to(student.dtype)
    anchors = torch.arange(b, device=student.device)
    if anchor_chunk is None or anchor_chunk >= b:
        total = _angle_chunk_loss(student, teacher, anchors)
    else:
        if anchor_chunk < 1:
            raise ValueError(f"anchor_chunk must be >= 1, got {anchor_chunk}")
        chunks = (
            checkpoint(_angle_chunk_loss, student, teacher, part, use_reentrant=False)
            for part in anchors.split(anchor_chunk)
        )
        total = cast(torch.Tensor, sum(chunks))  # >= 1 chunk, so a tensor, never the start value 0
    return total / (b * (b - 1) * (b - 2))
