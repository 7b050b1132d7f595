"""Loss terms shared by first-party tokenizers (not a plugin itself).

* ``vf_loss``: the VA-VAE / VFM-VAE vision-foundation alignment loss -- a distance-matrix margin
  term between the per-image cosine-similarity matrices of the projected latent and the VFM
  features, plus a per-position cosine margin term.
* ``adaptive_weight``: the gradient-norm balance of a loss against the reconstruction loss at one
  weight tensor (VQGAN / VA-VAE): w * ||grad L_rec|| / (||grad L_other|| + 1e-4), detached.
* GAN terms: hinge (StyleGAN-T projected discriminator), least squares (PatchGAN) and
  pix2pixHD feature matching.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, HW, HW] cosine similarities between spatial positions (over channels)."""
    v = F.normalize(x.flatten(2).transpose(1, 2), dim=-1)
    return v @ v.transpose(1, 2)


def vf_loss(z_proj: torch.Tensor, feats: torch.Tensor, margin_dm: float = 0.0, margin_cos: float = 0.0,
            weight_dm: float = 1.0, weight_cos: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Alignment of projected latents ``z_proj`` [B, D, h, w] with VFM features ``feats`` [B, D, h, w] (detached).

    L = weight_dm * mean ReLU(|C(z) - C(f)| - margin_dm) + weight_cos * mean ReLU(1 - margin_cos - cos(z_p, f_p)).
    """
    if z_proj.shape != feats.shape:
        raise ValueError(f"vf_loss needs equal shapes, got {tuple(z_proj.shape)} and {tuple(feats.shape)}")
    feats = feats.detach()
    dm = F.relu((cosine_matrix(z_proj) - cosine_matrix(feats)).abs() - margin_dm).mean()
    cos = F.cosine_similarity(z_proj, feats, dim=1)  # [B, h, w]
    mc = F.relu(1.0 - margin_cos - cos).mean()
    loss = weight_dm * dm + weight_cos * mc
    return loss, {"vf_dm": float(dm.detach()), "vf_cos": float(mc.detach())}


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """VFM tokens [B, N, D] on ``grid`` -> [B, D, *size] by adaptive average pooling."""
    b, n, d = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])
    return F.adaptive_avg_pool2d(fmap, size)


def adaptive_weight(rec_loss: torch.Tensor, other_loss: torch.Tensor, weight: torch.Tensor, scale: float,
                    max_value: float = 1e8) -> torch.Tensor:
    """``scale * ||dL_rec/dW|| / (||dL_other/dW|| + 1e-4)``, detached and clamped to [0, max_value]."""
    g_rec = torch.autograd.grad(rec_loss, weight, retain_graph=True)[0]
    g_other = torch.autograd.grad(other_loss, weight, retain_graph=True)[0]
    lam = g_rec.norm() / (g_other.norm() + 1e-4)
    return (scale * lam).clamp(0.0, max_value).detach()


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def lsgan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return (real_logits - 1.0).pow(2).mean() + fake_logits.pow(2).mean()


def lsgan_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return (fake_logits - 1.0).pow(2).mean()


def feature_matching_loss(real_feats: Sequence[Sequence[torch.Tensor]], fake_feats: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """pix2pixHD feature matching over discriminator scales: per scale, the L1 between real (detached)
    and fake intermediate features, each layer weighted 4 / (layers - 1); averaged over scales."""
    total = 0.0
    for real, fake in zip(real_feats, fake_feats):
        w = 4.0 / max(len(real) - 1, 1)
        total = total + sum(w * F.l1_loss(f, r.detach()) for r, f in zip(real, fake))
    return total / max(len(real_feats), 1)
