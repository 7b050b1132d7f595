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

import math
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


def feature_regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "cosine",
                            normalize_target: bool = True) -> torch.Tensor:
    """Direct regression of features ``pred`` [B, D, h, w] onto ``target`` [B, D, h, w] (detached): the
    distillation objective. ``cosine``: mean over positions of 1 - cos(pred_p, target_p) (no margin);
    ``mse``: mean squared error, against the target layer-normalised over D when ``normalize_target``."""
    if pred.shape != target.shape:
        raise ValueError(f"feature_regression_loss needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    target = target.detach()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred, target, dim=1)).mean()
    if kind == "mse":
        if normalize_target:
            target = F.layer_norm(target.movedim(1, -1), (target.shape[1],)).movedim(-1, 1)
        return F.mse_loss(pred, target)
    raise ValueError(f"feature_regression_loss kind must be 'cosine' or 'mse', got {kind!r}")


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
    """pix2pixHD feature matching over discriminator scales. Each scale's list holds every layer's
    output, the logits last: the L1 between real (detached) and fake features of every layer but the
    logits, each weighted 4 / (number of outputs including the logits - 1); averaged over scales."""
    total = 0.0
    for real, fake in zip(real_feats, fake_feats):
        w = 4.0 / max(len(real) - 1, 1)
        total = total + sum(w * F.l1_loss(f, r.detach()) for r, f in zip(real[:-1], fake[:-1]))
    return total / max(len(real_feats), 1)


# ---------------------------------------------------------------------------------------------
# Reconstruction terms and the safe-loss guard (VFM-VAE)


def ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - SSIM (torchmetrics, 11x11 Gaussian window, data range 2) of images in [-1, 1]; ``x`` is
    clamped to [-1, 1] first. Differentiable with respect to ``x``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    ssim = structural_similarity_index_measure(x.clamp(-1.0, 1.0), y.clamp(-1.0, 1.0), data_range=2.0)
    return 1.0 - ssim


def multiscale_l1(outputs: Sequence[torch.Tensor], target: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sum over ``outputs`` (lower-resolution RGB predictions) of the L1 against ``target`` resized
    to each output's size with ``mode`` (antialiased when shrinking)."""
    total = target.new_zeros(())
    for out in outputs:
        t = target
        if t.shape[-2:] != out.shape[-2:]:
            shrink = out.shape[-2] < t.shape[-2] or out.shape[-1] < t.shape[-1]
            t = F.interpolate(t, size=out.shape[-2:], mode=mode, align_corners=False if mode != "nearest" else None, antialias=shrink and mode in ("bilinear", "bicubic"))
        total = total + (out - t).abs().mean()
    return total


class SafeLossGuard:
    """VFM-VAE's safe-loss rule for one optimiser step: a step is unsafe when any watched term is
    non-finite, or, once ``warmup_images`` images have been seen since this guard was made (a
    (re)start), when a term exceeds ``factor`` times its last accepted value (``factor`` > 0) or
    its magnitude exceeds ``limit`` (``limit`` > 0). ``check`` counts unsafe steps in ``skipped``."""

    def __init__(self, factor: float = 10.0, warmup_images: int = 0, limit: float = 0.0):
        self.factor, self.warmup_images, self.limit = float(factor), int(warmup_images), float(limit)
        self.previous: dict[str, float] = {}
        self.seen = 0
        self.skipped = 0

    def check(self, terms: dict[str, float], images: int) -> bool:
        """Record a step of ``images`` images with loss ``terms``; True when the step must be skipped."""
        self.seen += int(images)
        unsafe = any(not math.isfinite(v) for v in terms.values())
        if not unsafe and self.seen > self.warmup_images:
            if self.factor > 0:
                unsafe = any(k in self.previous and v > self.factor * self.previous[k] for k, v in terms.items())
            if self.limit > 0:
                unsafe = unsafe or any(abs(v) > self.limit for v in terms.values())
        if unsafe:
            self.skipped += 1
            return True
        self.previous.update(terms)
        return False
