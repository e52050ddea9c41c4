"""Fit a cost model to measured times: y ~= a + b n + c n^2, by least squares.

Chapter 02 times every step of cache-free generation and asks how much of the time per token is a
constant, how much grows with the context (the linear layers run over all n tokens) and how much
with its square (attention). `fit_quadratic` answers with the coefficients and how well they explain
the data (R^2). Columns are scaled before solving, so n in the thousands does not make the
least-squares problem ill-conditioned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuadraticFit:
    a: float     # constant
    b: float     # per unit of n
    c: float     # per unit of n^2
    r2: float    # coefficient of determination on the fitted points
    num_points: int

    def __call__(self, n):
        """The fitted curve at n (a number or an array)."""
        n = np.asarray(n, dtype=np.float64)
        return self.a + self.b * n + self.c * n * n

    def share_quadratic(self, n: float) -> float:
        """Fraction of the fitted value at n that the n^2 term contributes."""
        return float(self.c * n * n / self(n))


def fit_quadratic(n, y) -> QuadraticFit:
    """Least-squares a, b, c of y = a + b n + c n^2 over matching 1-D arrays `n` and `y`."""
    n = np.asarray(n, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if n.shape != y.shape:
        raise ValueError(f"n and y must have the same length, got {n.size} and {y.size}")
    if np.unique(n).size < 3:
        raise ValueError(f"n must hold at least 3 distinct values to fit 3 coefficients, "
                         f"got {np.unique(n).size}")
    if not (np.isfinite(n).all() and np.isfinite(y).all()):
        raise ValueError("n and y must be finite (no NaN or inf)")
    scale = float(np.abs(n).max())
    x = n / scale
    A = np.stack([np.ones_like(x), x, x * x], axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    a, b, c = coef[0], coef[1] / scale, coef[2] / scale ** 2
    resid = y - A @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return QuadraticFit(float(a), float(b), float(c), r2, int(n.size))
