"""Latent diffusability statistics that need only latents (and labels): per-channel
standardisation, VIV, SEC, LNC and the TwoNN intrinsic dimension.

Inputs are posterior means ``z`` of shape [N, C, H, W] (numpy or torch; computed in float64).
References: ``shared/reference/diffusability.md`` §2-3 (Zhong et al., arXiv 2606.03578; Facco et
al., Sci. Rep. 2017). Spatial structure (LDS / CDS / SRSS) and uniformity live in
``vfmbench.metrics.latent_spatial``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

EPS = 1e-12


def as_array(z: Any) -> np.ndarray:
    """A float64 numpy copy of a tensor or array."""
    if hasattr(z, "detach"):
        z = z.detach().cpu().double().numpy()
    return np.asarray(z, dtype=np.float64)


def standardise(z: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel standardisation over (N, H, W) with Bessel-corrected sigma: (z_std, mu, sigma).
    A channel of zero spread is only centred (sigma reported as 0)."""
    z = as_array(z)
    if z.ndim != 4:
        raise ValueError(f"latents must be [N, C, H, W], got shape {z.shape}")
    mu = z.mean(axis=(0, 2, 3))
    sigma = z.std(axis=(0, 2, 3), ddof=1) if z.shape[0] * z.shape[2] * z.shape[3] > 1 else np.zeros_like(mu)
    safe = np.where(sigma > EPS, sigma, 1.0)
    return (z - mu[None, :, None, None]) / safe[None, :, None, None], mu, sigma


# -- VIV ----------------------------------------------------------------------------------------


def _whitener(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [R, D] (centred): eigenvalues of the row covariance (R - 1 denominator, clamped at EPS)
    and the whitening map V diag(eig^-1/2) (what an SVD of the rows gives, rank-deficiency safe)."""
    cov = x.T @ x / max(x.shape[0] - 1, 1)
    eig, vec = np.linalg.eigh(cov)
    eig = np.clip(eig, EPS, None)
    return eig, vec / np.sqrt(eig)[None, :]


def kronecker_spectrum(zk: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Eigenvalues of the flip-flop Kronecker estimate Sigma_c (x) Sigma_s of one class's covariance.
    ``zk`` [n, C, S], centred. Returns [C * S] eigenvalues (before the total-variance rescaling)."""
    n, c, s = zk.shape
    w_s = np.eye(s)
    for _ in range(iterations):
        rows_c = np.matmul(zk, w_s).transpose(0, 2, 1).reshape(n * s, c)  # spatially whitened, one row per (image, position)
        eig_c, w_c = _whitener(rows_c)
        rows_s = np.matmul(w_c.T, zk).reshape(n * c, s)  # channel-whitened, one row per (image, channel)
        eig_s, w_s = _whitener(rows_s)
    return np.outer(eig_c, eig_s).reshape(-1)


def viv_per_class(z: Any, labels: Any, iterations: int = 5) -> dict[str, np.ndarray]:
    """Velocity Irreducible Variance per class, reported as the per-dimension MEAN convention:
    VIV_k = (pi / 2) * mean_i sqrt(lambda_i) with lambda the Kronecker spectrum rescaled to the
    class's total (biased) variance. Classes with fewer than 2 samples are skipped.
    Returns {'classes', 'viv', 'count'} (per-class arrays)."""
    z = as_array(z)
    y = np.asarray(labels).reshape(-1)
    n, c, h, w = z.shape
    flat = z.reshape(n, c, h * w)
    classes, vivs, counts = [], [], []
    for k in np.unique(y):
        zk = flat[y == k]
        if zk.shape[0] < 2:
            continue
        total = zk.reshape(zk.shape[0], -1).var(axis=0).sum()  # biased, summed over dimensions
        zk = zk - zk.mean(axis=0, keepdims=True)
        lam = kronecker_spectrum(zk, iterations)
        lam = lam * (total / max(lam.sum(), EPS))
        classes.append(int(k))
        vivs.append(0.5 * math.pi * np.sqrt(np.clip(lam, 0.0, None)).mean())
        counts.append(zk.shape[0])
    if not classes:
        raise ValueError("VIV needs at least one class with 2 or more latents")
    return {"classes": np.asarray(classes), "viv": np.asarray(vivs), "count": np.asarray(counts)}


def viv_closed_form(eigenvalues: Any) -> float:
    """(pi / 2) * mean sqrt(lambda): the integral over t in [0, 1] of the irreducible variance of a
    Gaussian class with covariance eigenvalues ``lambda``, per dimension."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    return float(0.5 * math.pi * np.sqrt(lam).mean())


# -- SEC ----------------------------------------------------------------------------------------


def dct_energy(z: Any) -> np.ndarray:
    """E[u, v] = mean over (n, c) of the squared orthonormal 2-D DCT-II coefficients per channel map."""
    from scipy.fft import dctn

    coeff = dctn(as_array(z), axes=(-2, -1), norm="ortho")
    return (coeff**2).mean(axis=(0, 1))


def sec(energy: np.ndarray, rho: float) -> float:
    """Share of spectral energy at Manhattan frequency u + v > rho * ((H - 1) + (W - 1))."""
    h, w = energy.shape
    d = np.add.outer(np.arange(h), np.arange(w))
    total = energy.sum()
    if total <= 0:
        raise ValueError("SEC of latents with no energy is undefined")
    return float(energy[d > rho * ((h - 1) + (w - 1))].sum() / total)


# -- LNC ----------------------------------------------------------------------------------------


def pool(z: Any, masks: Any = None) -> np.ndarray:
    """[N, C, H, W] -> [N, C]: the mean over the grid, or over each image's foreground cells when
    ``masks`` ([N, H, W] bool) is given (an image without foreground falls back to the whole grid)."""
    z = as_array(z)
    if masks is None:
        return z.mean(axis=(2, 3))
    m = np.asarray(masks, dtype=np.float64)
    empty = m.sum(axis=(1, 2)) == 0
    m[empty] = 1.0
    return np.einsum("nchw,nhw->nc", z, m) / m.sum(axis=(1, 2))[:, None]


def knn_indices(x: np.ndarray, k: int, metric: str = "cosine", block: int = 1024) -> np.ndarray:
    """Indices [N, k] of each row's k nearest other rows (self excluded), computed in row blocks."""
    n = x.shape[0]
    if k >= n:
        raise ValueError(f"{k} neighbours need more than {k} points, got {n}")
    if metric == "cosine":
        x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), EPS, None)
    sq = (x**2).sum(axis=1)
    out = np.empty((n, k), dtype=np.int64)
    for i in range(0, n, block):
        xb = x[i : i + block]
        if metric == "cosine":
            dist = -(xb @ x.T)
        else:
            dist = sq[i : i + block, None] + sq[None, :] - 2.0 * (xb @ x.T)
        rows = np.arange(xb.shape[0])
        dist[rows, i + rows] = np.inf
        part = np.argpartition(dist, k, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(dist, part, axis=1), axis=1, kind="stable")
        out[i : i + block] = np.take_along_axis(part, order, axis=1)
    return out


