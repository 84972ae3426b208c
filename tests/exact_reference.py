"""Exact inner products for test references: integer arithmetic, no BLAS, no float sums.

A float32 value times 2**149 is an integer (149 = the exponent of float32's smallest
subnormal), so the inner product of two float32 rows times 2**298 is an exact integer sum.
Dividing that Python integer by 2**298 rounds once, correctly, to float64. The result is the
same bits on every machine, and identical rows always score identically: a reference that
decides ties must not be a BLAS product, whose rounding for two identical rows can differ
with their position and the CPU's kernel.
"""

from __future__ import annotations

import numpy as np

SCALE_BITS = 149


def _exact_integers(rows: np.ndarray) -> np.ndarray:
    """float32 (N, D) -> object array of Python ints equal to rows x 2**149 exactly."""
    scaled = np.asarray(rows, np.float32).astype(np.float64) * 2.0**SCALE_BITS  # exact: a power of two
    return np.array([[int(value) for value in row] for row in scaled.tolist()], dtype=object).reshape(scaled.shape)


def exact_inner_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correctly rounded float64 ``a @ b.T`` for float32 rows a (Na, D), b (Nb, D)."""
    products = _exact_integers(a) @ _exact_integers(b).T  # Python ints: no rounding at all
    divisor = 2 ** (2 * SCALE_BITS)
    return np.array([[value / divisor for value in row] for row in products.tolist()], np.float64).reshape(
        len(a), len(b)
    )


def exact_order(scores: np.ndarray) -> np.ndarray:
    """Column order of each row by (score descending, column index ascending)."""
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((ids, -scores), axis=-1)
