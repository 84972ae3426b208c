"""Value rules the library enforces, kept torch-free so the config checks the same ones at load.

The margin heads (`dml.losses.margins`) and the metrics (`dml.eval.metrics`,
`dml.eval.verification`) raise with these functions at run time; `dml.config` calls them
when a config is validated, so a value refused later is refused first, with the key named.
Each function raises ValueError with one line saying the rule and the value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Margin class (as registered in `dml.registries.MARGINS`) -> the closed range of its margin m.
MARGIN_RANGES: dict[str, tuple[float, float]] = {
    "ArcFace": (0.0, math.pi - 1e-6),  # radians; theta + m must stay below pi somewhere
    "CosFace": (0.0, 2.0),  # cosine units: cos(theta) - m spans [-3, 1]
    "SphereFace": (1.0, math.inf),  # multiplicative: m theta, m = 1 is plain softmax
}


def margin_range_error(name: str, m: object) -> ValueError:
    """The error for a margin ``m`` (a number or a description of a tensor) outside ``name``'s range."""
    low, high = MARGIN_RANGES[name]
    if math.isinf(high):
        return ValueError(f"margin must be >= {low}, got {m}")
    return ValueError(f"margin must be in [{low}, {high:.4f}], got {m}")


def check_margin(name: str, m: float) -> None:
    """Raises ValueError unless ``m`` lies in ``MARGIN_RANGES[name]`` (ends included; NaN refused)."""
    low, high = MARGIN_RANGES[name]
    if not low <= float(m) <= high:
        raise margin_range_error(name, m)


def check_scale(s: float) -> None:
    """Raises ValueError unless the logit scale ``s`` is > 0."""
    if not s > 0:
        raise ValueError(f"scale s must be > 0, got {s}")


def check_combined_margins(m1: float, m2: float, m3: float) -> None:
    """Raises ValueError unless m1 > 0, m2 >= 0 and m3 >= 0 (`CombinedMargin`)."""
    if not (m1 > 0 and m2 >= 0 and m3 >= 0):
        raise ValueError(f"need m1 > 0, m2 >= 0, m3 >= 0, got m1={m1}, m2={m2}, m3={m3}")


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """The distinct ``ks`` (recall@k, MAP@k) in order; raises ValueError unless there is at
    least one and every one is >= 1."""
    unique = tuple(dict.fromkeys(int(k) for k in ks))
    if not unique or min(unique) < 1:
        raise ValueError(f"ks must be positive integers, got {unique}")
    return unique


def check_fars(fars: Sequence[float]) -> None:
    """Raises ValueError unless every false accept rate lies in (0, 1] (an empty list is allowed)."""
    bad = [far for far in fars if not 0 < far <= 1]
    if bad:
        raise ValueError(f"a false accept rate (FAR) must be in (0, 1], got {bad[0]}")
