"""``lightningdit``: LightningDiT (Yao et al. 2025), a DiT with modern blocks, by linear flow matching.

Architecture (``dit_blocks.FlowTransformer``), as hustvl/LightningDiT ``models/lightningdit.py``:
patch 1 or 2 on the latent grid, fixed sin-cos absolute position embedding plus 2-D RoPE in every
attention, RMS QK-norm, SwiGLU feed-forward, RMSNorm with learnable weights, adaLN-Zero
conditioning on the class and on ``t`` in [0, 1] as it is. Sizes ``tiny`` to ``xl``
(LightningDiT-XL/1: width 1152, depth 28, 16 heads, patch 1; 674,965,856 trainable parameters for
a 16x16x32 latent and 1000 classes, the reference module's count). Released checkpoints load
through ``diffusion.weights``; the golden test (tests/test_golden_diffusion.py) checks forward,
guidance and sampler against the reference's outputs.

Objective: ``x_t = (1 - t) eps + t x`` (t = 0 noise, t = 1 data), target ``v = x - eps``; the
per-sample loss is the MSE plus ``cos_loss_weight`` times the velocity-direction term
``1 - cos(v_pred, v)``, the cosine taken over channels at each latent position and averaged over
positions (LightningDiT's cosine loss). Time sampling ``uniform``, ``lognormal`` or ``shifted``;
the VFM-VAE recipe trains log-normal for 600k steps and then uniform
(``time_sampling_until_images``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import DiffusionSpec
from vfmbench_plugins.diffusion.dit_blocks import FlowArgs, FlowTransformer, interpolate, mse_per_sample


@dataclass
class LightningDiTArgs(FlowArgs):
    time_sampling: str = "lognormal"  # LightningDiT's default; uniform | lognormal | shifted
    swiglu: bool = True
    rmsnorm: bool = True
    rope: bool = True
    cos_loss_weight: float = 1.0  # 0 = MSE only


class LightningDiT(FlowTransformer):
    """LightningDiT velocity model on normalised latents [B, C, H, W]; label ``num_classes`` is unconditional."""

    def __init__(self, args: LightningDiTArgs, latent_shape: tuple[int, int, int], num_classes: int):
        super().__init__(args, latent_shape, num_classes, swiglu=args.swiglu, rmsnorm=args.rmsnorm, rope=args.rope, name="lightningdit")
        self.init_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity at (x, t) for ``labels`` ([B] long; ``num_classes`` = unconditional); t is [B] or a scalar."""
        tokens = self.embed(x)
        c = self.condition(t, labels, x.shape[0])
        rope = self.rope()
        for blk in self.blocks:
            tokens = self.run_block(blk, tokens, c, rope)
        return self.unpatchify(self.final(tokens, c))

    def loss_terms(self, latents: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample ``mse`` and ``cos`` (1 - cosine over channels, averaged over positions) at the given draws."""
        target = latents - eps
        pred = self(interpolate(latents, eps, t), t, labels)
        cos = F.cosine_similarity(pred.float(), target.float(), dim=1).flatten(1).mean(1)
        return {"mse": mse_per_sample(pred, target), "cos": 1.0 - cos}

    def phase_loss(self, phase: str, latents: torch.Tensor, labels: torch.Tensor, nimg: int) -> tuple[torch.Tensor, dict[str, float]]:
        if phase != "diffusion":
            raise ValueError(f"lightningdit has one phase, 'diffusion'; got {phase!r}")
        t, eps, labels_in = self.draw_training_noise(latents, labels, nimg)
        terms = self.loss_terms(latents, labels_in, t, eps)
        mse, cos = terms["mse"].mean(), terms["cos"].mean()
        loss = mse + self.args.cos_loss_weight * cos if self.args.cos_loss_weight else mse
        return loss, {"mse": float(mse.detach()), "cos": float(cos.detach())}


def factory(args: LightningDiTArgs | None, latent_shape: tuple[int, int, int], num_classes: int) -> LightningDiT:
    return LightningDiT(args if args is not None else LightningDiTArgs(), latent_shape, num_classes)


@hookimpl
def register_diffusion_models(register):
    register(
        DiffusionSpec(
            name="lightningdit",
            description="LightningDiT (SwiGLU, RMSNorm, RoPE, QK-norm, adaLN-Zero) by linear flow matching with the cosine velocity loss",
            factory=factory,
            config=LightningDiTArgs,
            version="2",
            source="re-implementation in vfmbench, checked against hustvl/LightningDiT @ 2725fed (golden fixture)",
            paper="Yao et al., Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models, arXiv:2501.01423",
            license="Apache-2.0",
        )
    )
