"""The small reconstruction-loss stack shared by first-party tokenizers (not a plugin itself).

``ReconLoss(args, lpips_weights, smoke, cache_dir)`` scores a reconstruction against its target
(both float NCHW in [-1, 1]) as

    rec = l1 * mean|x_hat - x| + lpips * mean LPIPS-VGG(x_hat, x)
    kl  = kl * mean_b KL(q(z|x) || N(0, I)) / (3 H W)   (KL summed over the latent's C, h, w)

This is LDM's ``LPIPSWithDiscriminator`` (CompVis/latent-diffusion ``ldm/modules/losses/contperceptual.py``,
also VA-VAE's) divided by the number of image values 3 H W: LDM sums the per-pixel
|x_hat - x| + LPIPS over C, H, W and the KL over the latent, both averaged over the batch, and adds
``kl_weight`` (1e-6) * KL. Dividing by 3 H W keeps the reconstruction terms as means and the ratio
KL : reconstruction exactly LDM's (without the division the KL would weigh 3 H W = 196,608 times
more at 256 px). LDM's learnable ``logvar`` is not in its autoencoder optimiser and stays 0.

and returns both parts separately, so a caller can balance another loss against ``rec`` alone
(VA-VAE's adaptive VF weight). LPIPS is ``vfmbench.metrics.image.LpipsVgg`` (the v0.1 linear
heads over torchvision's VGG16, differentiable on [-1, 1]); its weights come from
``metrics.lpips_weights`` or torch hub's cache, and a smoke run may use its deterministic random
backbone. The network is built on first use and is deliberately *not* a sub-module of the
tokenizer: it is never trained, never checkpointed and never counted in its parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class ReconLossArgs:
    l1: float = 1.0  # weight of the mean absolute pixel error
    lpips: float = 1.0  # weight of LPIPS-VGG (0 = never build the VGG)
    kl: float = 1e-6  # weight of the KL term (LDM's 1e-6)
    lpips_images: int = 0  # LPIPS on the first N images of each batch only (0 = all); a CPU-cost knob for smoke runs


@dataclass
class ReconTerms:
    rec: torch.Tensor  # weighted pixel + perceptual terms
    kl: torch.Tensor  # weighted KL term (0 without a posterior)
    logs: dict[str, float]

    @property
    def total(self) -> torch.Tensor:
        return self.rec + self.kl


class ReconLoss:
    """Weighted L1 + LPIPS + KL; see the module docstring."""

    def __init__(self, args: ReconLossArgs, lpips_weights: str = "", smoke: bool = False,
                 cache_dir: str | Path | None = None):
        self.args = args
        self.lpips_weights = lpips_weights
        self.smoke = smoke
        self.cache_dir = cache_dir
        self._lpips: Any = None

    @classmethod
    def from_context(cls, args: ReconLossArgs, ctx) -> "ReconLoss":
        """The loss with the run's LPIPS weights and smoke flag (``ctx`` is a ``vfmbench.build.BuildContext``)."""
        return cls(args, ctx.config.metrics.lpips_weights, ctx.config.run.smoke, ctx.cache_dir)

    def lpips_net(self, device: torch.device):
        if self._lpips is None:
            from vfmbench.metrics.image import LpipsVgg

            self._lpips = LpipsVgg(self.lpips_weights, self.smoke, self.cache_dir, device)
        elif self._lpips.shift.device != device:
            self._lpips.to(device)
        return self._lpips

    def __call__(self, recon: torch.Tensor, target: torch.Tensor, posterior=None) -> ReconTerms:
        a = self.args
        zero = recon.new_zeros(())
        l1 = (recon - target).abs().mean()
        rec = a.l1 * l1
        logs = {"l1": float(l1.detach())}
        if a.lpips > 0:
            n = a.lpips_images or recon.shape[0]
            lp = self.lpips_net(recon.device).distance(recon[:n].float(), target[:n].float()).mean()
            rec = rec + a.lpips * lp
            logs["lpips"] = float(lp.detach())
        kl = zero
        if posterior is not None:
            kl_raw = posterior.kl().mean()
            kl = a.kl * kl_raw / target[0].numel()  # LDM's sum-over-pixels weighting, divided by 3 H W
            logs["kl"] = float(kl_raw.detach())
        return ReconTerms(rec=rec, kl=kl, logs=logs)
