"""Improved precision and recall (Kynkäänniemi et al. 2019), as the ADM evaluator computes them.

Each set of features spans a "manifold": the union of balls centred on its vectors, each ball's
radius being the distance to the vector's k-th nearest neighbour in the same set (k = 3; the
vector itself is its 0-th neighbour, so duplicates give radius 0). Then

* precision = share of *sample* vectors inside the reference manifold;
* recall    = share of *reference* vectors inside the sample manifold;

"inside" meaning within (<=) the radius of at least one ball. Distances are Euclidean, computed in
float64 blocks so that 50k x 50k sets fit in memory. Stages: ``manifold_radii`` is the statistics
stage (it needs only one set), ``manifold_coverage`` the value stage.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .frechet import as_float64_2d

NEIGHBOURHOOD = 3
ROW_BLOCK = 1024
COL_BLOCK = 8192


def _sq_dists(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d = a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0)


def manifold_radii(features: Any, k: int = NEIGHBOURHOOD) -> np.ndarray:
    """Distance of every vector to its k-th nearest neighbour within the set (self = 0-th)."""
    x = as_float64_2d(features)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"a k-NN manifold with k={k} needs more than {k} vectors, got {n}")
    sq = (x * x).sum(axis=1)
    radii = np.empty(n)
    for r0 in range(0, n, ROW_BLOCK):
        rows = x[r0 : r0 + ROW_BLOCK]
        best = None  # the k+1 smallest squared distances seen so far, per row
        for c0 in range(0, n, COL_BLOCK):
            d = _sq_dists(rows, x[c0 : c0 + COL_BLOCK], sq[r0 : r0 + ROW_BLOCK], sq[c0 : c0 + COL_BLOCK])
            # the self-distance is exactly 0 (rounding of the norm expansion can make it 1e-16)
            i = np.arange(max(0, c0 - r0), min(rows.shape[0], c0 + d.shape[1] - r0))
            d[i, r0 + i - c0] = 0.0
            cand = d if best is None else np.concatenate([best, d], axis=1)
            kk = min(k + 1, cand.shape[1])
            best = np.partition(cand, kk - 1, axis=1)[:, :kk]
        radii[r0 : r0 + rows.shape[0]] = np.sqrt(np.sort(best, axis=1)[:, k])
    return radii


def manifold_coverage(queries: Any, features: Any, radii: np.ndarray) -> float:
    """Share of ``queries`` inside the manifold of (``features``, ``radii``)."""
    q, x = as_float64_2d(queries), as_float64_2d(features)
    r2 = np.asarray(radii, dtype=np.float64) ** 2
    if x.shape[0] != r2.shape[0] or q.shape[1] != x.shape[1]:
        raise ValueError(f"shapes do not match: queries {q.shape}, features {x.shape}, radii {r2.shape}")
    q_sq, x_sq = (q * q).sum(axis=1), (x * x).sum(axis=1)
    inside = np.zeros(q.shape[0], dtype=bool)
    for r0 in range(0, q.shape[0], ROW_BLOCK):
        for c0 in range(0, x.shape[0], COL_BLOCK):
            d = _sq_dists(q[r0 : r0 + ROW_BLOCK], x[c0 : c0 + COL_BLOCK], q_sq[r0 : r0 + ROW_BLOCK], x_sq[c0 : c0 + COL_BLOCK])
            inside[r0 : r0 + ROW_BLOCK] |= (d <= r2[None, c0 : c0 + COL_BLOCK]).any(axis=1)
    return float(inside.mean())


def precision_recall(reference: Any, samples: Any, k: int = NEIGHBOURHOOD) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``reference`` with k-NN manifolds."""
    ref, smp = as_float64_2d(reference), as_float64_2d(samples)
    precision = manifold_coverage(smp, ref, manifold_radii(ref, k))
    recall = manifold_coverage(ref, smp, manifold_radii(smp, k))
    return precision, recall
