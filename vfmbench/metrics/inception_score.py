"""Inception Score with torch-fidelity's ISC convention.

Convention (torch-fidelity 0.4 ``isc_features_to_metric``, the one VFM-VAE's rIS uses):

* the input is Inception's ``logits_unbiased`` (the 1008-way fc *without* its bias; the ADM
  evaluator's softmax graph is the same matmul without bias), turned into p(y|x) with a softmax in
  float64;
* the samples are shuffled with ``np.random.RandomState(seed).permutation`` (seed 2020) and cut into
  ``splits`` chunks ``[i*N//splits, (i+1)*N//splits)``;
* per chunk, ``IS_i = exp(mean_x KL(p(y|x) || p_chunk(y)))`` with ``p_chunk(y)`` the chunk's mean of
  p(y|x);
* the result is ``(mean_i IS_i, std_i IS_i)`` with the population std (ddof 0).

The ADM evaluator instead uses consecutive chunks of 5000 without shuffling; for 50 000 samples
``inception_score(x, splits=10, shuffle=False)`` reproduces its chunking (it reports only the mean).
"""
from __future__ import annotations

from typing import Any

import numpy as np

ISC_SEED = 2020
# metrics.isc_split_order -> how the samples are cut into splits (recorded in each IS row's protocol)
SPLIT_ORDERS = {
    "shuffled": f"shuffled (RandomState({ISC_SEED}).permutation), contiguous chunks",  # torch-fidelity, VFM-VAE's rIS
    "consecutive": "consecutive chunks, not shuffled",  # the ADM evaluator (chunks of 5000: 10 splits of 50k)
}


def _as_float64_2d(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected [N, num_classes] logits or probabilities, got shape {x.shape}")
    return x


def inception_score(
    logits_or_probs: Any, splits: int = 10, *, probs: bool = False, shuffle: bool = True, seed: int = ISC_SEED
) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` chunks; ``probs=True`` if the rows are p(y|x) already."""
    x = _as_float64_2d(logits_or_probs)
    n = x.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"inception_score needs at least one sample per split: {n} samples, {splits} splits")
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    if probs:
        if (x < 0).any() or not np.allclose(x.sum(axis=1), 1.0, atol=1e-6):
            raise ValueError("probs=True but the rows are not probability vectors (non-negative, summing to 1)")
        p = x
        with np.errstate(divide="ignore"):
            log_p = np.log(x)
    else:
        shifted = x - x.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        pc, lpc = p[lo:hi], log_p[lo:hi]
        log_q = np.log(pc.mean(axis=0, keepdims=True))
        # 0 * log 0 = 0: classes with p(y|x) = 0 contribute nothing
        with np.errstate(invalid="ignore"):
            kl = np.where(pc > 0, pc * (lpc - log_q), 0.0).sum(axis=1).mean()
        scores.append(float(np.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))
