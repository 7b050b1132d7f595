"""Fréchet distance and Gaussian statistics against closed forms and independent implementations."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from vfmbench.metrics import frechet
from vfmbench.metrics.frechet import FrechetResult, StatsAccumulator, frechet_distance, gaussian_stats


def _independent_fd(mu1, s1, mu2, s2):
    """FD through symmetric eigendecompositions: tr sqrt(S1 S2) = tr sqrt(A S2 A), A = S1^(1/2)."""
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(a @ s2 @ a)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def _random_stats(rng, d, n=400, shift=0.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + shift
    return x, x.mean(0), np.cov(x, rowvar=False)


def test_gaussian_stats_matches_numpy_in_float64():
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = gaussian_stats(torch.from_numpy(x))
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-13)
    with pytest.raises(ValueError):
        gaussian_stats(x[:1])


def test_accumulator_is_independent_of_batch_size():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)) * 3 + 5
    ref_mu, ref_sigma = x.mean(0), np.cov(x, rowvar=False)
    results = []
    for bs in (1, 7, 64):
        acc = StatsAccumulator()
        for s in range(0, len(x), bs):
            acc.update(x[s : s + bs])
        results.append(acc.finalize())
    for mu, sigma in results:
        np.testing.assert_allclose(mu, ref_mu, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-12, atol=1e-12)
        assert np.array_equal(sigma, sigma.T)
    _, y_mu, y_sigma = _random_stats(rng, 16)
    fids = [frechet_distance(mu, sigma, y_mu, y_sigma).value for mu, sigma in results]
    assert max(fids) - min(fids) <= 1e-10 * abs(fids[0])


def test_accumulator_large_mean_and_merge():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8)) + 1e4  # large offset: naive E[xx'] - mu mu' loses ~8 digits
    parts = [StatsAccumulator().update(x[:100]), StatsAccumulator().update(x[100:130]), StatsAccumulator().update(x[130:])]
    merged = StatsAccumulator()
    for p in parts:
        merged.merge(StatsAccumulator.from_state(p.state()))
    mu, sigma = merged.finalize()
    assert merged.n == 300
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-11)
    # merging in another order gives the same statistics
    other = StatsAccumulator().merge(parts[2]).merge(parts[0]).merge(parts[1])
    np.testing.assert_allclose(other.finalize()[1], sigma, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        StatsAccumulator().update(x[:3]).update(x[:3, :4])


def test_fid_matches_independent_implementations():
    rng = np.random.default_rng(3)
    _, mu1, s1 = _random_stats(rng, 32)
    _, mu2, s2 = _random_stats(rng, 32, shift=0.3)
    res = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(res, FrechetResult) and isinstance(res.value, float) and not res.regularised
    ref = _independent_fd(mu1, s1, mu2, s2)
    assert abs(res.value - ref) <= 1e-6 * abs(ref)
    # torch-fidelity's own statistics-to-FID (eigenvalues of S1 S2)
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert abs(res.value - tf["frechet_inception_distance"]) <= 1e-6 * abs(ref)
    assert abs(frechet_distance(mu2, s2, mu1, s1).value - res.value) <= 1e-9 * abs(ref)
    same = frechet_distance(mu1, s1, mu1.copy(), s1.copy())
    assert same.value == 0.0 and same.note == "identical statistics"
    # the shortcut agrees with the square-root path on statistics that differ only by rounding
    assert abs(frechet_distance(mu1, s1, mu1, s1 * (1 + 1e-15)).value) < 1e-9 * np.trace(s1)


def test_fid_closed_form_commuting_covariances():
    rng = np.random.default_rng(4)
    d = 12
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    diag = frechet_distance(mu1, np.diag(a), mu2, np.diag(b)).value
    assert abs(diag - expected) <= 1e-10 * expected
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # same eigenvectors: still commuting
    rotated = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T).value
    assert abs(rotated - expected) <= 1e-8 * expected


def test_regularisation_when_sqrtm_is_complex(monkeypatch):
    rng = np.random.default_rng(5)
    _, mu1, s1 = _random_stats(rng, 6)
    _, mu2, s2 = _random_stats(rng, 6)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def flaky(m):  # first call: a large imaginary diagonal, as broken BLAS builds produce
        calls.append(m.copy())
        out = real_sqrtm(m)
        return out + 0.5j * np.eye(len(m)) if len(calls) == 1 else out

    monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", flaky)
    res = frechet_distance(mu1, s1, mu2, s2)
    assert res.regularised and res.eps == 1e-6 and "imaginary" in res.note and len(calls) == 2
    eye = np.eye(6) * 1e-6
    assert abs(res.value - _independent_fd(mu1, s1 + eye, mu2, s2 + eye)) <= 1e-8 * abs(res.value)
    assert isinstance(res.value, float)


def test_eps_grows_and_last_resort_is_real(monkeypatch):
    rng = np.random.default_rng(6)
    _, mu1, s1 = _random_stats(rng, 5)
    _, mu2, s2 = _random_stats(rng, 5)
    real_sqrtm = scipy.linalg.sqrtm
    seen = []

    def nan_until_third(m):
        seen.append(m)
        return np.full_like(m, np.nan) if len(seen) < 3 else real_sqrtm(m)

    monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", nan_until_third)
    res = frechet_distance(mu1, s1, mu2, s2)
    assert res.regularised and res.eps == pytest.approx(1e-5) and "not finite" in res.note

    monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", lambda m: np.full_like(m, np.nan))
    res = frechet_distance(mu1, s1, mu2, s2)
    assert res.regularised and np.isfinite(res.value) and "eigvals" in res.note
    assert abs(res.value - _independent_fd(mu1, s1, mu2, s2)) <= 1e-8 * abs(res.value)


def test_invalid_statistics_raise():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        frechet_distance(mu, s * np.nan, mu, s)