def lnc(pooled: Any, labels: Any, k: int = 10) -> float:
    """Latent neighbour consistency: the mean share of each sample's k nearest neighbours (cosine,
    dataset-mean-centred, self excluded) that share its label."""
    x = as_array(pooled)
    x = x - x.mean(axis=0, keepdims=True)
    y = np.asarray(labels).reshape(-1)
    nn = knn_indices(x, k, "cosine")
    return float((y[nn] == y[:, None]).mean())


# -- TwoNN ----------------------------------------------------------------------------------------


def two_nn_distances(x: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first and second nearest-neighbour Euclidean distances (self excluded)."""
    n = x.shape[0]
    sq = (x**2).sum(axis=1)
    r1, r2 = np.empty(n), np.empty(n)
    for i in range(0, n, block):
        xb = x[i : i + block]
        d2 = sq[i : i + block, None] + sq[None, :] - 2.0 * (xb @ x.T)
        rows = np.arange(xb.shape[0])
        d2[rows, i + rows] = np.inf
        two = np.partition(d2, 1, axis=1)[:, :2]
        r1[i : i + block], r2[i : i + block] = np.sqrt(np.clip(two[:, 0], 0, None)), np.sqrt(np.clip(two[:, 1], 0, None))
    return r1, r2


def twonn(x: Any, fraction: float = 0.9) -> dict[str, float]:
    """TwoNN intrinsic dimension (Facco et al. 2017): mu = r2 / r1; fit -log(1 - F(mu)) = d log(mu)
    through the origin on the smallest ``fraction`` of the mu (DADApy's default 0.9). Points with a
    duplicate (r1 = 0) are dropped. Returns {'id', 'points'}."""
    x = as_array(x).reshape(len(x), -1)
    r1, r2 = two_nn_distances(x)
    keep = r1 > EPS
    mu = np.sort(r2[keep] / r1[keep])
    n = mu.size
    if n < 3:
        raise ValueError("TwoNN needs at least 3 distinct points")
    m = max(int(np.floor(n * fraction)), 2)
    f = np.arange(1, n + 1) / n  # empirical CDF
    xs, ys = np.log(mu[:m]), -np.log(1.0 - f[:m])
    return {"id": float((xs * ys).sum() / max((xs * xs).sum(), EPS)), "points": float(n)}


class NotApplicable(ValueError):
    """A latent metric that does not apply to these inputs (no masks, a grid too small, a 1-D
    tokenizer): the stage skips its row and records why."""
