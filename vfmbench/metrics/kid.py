"""Kernel Inception Distance (Bińkowski et al. 2018) with torch-fidelity's conventions.

KID is the unbiased estimate of the squared MMD with the polynomial kernel
``k(x, y) = (gamma * x.y + coef0) ** degree`` (degree 3, gamma 1/D, coef0 1), averaged over
``subsets`` random subsets of ``subset_size`` vectors drawn without replacement from each set
(``np.random.RandomState(seed)``, one ``choice`` for set 1 then one for set 2 per subset, as
torch-fidelity does). Returns (mean, std) over subsets, std with ddof 0.

For one subset of m vectors X and Y:
``MMD_u^2 = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UserError
from .frechet import as_float64_2d

KID_SEED = 2020


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> np.ndarray:
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * g + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> float:
    """Unbiased squared MMD between two equal-size samples under the polynomial kernel."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"mmd2_unbiased needs two samples of the same size >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx = polynomial_kernel(x, x, degree, gamma, coef0)
    kyy = polynomial_kernel(y, y, degree, gamma, coef0)
    kxy = polynomial_kernel(x, y, degree, gamma, coef0)
    off_xx = kxx.sum() - np.trace(kxx)
    off_yy = kyy.sum() - np.trace(kyy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kernel_inception_distance(
    features_1: Any,
    features_2: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = KID_SEED,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over random subsets (see the module docstring)."""
    f1, f2 = as_float64_2d(features_1), as_float64_2d(features_2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} and {f2.shape[1]}")
    n1, n2 = f1.shape[0], f2.shape[0]
    if subset_size < 2 or n1 < subset_size or n2 < subset_size:
        raise UserError(
            f"KID subset size {subset_size} needs at least that many images in both sets (got {n1} and {n2}); "
            "lower the KID subset size or evaluate more images"
        )
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        a = f1[rng.choice(n1, subset_size, replace=False)]
        b = f2[rng.choice(n2, subset_size, replace=False)]
        mmds[i] = mmd2_unbiased(a, b, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std())
