"""The LDM-encoder VAE trained against a frozen VFM teacher: what ``va-vae`` and ``distill`` share
(not a plugin itself). The two differ only in their alignment objective, so each plugin file holds
its arguments, its projection and its ``phase_loss``; everything else is here:

* ``LdmEncoderArgs`` / ``build_ldm_encoder``: the LDM f16d32 encoder (its decoder is the
  ``ldm-decoder`` plugin's); ``TeacherVaeArgs`` adds the teacher layer;
* ``teacher_features``: the teacher's tokens of one layer average-pooled onto the latent grid;
* ``TeacherVae``: the tokenizer's frozen teacher (under ``frozen_prefixes``: no gradient, never
  saved), encoder, decoder and reconstruction loss, its diagonal-Gaussian ``encode``, ``decode``,
  one generator phase with LDM's autoencoder optimiser, and ``reconstruction`` (the
  reconstruction half of ``phase_loss``);
* ``teacher_and_decoder``: the teacher and the decoder from a build context;
* ``TOKENIZER_FIELDS``: the ``TokenizerSpec`` fields of that architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vfmbench.interfaces import DiagonalGaussian, Phase, Tokenizer, to_float
from vfmbench_plugins.losses import pool_tokens
from vfmbench_plugins.recon_losses import ReconLoss, ReconTerms
from vfmbench_plugins.tokenizers.sd_vae import LdmEncoder

# The TokenizerSpec fields of the architecture: an f16d32 latent, decoded by ``ldm-decoder`` by default.
TOKENIZER_FIELDS = dict(license="Apache-2.0", latent_channels=32, downsample=16, uses_vfm=True, uses_decoder=True,
                        default_decoder="ldm-decoder", normalisation="per-channel")


@dataclass
class LdmEncoderArgs:
    """The LDM encoder of ``va-vae`` and ``distill`` (its decoder is the ``ldm-decoder`` plugin's)."""

    latent_channels: int = 32
    downsample: int = 16
    base_channels: int = 128  # LDM 'ch'
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # per level, full resolution first
    blocks: int = 2  # LDM 'num_res_blocks'
    attn_levels: list[int] = field(default_factory=lambda: [-1])  # LDM 'attn_resolutions' [16] at 256 px = the lowest level


@dataclass
class TeacherVaeArgs(LdmEncoderArgs):
    teacher_layer: int = -1  # VFM layer the latent is aligned with (-1 = final normed output)


def build_ldm_encoder(args: LdmEncoderArgs) -> LdmEncoder:
    return LdmEncoder(args.latent_channels, args.downsample, args.base_channels, args.channel_mult, args.blocks, args.attn_levels)


def teacher_features(vfm, images: torch.Tensor, layer: int, size: tuple[int, int]) -> torch.Tensor:
    """Frozen VFM tokens of ``layer`` average-pooled onto a latent grid of ``size``: [B, D, *size] (no gradient)."""
    with torch.no_grad():
        out = vfm(images, [layer])
    return pool_tokens(out.layers[layer].float(), out.grid, size)


class TeacherVae(Tokenizer):
    """A VAE with the LDM encoder and a frozen VFM teacher; subclasses add their projection to the
    teacher's width (after ``super().__init__``, so that parameters keep their order) and ``phase_loss``."""

    frozen_prefixes = ("vfm.",)

    def __init__(self, args: TeacherVaeArgs, vfm, decoder: nn.Module, recon_loss: ReconLoss):
        super().__init__(args.latent_channels, args.downsample)
        self.args = args
        self.vfm = vfm.requires_grad_(False)
        self.encoder = build_ldm_encoder(args)
        self.decoder = decoder
        self.recon_loss = recon_loss

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(to_float(images)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def training_phases(self, lr: float) -> list[Phase]:
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(self.frozen_prefixes)]
        return [Phase("g", params, lr, betas=(0.5, 0.9))]  # LDM's autoencoder optimiser

    def teacher_features(self, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The teacher's tokens of ``args.teacher_layer`` pooled onto the grid of the latent ``z``."""
        return teacher_features(self.vfm, images, self.args.teacher_layer, tuple(z.shape[-2:]))

    def reconstruction(self, images: torch.Tensor) -> tuple[torch.Tensor, ReconTerms]:
        """A sampled latent z of ``images`` and the reconstruction loss terms of its decoding."""
        post = self.encode(images)
        z = post.sample()
        return z, self.recon_loss(self.decode(z), to_float(images), post)


def teacher_and_decoder(args: TeacherVaeArgs, ctx) -> tuple[nn.Module, nn.Module]:
    """The configured VFM teacher (checked to have ``args.teacher_layer``) and decoder (``ldm-decoder`` by default)."""
    vfm = ctx.vfm()
    vfm.hidden_index(args.teacher_layer)  # a UserError naming the valid range
    return vfm, ctx.decoder(args.latent_channels, args.downsample, default="ldm-decoder")
