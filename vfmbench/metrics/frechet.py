"""Fréchet distance between Gaussians fitted to features (FID, sFID, FD-DINOv2, ...).

Stages: features -> ``gaussian_stats`` / ``StatsAccumulator`` (mu, sigma in float64) ->
``frechet_distance`` (a ``FrechetResult``). Nothing here knows about models or devices.

The distance is the one of the ADM evaluator and pytorch-fid:
``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with ``scipy.linalg.sqrtm``. When the
square root is not finite, or its diagonal has an imaginary part above 1e-3 (the same test as
those evaluators), the computation is repeated with ``eps * I`` added to *both* covariances,
``eps`` growing tenfold per try, and the result says so (``regularised``, ``eps``, ``note``). The
regularised value is the exact distance between the two regularised Gaussians (the traces include
the offset too), so it stays >= 0 up to rounding. The value is never NaN or complex. Identical
statistics give exactly 0 without a square root.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import warnings

import numpy as np
import scipy.linalg

# The imaginary-part tolerance of the ADM evaluator and pytorch-fid.
IMAG_ATOL = 1e-3
EPS_START = 1e-6
EPS_TRIES = 8  # 1e-6 ... 1e1


def as_float64_2d(features: Any) -> np.ndarray:
    """[N, D] features (a numpy array, a torch tensor on any device, or nested sequences) as a float64 array."""
    if hasattr(features, "detach"):  # torch tensor
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, D], got shape {x.shape}")
    return x


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (N - 1 normalisation, like ``np.cov(rowvar=False)``) of [N, D] features, in float64."""
    x = as_float64_2d(features)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


class StatsAccumulator:
    """Streaming mean and covariance of feature batches, independent of how the data is batched.

    Sums are kept in float64 about a fixed shift (the first vector seen), which avoids the
    cancellation of ``E[xx^T] - mu mu^T`` when features have a large mean. ``merge`` combines the
    accumulators of several processes (DDP: gather ``state()`` dicts, rebuild with ``from_state``
    and merge); the order of merging does not change the result beyond rounding.
    """

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.dim = dim
        self.shift: np.ndarray | None = None
        self.sum: np.ndarray | None = None  # sum of (x - shift)
        self.outer: np.ndarray | None = None  # sum of (x - shift)(x - shift)^T

    def _init(self, dim: int, shift: np.ndarray) -> None:
        if self.dim is not None and self.dim != dim:
            raise ValueError(f"feature dimension {dim} does not match the accumulator's {self.dim}")
        self.dim = dim
        self.shift = shift.copy()
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, batch: Any) -> "StatsAccumulator":
        x = as_float64_2d(batch)
        if x.shape[0] == 0:
            return self
        if self.shift is None:
            self._init(x.shape[1], x[0])
        elif x.shape[1] != self.dim:
            raise ValueError(f"feature dimension {x.shape[1]} does not match the accumulator's {self.dim}")
        c = x - self.shift
        self.n += x.shape[0]
        self.sum += c.sum(axis=0)
        self.outer += c.T @ c
        return self

    def merge(self, other: "StatsAccumulator") -> "StatsAccumulator":
        """Add ``other``'s samples into this accumulator (in place) and return it."""
        if other.n == 0:
            return self
        if self.shift is None:
            self._init(other.dim, other.shift)
        elif other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of dimension {self.dim} and {other.dim}")
        # re-centre other's sums on this shift: x - s1 = (x - s2) + d with d = s2 - s1
        d = other.shift - self.shift
        self.outer += other.outer + np.outer(d, other.sum) + np.outer(other.sum, d) + other.n * np.outer(d, d)
        self.sum += other.sum + other.n * d
        self.n += other.n
        return self

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of everything seen, sigma with the N - 1 normalisation."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mean_c = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mean_c, mean_c)) / (self.n - 1)
        sigma = (sigma + sigma.T) / 2  # exact symmetry despite rounding
        return self.shift + mean_c, sigma

    def state(self) -> dict[str, Any]:
        """Plain arrays for ``all_gather_object`` / saving."""
        return {"n": self.n, "dim": self.dim, "shift": self.shift, "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "StatsAccumulator":
        acc = cls(state["dim"])
        acc.n = int(state["n"])
        if state["shift"] is not None:
            acc.shift = np.asarray(state["shift"], dtype=np.float64)
            acc.sum = np.asarray(state["sum"], dtype=np.float64)
            acc.outer = np.asarray(state["outer"], dtype=np.float64)
        return acc


@dataclass(frozen=True)
class FrechetResult:
    """The distance, and whether the covariances had to be regularised to get a real square root."""

    value: float
    regularised: bool = False
    eps: float = 0.0
    note: str = ""

    def __float__(self) -> float:
        return self.value


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # scipy warns on (near-)singular products; the result is checked below and the note reports it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(m)


def _sqrtm_ok(covmean: np.ndarray) -> tuple[bool, str]:
    if not np.isfinite(covmean).all():
        return False, "sqrtm(S1 S2) is not finite"
    if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
        m = float(np.max(np.abs(np.diagonal(covmean).imag)))
        return False, f"sqrtm(S1 S2) has an imaginary diagonal component up to {m:.3g}"
    return True, ""


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"statistics {which}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"statistics {which} contain NaN or inf: the features they were computed from are broken")
    return mu, sigma


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = EPS_START) -> FrechetResult:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring)."""
    mu1, sigma1 = _check_stats(mu1, sigma1, "1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    if np.array_equal(mu1, mu2) and np.array_equal(sigma1, sigma2):
        # exactly 0; sqrtm of the square of a singular covariance is slow and only approximately S
        return FrechetResult(0.0, note="identical statistics")
    diff = mu1 - mu2
    d = mu1.shape[0]
    covmean = _sqrtm(sigma1 @ sigma2)
    ok, why = _sqrtm_ok(covmean)
    used_eps, note = 0.0, ""
    if not ok:
        eye = np.eye(d)
        cur = eps
        for _ in range(EPS_TRIES):
            sigma1_r, sigma2_r = sigma1 + cur * eye, sigma2 + cur * eye
            covmean = _sqrtm(sigma1_r @ sigma2_r)
            ok2, _ = _sqrtm_ok(covmean)
            if ok2:
                sigma1, sigma2, used_eps = sigma1_r, sigma2_r, cur
                note = f"{why}; added {cur:g} * I to both covariances"
                break
            cur *= 10
        else:
            # Last resort that is always real: the eigenvalues of S1 S2 of two PSD matrices are
            # real and >= 0, so tr(sqrtm(S1 S2)) = sum(sqrt(eigvals)); clip rounding negatives.
            ev = np.linalg.eigvals(sigma1 @ sigma2).real
            tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
            value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
            return FrechetResult(value, True, 0.0, f"{why}; regularisation up to {cur / 10:g} failed; used sum(sqrt(eigvals(S1 S2)))")
    tr_covmean = float(np.trace(covmean).real)
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    return FrechetResult(value, used_eps > 0, used_eps, note)
