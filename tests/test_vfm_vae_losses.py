"""The loss terms VFM-VAE adds to ``plugins/losses.py``, against independent computations (the KL,
VF, adaptive-weight, hinge, LSGAN and feature-matching terms are in tests/test_losses.py)."""
import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from vfmbench_plugins.losses import SafeLossGuard, multiscale_l1, ssim_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def ssim_numpy(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> float:
    """Gaussian SSIM (window 11, sigma 1.5, K = 0.01 / 0.03) with reflection padding, averaged over
    every pixel, channel and image (Wang et al. 2004, as torchmetrics evaluates it)."""
    r = np.arange(-5, 6)
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g / g.sum(), g / g.sum())
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for a, b in zip(x.reshape(-1, *x.shape[2:]), y.reshape(-1, *y.shape[2:])):
        def filt(img):
            win = sliding_window_view(np.pad(img, 5, mode="reflect"), (11, 11))
            return (win * w).sum(axis=(-1, -2))

        ma, mb = filt(a), filt(b)
        va = np.maximum(filt(a * a) - ma**2, 0)
        vb = np.maximum(filt(b * b) - mb**2, 0)
        cov = filt(a * b) - ma * mb
        vals.append(((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean())
    return float(np.mean(vals))


def test_ssim_loss_matches_an_independent_ssim():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 3, 20, 20, generator=g) * 2 - 1
    x = (y + 0.3 * torch.randn(2, 3, 20, 20, generator=g)).clamp(-1, 1)
    expected = 1.0 - ssim_numpy(x.double().numpy(), y.double().numpy())
    assert math.isclose(float(ssim_loss(x, y)), expected, rel_tol=1e-4, abs_tol=1e-5)
    assert float(ssim_loss(y, y)) < 1e-6
    # predictions are clamped to [-1, 1] first
    assert math.isclose(float(ssim_loss(x * 5, y)), float(ssim_loss((x * 5).clamp(-1, 1), y)), rel_tol=1e-6)
    xr = x.clone().requires_grad_(True)
    ssim_loss(xr, y).backward()
    assert xr.grad.abs().sum() > 0


def test_multiscale_l1_by_hand():
    target = torch.full((1, 3, 16, 16), 0.1)
    outs = [torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 8, 8), -0.25)]
    assert math.isclose(float(multiscale_l1(outs, target)), 0.4 + 0.35, rel_tol=1e-6)
    # a 2x2-block image taken at every other pixel (nearest) is its coarse version
    coarse = torch.arange(16.0).view(1, 1, 4, 4)
    fine = coarse.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert float(multiscale_l1([coarse + 1.0], fine, mode="nearest")) == 1.0
    assert float(multiscale_l1([], fine)) == 0.0


def test_safe_loss_guard_rules():
    g = SafeLossGuard(factor=10.0, warmup_images=8)
    assert not g.check({"l1": 1.0}, 4)
    assert not g.check({"l1": 50.0}, 4)  # a jump inside the warm-up is allowed
    assert g.check({"l1": float("nan")}, 4)  # non-finite is never allowed
    assert g.check({"l1": 501.0}, 4)  # > 10 x the last accepted value (50)
    assert not g.check({"l1": 499.0, "lpips": 3.0}, 4)  # a new term has no history yet
    assert g.check({"l1": 1.0, "lpips": 31.0}, 4)  # any term may trip it
    assert g.skipped == 3 and g.previous == {"l1": 499.0, "lpips": 3.0}
    d = SafeLossGuard(factor=0.0, limit=1e4)
    assert not d.check({"d": 9e3}, 1) and d.check({"d": -2e4}, 1) and d.check({"d": float("inf")}, 1)
    assert not d.check({"d": 1e-3}, 1)  # no jump rule without a factor
