"""Fréchet distance and Gaussian statistics against closed forms and independent implementations."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from vfmbench.metrics import frechet
from vfmbench.metrics.frechet import FrechetResult, StatsAccumulator, frechet_distance, gaussian_stats


def _independent_fd(mu1, s1, mu2, s2):
    """FD as the ADM evaluator and pytorch-fid compute it: a general matrix square root (scipy)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


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
    assert isinstance(res, FrechetResult) and isinstance(res.value, float)
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


def test_low_rank_route_is_exact_for_fewer_vectors_than_dimensions():
    """N <= D: the covariance is singular; the N x N eigenproblem gives the same trace as the
    D x D one and as torch-fidelity's eigenvalues of S1 S2."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(7)
    d = 64
    x = rng.normal(size=(40, d)) @ rng.normal(size=(d, d)) / 8
    y = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) / 8 + 0.2
    (mx, sx), (my, sy) = gaussian_stats(x), gaussian_stats(y)
    fx = frechet.low_rank_factor(x)
    assert fx.shape == (39, d) and frechet.low_rank_factor(y) is None  # rank N - 1 (centred)
    np.testing.assert_allclose(fx.T @ fx, sx, rtol=1e-10, atol=1e-12)
    full = frechet_distance(mx, sx, my, sy)
    low = frechet_distance(mx, sx, my, sy, factor1=fx)
    swapped = frechet_distance(my, sy, mx, sx, factor2=fx)
    assert "low-rank (39 x 39" in low.note and full.note == ""
    # the D x D route takes square roots of rounding-level eigenvalues of the singular covariance
    # (errors ~ sqrt(machine eps) relative); the N x N route has none
    assert abs(low.value - full.value) <= 1e-7 * full.value and abs(swapped.value - low.value) <= 1e-12 * full.value
    tf = fid_statistics_to_metric({"mu": mx, "sigma": sx}, {"mu": my, "sigma": sy}, verbose=False)["frechet_inception_distance"]
    assert abs(low.value - tf) <= 1e-6 * full.value
    # both sides low rank: the nuclear norm of F1 F2^T
    fy = frechet.low_rank_factor(y[:50])
    my2, sy2 = gaussian_stats(y[:50])
    both = frechet_distance(mx, sx, my2, sy2, factor1=fx, factor2=fy)
    assert "39 x 49 singular values" in both.note
    assert abs(both.value - frechet_distance(mx, sx, my2, sy2).value) <= 1e-7 * both.value
    with pytest.raises(ValueError, match="factor1"):
        frechet_distance(mx, sx, my, sy, factor1=fx[:, :5])


def test_trace_term_is_real_where_sqrtm_is_ill_conditioned():
    """Rank-deficient covariances (scipy's sqrtm warns and may return complex parts): the
    eigenvalue route stays real and matches a closed form (commuting diagonal covariances)."""
    a = np.r_[np.linspace(0.5, 2.0, 5), np.zeros(5)]
    b = np.r_[np.zeros(3), np.linspace(1.0, 3.0, 7)]
    mu = np.zeros(10)
    res = frechet_distance(mu, np.diag(a), mu + 1, np.diag(b))
    expected = 10.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert isinstance(res.value, float) and abs(res.value - expected) <= 1e-12 * expected


def test_invalid_statistics_raise():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        frechet_distance(mu, s * np.nan, mu, s)


def _scaled_pair(n, d, scale, seed=11):
    """x and y = scale * x: FD = ||(1 - scale) mu||^2 + (1 - scale)^2 tr(S) in closed form."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 2.0, size=d) + 0.3
    mu, s = gaussian_stats(x)
    return x, scale * x, float(((1 - scale) * mu) @ ((1 - scale) * mu) + (1 - scale) ** 2 * np.trace(s))


def _accumulate(x, batch):
    acc = StatsAccumulator()
    for i in range(0, len(x), batch):
        acc.update(x[i : i + batch])
    return acc


def test_accumulator_inputs_take_the_low_rank_route():
    """N <= D from a StatsAccumulator: the N x N route (the accumulator keeps its vectors while N <= D).
    Near-identical small sets: the closed form to 1e-9 relative; the D x D route misses by ~1e-3."""
    from vfmbench_plugins.metrics.standard import frechet_value, gaussian_stage

    x, y, exact = _scaled_pair(60, 512, 1.01)
    ax, ay = _accumulate(x, 7), _accumulate(y, 25)
    sx, sy = gaussian_stage(ax), gaussian_stage(ay)
    assert sx["factor"].shape == (59, 512) and sy["factor"].shape == (59, 512)
    assert frechet_value(sx, sy) == pytest.approx(exact, rel=1e-9)
    res = frechet_distance(sx["mu"], sx["sigma"], sy["mu"], sy["sigma"], sx["factor"], sy["factor"])
    assert "low-rank" in res.note
    square = frechet_distance(sx["mu"], sx["sigma"], sy["mu"], sy["sigma"])  # the D x D route, for contrast
    assert abs(square.value - exact) > 1e-5 * exact
    # the same as from the raw features
    assert frechet_value(gaussian_stage(x), gaussian_stage(y)) == pytest.approx(exact, rel=1e-9)
    # one low-rank side against a full-rank one: against scipy's sqrtm on well-conditioned sigma2
    rng = np.random.default_rng(12)
    z = rng.normal(size=(2000, 512)) * 1.1 + 0.3
    sz = gaussian_stage(_accumulate(z, 300))
    assert "factor" not in sz
    one = frechet_value(sx, sz)
    # scipy's sqrtm of the singular S1 S2 loses ~3e-8 relative here; an independent square-root-free
    # route (singular values of F L, L the Cholesky factor of S2) agrees to rounding
    assert one == pytest.approx(_independent_fd(sx["mu"], sx["sigma"], sz["mu"], sz["sigma"]), rel=1e-7)
    d = sx["mu"] - sz["mu"]
    chol = np.linalg.svd(frechet.low_rank_factor(x) @ np.linalg.cholesky(sz["sigma"]), compute_uv=False).sum()
    assert one == pytest.approx(float(d @ d + np.trace(sx["sigma"]) + np.trace(sz["sigma"]) - 2 * chol), rel=1e-11)


def test_shifted_copy_closed_form_through_accumulators():
    """y = x + c: equal covariances, FD = ||c||^2 exactly, through both low-rank factors."""
    from vfmbench_plugins.metrics.standard import frechet_value, gaussian_stage

    rng = np.random.default_rng(13)
    x = rng.normal(size=(30, 256))
    c = 1e-3 * rng.normal(size=256)
    value = frechet_value(gaussian_stage(_accumulate(x, 8)), gaussian_stage(_accumulate(x + c, 30)))
    assert value == pytest.approx(float(c @ c), rel=1e-7)


def test_accumulator_keeps_vectors_only_while_they_fit():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(20, 16)) + 4.0
    acc = _accumulate(x[:10], 3)
    np.testing.assert_allclose(acc.low_rank_factor().T @ acc.low_rank_factor(), np.cov(x[:10], rowvar=False), atol=1e-12)
    # merged from per-rank states (DDP) in any order: the same factor product
    parts = [StatsAccumulator.from_state(_accumulate(x[a:b], 4).state()) for a, b in ((0, 5), (5, 12), (12, 16))]
    merged = StatsAccumulator().merge(parts[1]).merge(parts[0]).merge(parts[2])
    f = merged.low_rank_factor()
    np.testing.assert_allclose(f.T @ f, np.cov(x[:16], rowvar=False), atol=1e-12)
    merged.update(x[16:17])  # 17 vectors > 16 dimensions: the vectors are dropped, the sums stay
    assert merged.rows is None and merged.low_rank_factor() is None and merged.n == 17
    np.testing.assert_allclose(merged.finalize()[1], np.cov(x[:17], rowvar=False), atol=1e-12)
    assert StatsAccumulator().merge(merged).rows is None
    old = merged.state()
    old.pop("rows")  # a state saved before the vectors were kept
    assert StatsAccumulator.from_state(old).low_rank_factor() is None
