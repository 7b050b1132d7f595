"""Plugin: ``distill``, a trainable encoder distilled from a frozen VFM by direct feature regression.

The "distillation" family that VFM-VAE argues against: instead of using the VFM as the encoder
(``vfm-vae``, ``rae``) or aligning the latent's similarity structure with margins and an adaptive
weight (``va-vae``), a trainable encoder learns to reproduce the VFM's tokens. The architecture is
``va-vae``'s (the LDM f16d32 encoder, decoder ``--decoder`` = ``ldm-decoder``), so the two differ
only in the alignment objective:

* the sampled latent z goes through a projector (1x1 convs: C -> ``projector_hidden`` -> SiLU -> D,
  REPA-style; ``projector_hidden`` 0 = one linear 1x1 conv) to the teacher's width D;
* the teacher's tokens of ``teacher_layer`` (teacher chosen with ``--vfm``) are average-pooled onto
  the latent grid;
* L_distill = ``feature_regression_loss(projector(z), f, target)``: ``cosine`` = mean (1 - cos), or
  ``mse`` against the layer-normalised target (``vfmbench_plugins.losses``), with the fixed weight
  ``distill_weight``.

L = L1 + LPIPS + KL (``vfmbench_plugins.recon_losses``) + distill_weight * L_distill. The teacher
is under ``frozen_prefixes``: no gradient, never saved with the tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vfmbench.errors import UserError, did_you_mean
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import TokenizerSpec
from vfmbench_plugins.losses import feature_regression_loss
from vfmbench_plugins.recon_losses import ReconLoss, ReconLossArgs
from vfmbench_plugins.tokenizers.teacher_vae import TOKENIZER_FIELDS, TeacherVae, TeacherVaeArgs, teacher_and_decoder

TARGETS = ("cosine", "mse")


@dataclass
class DistillArgs(TeacherVaeArgs):
    target: str = "cosine"  # cosine | mse
    normalize_target: bool = True  # mse only: layer-normalise the teacher tokens over channels
    distill_weight: float = 1.0
    projector_hidden: int = 2048  # 0 = a single linear 1x1 conv
    loss: ReconLossArgs = field(default_factory=ReconLossArgs)


def projector(cin: int, hidden: int, cout: int) -> nn.Module:
    if hidden <= 0:
        return nn.Conv2d(cin, cout, 1)
    return nn.Sequential(nn.Conv2d(cin, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, cout, 1))


class Distill(TeacherVae):
    def __init__(self, args: DistillArgs, vfm, decoder: nn.Module, recon_loss: ReconLoss):
        super().__init__(args, vfm, decoder, recon_loss)
        self.projector = projector(args.latent_channels, args.projector_hidden, vfm.embed_dim)

    def distill_loss(self, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a = self.args
        return feature_regression_loss(self.projector(z), self.teacher_features(images, z), a.target, a.normalize_target)

    def phase_loss(self, phase, images, labels, nimg):
        z, terms = self.reconstruction(images)
        loss, logs = terms.total, dict(terms.logs)
        if self.args.distill_weight > 0:
            d = self.distill_loss(images, z)
            loss = loss + self.args.distill_weight * d
            logs["distill"] = float(d.detach())
        return loss, logs


def build(args: DistillArgs, ctx) -> Distill:
    if args.target not in TARGETS:
        raise UserError(f"tokenizer.args.target={args.target!r}: {did_you_mean(args.target, TARGETS)}")
    vfm, decoder = teacher_and_decoder(args, ctx)
    return Distill(args, vfm, decoder, ReconLoss.from_context(args.loss, ctx))


@hookimpl
def register_tokenizers(register):
    register(
        TokenizerSpec(
            name="distill",
            description="Trainable LDM f16d32 encoder distilled from a frozen VFM (--vfm) by cosine/MSE feature regression",
            factory=build,
            config=DistillArgs,
            version="1",
            source="vfmbench (the distillation family, at VA-VAE's architecture)",
            paper="Bi et al. 2025 (arXiv 2510.18457) discuss this family; objective as feature distillation (e.g. REPA's projector)",
            **TOKENIZER_FIELDS,
        )
    )
