"""Margin functions for cosine-softmax heads: ArcFace, CosFace, SphereFace, combined, plain
(and per-class `dynamic_margins`). They hold no class centres: the heads that own the centres
and apply a margin are `dml.losses.full_fc.MarginHead` (one process) and
`dml.losses.partial_fc.PartialFC` (sharded).

Each margin is an `nn.Module` mapping ``(cosine (N, C), labels (N,))`` to scaled logits
``(N, C)``: every column is multiplied by the scale ``s``, and the column of each row's
target class is first replaced by a margin-penalised value. A row whose label is ``-1``
(its target class is not among these columns, as on one shard of a partial-FC head) gets
no margin, only the scale. Feed the logits to a softmax cross-entropy.

Numerics: the margin is computed in at least float32 (float64 stays float64) whatever the
input dtype, and the result is cast back to the input dtype, so fp16/bf16 cosines work
(fp16 logits overflow to inf beyond 65504, e.g. s=1e4 with SphereFace's psi <= 1 - 2m: use
bf16 or float32 there).
Cosines are clamped to [-1, 1] before ``acos``/``sqrt`` with a small floor under the square
root, so cosines of exactly +-1 give finite values and finite gradients.

Formulas (theta = arccos(cosine of the target column)):
- ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
  2019): cos(theta + m).
- CosFace (Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition",
  2018): cos(theta) - m.
- SphereFace (Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition",
  2017): cos(m * theta), extended past m * theta = pi by the monotone piecewise function
  psi(theta) = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi).
- CombinedMargin (InsightFace's combined margin): cos(m1 * theta + m2) - m3, extended the
  same way as SphereFace once m1 * theta + m2 passes pi.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dml.value_rules import MARGIN_RANGES, check_combined_margins, check_margin, check_scale, margin_range_error

ARCFACE_BOUNDARIES = ("fallback", "easy", "straight_through")


def dynamic_margins(
    class_counts: torch.Tensor | list[int], m_min: float = 0.05, m_max: float = 0.5, power: float = 0.25
) -> torch.Tensor:
    """Per-class margins that grow as classes get rarer ("dynamic margins").

    From the winning solution of the Google Landmark Recognition 2020 challenge (Henkel &
    Singer, "Supporting large-scale image recognition with out-of-domain samples", 2020):
    ``m_c = a * n_c ** (-power) + b`` with ``a, b`` chosen so that the most frequent class
    gets ``m_min`` and the rarest gets ``m_max``. Counts of 0 are treated as 1. If every
    class has the same count, every margin is ``m_max``. The default values are ours.

    Use them as ``ArcFace(m=...)`` / ``CosFace(m=...)`` in a `MarginHead`, or pass them to
    `PartialFC` as ``class_margins`` (sharded with its centres, remapped when sampling).

    Args:
        class_counts: (C,) number of training samples per class.
    Returns:
        (C,) float32 tensor of margins in [m_min, m_max], for ``ArcFace(m=...)``.

    Raises ValueError for counts that are empty, not 1-D or negative, or margins outside 0 <= m_min <= m_max.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("class_counts must be non-negative")
    if not 0.0 <= m_min <= m_max:
        raise ValueError(f"need 0 <= m_min <= m_max, got m_min={m_min}, m_max={m_max}")
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    rarity = counts.clamp_min(1.0).pow(-power)
    spread = rarity.max() - rarity.min()
    if spread <= 0:
        return torch.full_like(rarity, m_max, dtype=torch.float32)
    unit = (rarity - rarity.min()) / spread  # 0 for the most frequent class, 1 for the rarest
    return (m_min + (m_max - m_min) * unit).to(torch.float32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _monotone_cos(angle: torch.Tensor) -> torch.Tensor:
    """cos(angle) for angle in [0, pi], continued past pi so it keeps decreasing.

    Liu et al. (SphereFace): psi = (-1)^k cos(angle) - 2k with k = floor(angle / pi); it is
    continuous, equals cos on [0, pi] and is strictly decreasing for angle >= 0.
    """
    k = torch.floor(angle.detach() / math.pi).clamp_min(0)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * torch.cos(angle) - 2.0 * k


def _safe_acos(cosine: torch.Tensor) -> torch.Tensor:
    """arccos with the input held inside (-1, 1) so its gradient stays finite."""
    eps = torch.finfo(cosine.dtype).eps
    return torch.acos(cosine.clamp(-1.0 + eps, 1.0 - eps))


class _TargetMargin(nn.Module):
    """Shared plumbing: input checks, dtype handling, target gather/scatter and scaling.

    Subclasses implement `target_logit(target_cosine, labels)` returning the unscaled,
    margin-penalised target values for rows with a target (labels >= 0). Margins that can
    take one margin per row (`_PerClassMargin`) also implement `margin_logit`.
    """

    def __init__(self, s: float):
        super().__init__()
        check_scale(s)
        self.s = float(s)

    def target_logit(self, target_cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def margin_logit(self, target_cosine: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            f"{type(self).__name__} has no per-class margin: row_margins (dynamic margins) need ArcFace or CosFace"
        )

    def forward(
        self, cosine: torch.Tensor, labels: torch.Tensor, row_margins: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled logits (N, C) in the dtype of ``cosine``; see the module docstring.

        ``row_margins`` (N,), optional: the margin of each row's target, replacing the
        module's own ``m`` (how a sharded or sampled head applies per-class margins whose
        class axis is not ``cosine``'s columns). ArcFace and CosFace only; others raise
        ValueError.
        """
        _check_margin_inputs(cosine, labels)
        work = cosine.to(_compute_dtype(cosine.dtype))
        labels = labels.to(device=cosine.device, dtype=torch.long)
        has_target = labels >= 0
        column = torch.where(has_target, labels, torch.zeros_like(labels)).unsqueeze(1)
        target = work.gather(1, column).squeeze(1)
        if row_margins is None:
            penalised = self.target_logit(target, column.squeeze(1))
        else:
            if row_margins.shape != labels.shape:
                raise ValueError(f"row_margins must have shape {tuple(labels.shape)}, got {tuple(row_margins.shape)}")
            penalised = self.margin_logit(target, row_margins.to(device=work.device, dtype=work.dtype))
        new_target = torch.where(has_target, penalised.to(work.dtype), target)
        logits = work.scatter(1, column, new_target.unsqueeze(1))
        return (logits * self.s).to(cosine.dtype)


def _check_margin_inputs(cosine: torch.Tensor, labels: torch.Tensor) -> None:
    if cosine.dim() != 2:
        raise ValueError(f"cosine must have shape (N, C), got {tuple(cosine.shape)}")
    if not cosine.is_floating_point():
        raise ValueError(f"cosine must be a floating-point tensor, got {cosine.dtype}")
    if labels.dim() != 1 or labels.shape[0] != cosine.shape[0]:
        raise ValueError(f"labels must have shape ({cosine.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() and bool(((labels < -1) | (labels >= cosine.shape[1])).any()):
        raise ValueError(
            f"labels must be -1 or in [0, {cosine.shape[1]}), got values in [{int(labels.min())}, {int(labels.max())}]"
        )


class _PerClassMargin(_TargetMargin):
    """A margin that is one number or one number per class (a (C,) tensor)."""

    margin_rule = ""  # the key of its range in `dml.value_rules.MARGIN_RANGES`

    def __init__(self, s: float, m: float | torch.Tensor):
        super().__init__(s)
        if isinstance(m, torch.Tensor):
            if m.dim() != 1 or m.numel() == 0:
                raise ValueError(f"a per-class margin must be a non-empty (C,) tensor, got shape {tuple(m.shape)}")
            self.check_class_margins(m)
            self.register_buffer("class_margins", m.detach().to(torch.float64).clone())
            self.m: float | None = None
        else:
            check_margin(self.margin_rule, m)
            self.class_margins = None
            self.m = float(m)

    def check_class_margins(self, margins: torch.Tensor) -> None:
        """Raises ValueError unless every per-class margin lies in this margin's range
        (`dml.value_rules.MARGIN_RANGES`); NaN is refused."""
        low, high = MARGIN_RANGES[self.margin_rule]
        if bool(((margins < low) | (margins > high) | margins.isnan()).any()):
            found = f"values in [{float(margins.min())}, {float(margins.max())}]"
            raise margin_range_error(self.margin_rule, found)

    def row_margins(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
        """Margin of each row's own class (a float when the margin is shared)."""
        if self.class_margins is not None:
            return self.class_margins.to(device=like.device, dtype=like.dtype)[labels]
        assert self.m is not None  # __init__ sets one of the two
        return self.m

    def target_logit(self, target_cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m = self.row_margins(labels, target_cosine)
        return self.margin_logit(
            target_cosine, torch.as_tensor(m, dtype=target_cosine.dtype, device=target_cosine.device)
        )

    def forward(
        self, cosine: torch.Tensor, labels: torch.Tensor, row_margins: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (
            row_margins is None
            and self.class_margins is not None
            and cosine.dim() == 2
            and cosine.shape[1] != self.class_margins.numel()
        ):
            raise ValueError(
                f"per-class margins cover {self.class_margins.numel()} classes but cosine has "
                f"{cosine.shape[1]} columns: per-class margins need the full class axis "
                "(on a sharded or sampled head pass them to PartialFC as class_margins)"
            )
        return super().forward(cosine, labels, row_margins)

    def extra_repr(self) -> str:
        m = "per-class" if self.class_margins is not None else self.m
        return f"s={self.s}, m={m}"


class ArcFace(_PerClassMargin):
    """Additive angular margin: target logit ``s * cos(theta + m)`` (Deng et al. 2019).

    Args:
        s: scale applied to every logit.
        m: margin in radians, a float or a (C,) tensor of per-class margins (e.g. from
            `dynamic_margins`); each row uses the margin of its own class.
        boundary: what to do where theta + m > pi, i.e. cos(theta) <= cos(pi - m), where
            cos(theta + m) would start increasing again with theta:
            - ``"fallback"`` (default, as in the InsightFace reference): use the CosFace-like
              ``cos(theta) - m * sin(m)`` there.
            - ``"easy"`` ("easy margin"): apply the margin only where cos(theta) > 0 and
              leave the target logit at cos(theta) elsewhere.
            - ``"straight_through"``: the value is cos(min(theta + m, pi)), i.e. the exact
              ArcFace value, held at -1 past the boundary; the gradient of the target logit
              w.r.t. the cosine is that of the plain cosine (1 everywhere), as in a
              straight-through estimator. This keeps the target pushed towards its centre
              past the boundary and avoids the 1/sin(theta) gradient spike near theta = 0.
    """

    margin_rule = "ArcFace"

    def __init__(self, s: float = 64.0, m: float | torch.Tensor = 0.5, boundary: str = "fallback"):
        super().__init__(s, m)
        if boundary not in ARCFACE_BOUNDARIES:
            raise ValueError(f"boundary must be one of {ARCFACE_BOUNDARIES}, got {boundary!r}")
        self.boundary = boundary

    def margin_logit(self, target_cosine: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Unscaled target logit (N,) from target cosines (N,) and margins m (N,) or scalar: cos(theta + m),
        with the configured ``boundary`` behaviour past theta = pi - m.
        """
        cosine = target_cosine.clamp(-1.0, 1.0)
        # cos(theta + m) = cos*cos(m) - sin(theta)*sin(m); the floor keeps sqrt's gradient finite
        sine = torch.sqrt((1.0 - cosine * cosine).clamp_min(1e-12))
        with_margin = cosine * torch.cos(m) - sine * torch.sin(m)
        past_boundary = cosine <= torch.cos(math.pi - m)
        if self.boundary == "fallback":
            return torch.where(past_boundary, cosine - m * torch.sin(m), with_margin)
        if self.boundary == "easy":
            return torch.where(cosine > 0, with_margin, cosine)
        value = torch.where(past_boundary, torch.full_like(with_margin, -1.0), with_margin)
        return target_cosine + (value - target_cosine).detach()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, boundary={self.boundary!r}"


class CosFace(_PerClassMargin):
    """Additive cosine margin: target logit ``s * (cos(theta) - m)`` (Wang et al. 2018).

    ``m`` may be a float or a (C,) tensor of per-class margins.
    """

    margin_rule = "CosFace"

    def __init__(self, s: float = 64.0, m: float | torch.Tensor = 0.35):
        super().__init__(s, m)

    def margin_logit(self, target_cosine: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Unscaled target logit (N,) from target cosines (N,) and margins m (N,) or scalar: cos(theta) - m."""
        return target_cosine - m


class CombinedMargin(_TargetMargin):
    """InsightFace's combined margin: target logit ``s * (cos(m1 * theta + m2) - m3)``.

    ``CombinedMargin(s, 1, m, 0)`` is ArcFace and ``CombinedMargin(s, 1, 0, m)`` is CosFace
    while m1 * theta + m2 <= pi. Past pi the cosine is continued by the monotone piecewise
    function of Liu et al. (see `SphereFace`), so the target logit always decreases with
    theta (this differs from `ArcFace`'s default fallback in that region).

    Args: m1 > 0 (multiplicative angular), m2 >= 0 (additive angular, radians), m3 >= 0
    (additive cosine).
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2):
        super().__init__(s)
        check_combined_margins(m1, m2, m3)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def target_logit(self, target_cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Unscaled target logit (N,) from the target cosines (N,): cos(m1 * theta + m2) - m3,
        continued monotonically past pi.
        """
        angle = self.m1 * _safe_acos(target_cosine) + self.m2
        return _monotone_cos(angle) - self.m3

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"


class SphereFace(_TargetMargin):
    """Multiplicative angular margin on normalised features (Liu et al. 2017).

    Target logit ``s * psi(theta)`` with ``psi(theta) = (-1)^k cos(m theta) - 2k``,
    ``k = floor(m theta / pi)``: equal to cos(m theta) while m theta <= pi and strictly
    decreasing in theta on [0, pi]. Unlike the paper, features and weights are normalised
    and a fixed scale ``s`` replaces the feature norm.

    Args:
        s: scale; m: multiplicative margin (>= 1; the paper uses 4).
        blend: the paper's annealing weight lambda: the target logit becomes
            ``(blend * cos(theta) + psi(theta)) / (1 + blend)``; 0 (default) is pure psi.
            Lower it over training to ease SphereFace into its full margin.
    """

    def __init__(self, s: float = 64.0, m: float = 1.35, blend: float = 0.0):
        super().__init__(s)
        check_margin("SphereFace", m)
        if blend < 0:
            raise ValueError(f"blend must be >= 0, got {blend}")
        self.m, self.blend = float(m), float(blend)

    def target_logit(self, target_cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Unscaled target logit (N,) from the target cosines (N,): psi(theta) blended with cos(theta) by ``blend``."""
        psi = _monotone_cos(self.m * _safe_acos(target_cosine))
        return (self.blend * target_cosine + psi) / (1.0 + self.blend)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, blend={self.blend}"


class NormalizedSoftmax(_TargetMargin):
    """No margin, only a temperature: logits ``s * cosine`` (Zhai & Wu, "Classification is a
    Strong Baseline for Deep Metric Learning", 2019; s = 1 / temperature)."""

    def __init__(self, s: float = 20.0):
        super().__init__(s)

    def target_logit(self, target_cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Unscaled target logit (N,) from the target cosines (N,): the cosine itself (no margin)."""
        return target_cosine

    def extra_repr(self) -> str:
        return f"s={self.s}"
