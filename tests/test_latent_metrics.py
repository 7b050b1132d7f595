"""Latent diffusability metrics against closed forms and independent computations (issue 16)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.ndimage import gaussian_filter
from scipy.stats import ortho_group

from vfmbench.metrics.latent import dct_energy, lnc, pool, sec, standardise, twonn, viv_closed_form, viv_per_class
from vfmbench.metrics.latent_model import equivariance_errors, interpolation_partners, slerp, transforms
from vfmbench.metrics.latent_spatial import density_stats, mask_cells, spatial_structure, srss, uniformity


def _kron_class(rng, n, eig_c, eig_s, shift=0.0):
    """n samples [n, C, S] with covariance (Q_c diag(eig_c) Q_c^T) (x) (Q_s diag(eig_s) Q_s^T)."""
    c, s = len(eig_c), len(eig_s)
    a_c = ortho_group.rvs(c, random_state=rng) * np.sqrt(eig_c)[None, :]
    a_s = ortho_group.rvs(s, random_state=rng) * np.sqrt(eig_s)[None, :]
    g = rng.standard_normal((n, c, s))
    return shift + np.einsum("ij,njk,lk->nil", a_c, g, a_s)


def _gaussian_classes(seed=0, n=3000):
    rng = np.random.default_rng(seed)
    eigs = [(np.array([4.0, 1.0, 0.25, 0.5]), np.linspace(0.2, 2.0, 16)), (np.array([1.0, 2.0, 3.0, 0.1]), np.linspace(1.0, 3.0, 16))]
    zs, ys, expected = [], [], []
    for k, (ec, es) in enumerate(eigs):
        zs.append(_kron_class(rng, n, ec, es, shift=3.0 * k))
        ys.append(np.full(n, k))
        expected.append(viv_closed_form(np.outer(ec, es)))
    z = np.concatenate(zs).reshape(-1, 4, 4, 4)
    return z, np.concatenate(ys), float(np.mean(expected))


def test_viv_closed_form_is_the_integral_of_the_irreducible_variance():
    lam = np.array([0.3, 1.0, 2.5, 7.0])
    per_t = lambda t: (lam / ((1 - t) ** 2 + t**2 * lam)).sum()  # noqa: E731
    assert integrate.quad(per_t, 0, 1)[0] / lam.size == pytest.approx(viv_closed_form(lam), rel=1e-8)


def test_viv_matches_closed_form_on_kronecker_gaussian_classes():
    z, y, expected = _gaussian_classes()
    out = viv_per_class(z, y)
    assert list(out["classes"]) == [0, 1]
    assert out["viv"].mean() == pytest.approx(expected, rel=0.02)
    # the sum convention would be d times larger: the reported value is the per-dimension mean
    assert out["viv"].mean() < expected * 2


def test_viv_scales_linearly_without_standardisation_and_not_with_it():
    z, y, _ = _gaussian_classes(seed=1, n=400)
    base = viv_per_class(z, y)["viv"].mean()
    assert viv_per_class(3.0 * z, y)["viv"].mean() == pytest.approx(3.0 * base, rel=1e-9)
    zs, mu, sigma = standardise(z)
    z3s, _, sigma3 = standardise(3.0 * z)
    assert sigma3 == pytest.approx(3.0 * sigma)
    assert viv_per_class(z3s, y)["viv"].mean() == pytest.approx(viv_per_class(zs, y)["viv"].mean(), rel=1e-9)


def test_viv_skips_singleton_classes():
    z, y, _ = _gaussian_classes(seed=2, n=50)
    z = np.concatenate([z, z[:1]])
    y = np.concatenate([y, [7]])
    assert 7 not in viv_per_class(z, y)["classes"]


def test_standardise_uses_bessel_corrected_sigma():
    rng = np.random.default_rng(0)
    z = rng.normal(2.0, 3.0, (10, 3, 2, 2))
    zs, mu, sigma = standardise(z)
    ref = z.transpose(1, 0, 2, 3).reshape(3, -1)
    assert mu == pytest.approx(ref.mean(1))
    assert sigma == pytest.approx(ref.std(1, ddof=1))
    assert zs.transpose(1, 0, 2, 3).reshape(3, -1).std(1, ddof=1) == pytest.approx(np.ones(3))


def test_sec_of_constant_maps_is_zero_and_of_white_noise_the_share_of_high_bins():
    rng = np.random.default_rng(0)
    const = np.broadcast_to(rng.standard_normal((64, 4, 1, 1)), (64, 4, 16, 16)).copy()
    zs, _, _ = standardise(const)
    assert sec(dct_energy(zs), 0.25) == pytest.approx(0.0, abs=1e-12)
    noise, _, _ = standardise(rng.standard_normal((512, 4, 16, 16)))
    d = np.add.outer(np.arange(16), np.arange(16))
    for rho in (0.25, 0.5):
        share = float((d > rho * 30).mean())
        assert sec(dct_energy(noise), rho) == pytest.approx(share, abs=0.01)


def test_dct_energy_is_orthonormal():
    z = np.random.default_rng(0).standard_normal((3, 2, 8, 8))
    assert dct_energy(z).sum() == pytest.approx((z**2).mean(axis=(0, 1)).sum())


def test_lnc_is_one_on_separated_clusters_and_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    classes, per = 8, 150
    centres = 10.0 * rng.standard_normal((classes, 16))
    x = np.concatenate([c + rng.standard_normal((per, 16)) for c in centres])
    y = np.repeat(np.arange(classes), per)
    assert lnc(x, y, k=10) == pytest.approx(1.0)
    assert lnc(x, rng.permutation(y), k=10) == pytest.approx(1 / classes, abs=0.03)


def test_pool_with_masks_averages_the_foreground():
    z = np.arange(2 * 1 * 2 * 2, dtype=float).reshape(2, 1, 2, 2)
    m = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=bool)
    assert pool(z, m)[:, 0] == pytest.approx([0.0, 5.5])  # image 2 has no foreground: the whole grid


@pytest.mark.parametrize("d", [4, 10])
def test_twonn_recovers_the_dimension_of_a_linear_manifold(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((2500, d)) @ rng.standard_normal((d, 64))
    assert twonn(x)["id"] == pytest.approx(d, rel=0.1)


def _smooth_fields(n=64, c=8, g=16, sigma=2.0, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c, g, g))
    return np.stack([[gaussian_filter(z[i, j], sigma, mode="wrap") for j in range(c)] for i in range(n)])


def test_lds_and_cds_positive_on_smooth_fields_and_zero_on_iid_tokens():
    smooth, _, _ = standardise(_smooth_fields())
    s = spatial_structure(smooth)
    assert s["lds"] > 0.3 and s["cds"] > 0.02
    iid, _, _ = standardise(np.random.default_rng(1).standard_normal((256, 8, 16, 16)))
    r = spatial_structure(iid)
    assert abs(r["lds"]) < 0.01 and abs(r["cds"]) < 0.005


def test_srss_on_opposite_foreground_and_background_tokens_is_two():
    g = 16
    m = np.zeros((4, g, g), dtype=bool)
    m[:, 4:12, 4:12] = True
    u = np.random.default_rng(0).standard_normal(8)
    z = np.where(m[:, None], u[None, :, None, None], -u[None, :, None, None])
    assert srss(z, m)["srss"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        srss(z, m, min_fg=65)  # 64 foreground cells < 65: every image left out


def test_mask_cells_max_pools():
    m = np.zeros((8, 8), dtype=bool)
    m[5, 6] = True
    cells = mask_cells(m, 4)
    assert cells.sum() == 1 and cells[2, 3]


def test_density_stats_closed_forms():
    flat = density_stats(np.full(100, 3.0))
    assert flat == pytest.approx({"cv": 0.0, "entropy": 1.0, "gini": 0.0})
    one = density_stats(np.r_[np.zeros(9), 1.0])
    assert one["gini"] == pytest.approx(0.9)
    assert one["entropy"] == pytest.approx(0.0)
    assert one["cv"] == pytest.approx(3.0)  # std/mean of nine 0s and one 1 (population std)


def test_gini_equals_the_mean_absolute_difference_form():
    d = np.random.default_rng(0).gamma(2.0, size=200)
    mad = np.abs(d[:, None] - d[None, :]).sum() / (2 * d.size**2 * d.mean())
    assert density_stats(d)["gini"] == pytest.approx(mad, rel=1e-12)


def test_uniformity_is_seeded_and_in_range():
    z = standardise(np.random.default_rng(0).standard_normal((40, 4, 4, 4)))[0]
    a = uniformity(z, points=200, repeats=2, iterations=250, seed=1)
    assert a == uniformity(z, points=200, repeats=2, iterations=250, seed=1)
    assert 0 < a["gini"] < 1 and 0 < a["entropy"] <= 1 and a["cv"] > 0


def _pixel_encoder(images: torch.Tensor) -> torch.Tensor:
    """A per-pixel linear map (downsample 1): commutes with rotations and with linear resizing."""
    w = torch.tensor([[0.5, -1.0, 0.25], [1.0, 1.0, 1.0]])
    return torch.einsum("oc,nchw->nohw", w, images.float() / 127.5 - 1.0)


def test_equivariance_error_is_zero_for_a_commuting_encoder():
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=rng, dtype=torch.uint8)
    rot = equivariance_errors(_pixel_encoder, images, [t for t in transforms(16, 1) if t[1] == "rotation"])
    assert rot["rotation"].shape == (12,)
    assert np.abs(rot["rotation"]).max() < 1e-12
    flat = images[:, :, :1, :1].expand(-1, -1, 16, 16).contiguous()  # resizing a constant image is exact in uint8
    sc = equivariance_errors(_pixel_encoder, flat, transforms(16, 1))
    assert np.abs(sc["scale"]).max() < 1e-10
    shifted = lambda x: _pixel_encoder(x) + torch.linspace(0, 1, x.shape[-1])  # noqa: E731  a position-dependent encoder
    assert equivariance_errors(shifted, images, transforms(16, 1))["rotation"].mean() > 0.01


def test_transforms_keep_whole_latent_grids():
    names = [n for n, _, _ in transforms(64, 16)]
    assert names == ["rot90", "rot180", "rot270", "scale0.25", "scale0.5", "scale0.75"]
    assert [n for n, _, _ in transforms(32, 16)] == ["rot90", "rot180", "rot270", "scale0.5"]


def test_slerp_closed_forms():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [4.0, 0.0]])
    mid = slerp(a, b, 0.5)
    assert mid[0].tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)])
    assert mid[1].tolist() == pytest.approx([3.0, 0.0])  # parallel: linear
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)


def test_interpolation_partners_pick_among_cosine_neighbours():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((50, 8))
    val = train[:5] + 1e-3 * rng.standard_normal((5, 8))
    assert interpolation_partners(val, train, k=1).tolist() == [0, 1, 2, 3, 4]
    picks = interpolation_partners(val, train, k=10, seed=3)
    top10 = np.argsort(-(val / np.linalg.norm(val, axis=1, keepdims=True)) @ (train / np.linalg.norm(train, axis=1, keepdims=True)).T, axis=1)[:, :10]
    assert all(p in row for p, row in zip(picks, top10))


def test_a_scale_the_encoder_cannot_take_is_left_out_with_the_reason():
    def fixed_size(x):
        if x.shape[-1] != 16:
            raise RuntimeError("input size must be 16")
        return _pixel_encoder(x)

    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    skipped: dict = {}
    out = equivariance_errors(fixed_size, images, transforms(16, 1), skipped)
    assert set(out) == {"rotation"} and set(skipped) == {"scale0.25", "scale0.5", "scale0.75"}
    with pytest.raises(RuntimeError):
        equivariance_errors(fixed_size, images, transforms(16, 1))
