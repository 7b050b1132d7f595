"""Shared loss terms against hand computations."""
import math

import numpy as np
import torch

from vfmbench.interfaces import DiagonalGaussian
from vfmbench_plugins.losses import (adaptive_weight, cosine_matrix, feature_matching_loss, hinge_d_loss, hinge_g_loss,
                                     lsgan_d_loss, lsgan_g_loss, pool_tokens, vf_loss)


def test_kl_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    kl = DiagonalGaussian(mean, logvar).kl()
    var = np.exp(logvar.numpy())
    expected = 0.5 * (mean.numpy() ** 2 + var - 1 - logvar.numpy()).reshape(3, -1).sum(1)
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-5)
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)).kl(), torch.zeros(1))


def test_vf_loss_hand_made():
    # two positions, two channels: z = [[1,0],[0,1]] (orthogonal positions), f = [[1,0],[1,0]] (identical positions)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # [B=1, C=2, H=1, W=2]
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)
    assert torch.allclose(cosine_matrix(z)[0], torch.eye(2))
    assert torch.allclose(cosine_matrix(f)[0], torch.ones(2, 2))
    loss, logs = vf_loss(z, f)
    # distance-matrix term: |I - 1| = off-diagonals 1 -> mean 0.5; cosine term: cos = (1, 0) -> mean(0, 1) = 0.5
    assert math.isclose(logs["vf_dm"], 0.5, rel_tol=1e-6) and math.isclose(logs["vf_cos"], 0.5, rel_tol=1e-6)
    assert math.isclose(float(loss), 1.0, rel_tol=1e-6)
    # margins cut the terms: with margin 0.5 on the matrix term, (1 - 0.5) off-diagonal -> 0.25
    _, logs = vf_loss(z, f, margin_dm=0.5, margin_cos=0.5)
    assert math.isclose(logs["vf_dm"], 0.25, rel_tol=1e-6) and math.isclose(logs["vf_cos"], 0.25, rel_tol=1e-6)
    loss, _ = vf_loss(f * 3.0, f)  # aligned up to scale: zero loss
    assert float(loss) < 1e-6


def test_vf_loss_gradient_flows_only_to_latent():
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    f = torch.randn(2, 8, 3, 3, requires_grad=True)
    vf_loss(z, f)[0].backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and f.grad is None


def test_pool_tokens():
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # 4x4 grid, 1 channel
    out = pool_tokens(tokens, (4, 4), (2, 2))
    assert torch.allclose(out[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


def test_adaptive_weight_formula():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (w * torch.tensor([3.0, 4.0])).sum()  # grad (3, 4): norm 5
    other = (w * torch.tensor([0.6, 0.8])).sum()  # grad norm 1
    lam = adaptive_weight(rec, other, w, scale=2.0)
    assert math.isclose(float(lam), 2.0 * 5.0 / (1.0 + 1e-4), rel_tol=1e-6) and not lam.requires_grad
    assert float(adaptive_weight(rec, other * 0.0, w, scale=1.0, max_value=7.0)) == 7.0


def test_gan_terms():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    assert math.isclose(float(hinge_d_loss(real, fake)), (0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3, rel_tol=1e-6)
    assert math.isclose(float(hinge_g_loss(fake)), -(-2.0 + 0.0 + 1.5) / 3, rel_tol=1e-6)
    assert math.isclose(float(lsgan_d_loss(real, fake)), (1 + 0.25 + 4) / 3 + (4 + 0 + 2.25) / 3, rel_tol=1e-6)
    assert math.isclose(float(lsgan_g_loss(fake)), (9 + 1 + 0.25) / 3, rel_tol=1e-6)


def test_feature_matching():
    """pix2pixHD / VFM-VAE weighting: 4 / (outputs including the logits - 1) per layer, the logits
    themselves excluded, averaged over scales. With the paper's 5 outputs per scale the weight is 1,
    so the recipe's feature_matching=10 weighs the summed layer L1s by 10."""
    real = [[torch.zeros(2), torch.zeros(2), torch.zeros(2)], [torch.zeros(1), torch.zeros(1), torch.zeros(1)]]
    fake = [[torch.ones(2), torch.ones(2), torch.full((2,), 100.0)], [torch.full((1,), 2.0)] * 3]
    # 3 outputs (2 features + logits): weight 4/2; scale 1: 2 x 2 x 1 = 4; scale 2: 2 x 2 x 2 = 8; mean 6 (logits ignored)
    assert math.isclose(float(feature_matching_loss(real, fake)), 6.0, rel_tol=1e-6)
    real5 = [[torch.zeros(3)] * 5]
    fake5 = [[torch.full((3,), 0.5)] * 4 + [torch.full((3,), 7.0)]]
    assert math.isclose(float(feature_matching_loss(real5, fake5)), 4 * 1.0 * 0.5, rel_tol=1e-6)
