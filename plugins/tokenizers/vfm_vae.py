"""Plugin: ``vfm-vae``, a tokenizer whose encoder is a frozen vision foundation model.

Frozen VFM tokens from several layers -> per-layer compression (LayerNorm, linear, GELU MLP
residual) -> pixel-unshuffle to the latent grid -> concatenation -> 1x1 fusing projection to the
mean and log-variance of a diagonal Gaussian -> decoder (``--decoder``, default ``conv-decoder``).
Losses: L1 on pixels plus a small KL term (Bi et al. 2025, stage-0 shape without the GAN terms).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vfmbench.errors import UserError
from vfmbench.hookspecs import hookimpl
from vfmbench.interfaces import DiagonalGaussian, Phase, Tokenizer, to_float
from vfmbench.specs import TokenizerSpec


@dataclass
class VfmVaeArgs:
    latent_channels: int = 32
    downsample: int = 16  # latent grid = resolution / downsample (f16d32 -> 16x16x32 at 256 px)
    layers: list[int] = field(default_factory=list)  # VFM taps; [] = vfm.layers or the VFM spec's default
    head_width: int = 64  # per-layer compressed width
    l1_weight: float = 1.0
    kl_weight: float = 1e-6


class LayerCompression(nn.Module):
    """Tokens [B, N, D] -> [B, width, h, w]: LayerNorm + linear, then a GELU MLP residual."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.proj(tokens)
        x = x + self.mlp(x)
        b, _, c = x.shape
        return x.transpose(1, 2).reshape(b, c, grid[0], grid[1])


class VfmVae(Tokenizer):
    frozen_prefixes = ("vfm.",)

    def __init__(self, args: VfmVaeArgs, vfm, decoder: nn.Module, layers: list[int], unshuffle: int):
        super().__init__(args.latent_channels, args.downsample)
        self.args = args
        self.vfm = vfm
        self.vfm.requires_grad_(False)
        self.layers = list(layers)
        self.weights_id = "trained"
        self.compress = nn.ModuleList(LayerCompression(vfm.embed_dim, args.head_width) for _ in self.layers)
        self.unshuffle = unshuffle
        self.fuse = nn.Conv2d(len(self.layers) * args.head_width * unshuffle**2, 2 * args.latent_channels, 1)
        self.decoder = decoder

    def _tokens_to_grid(self, feats: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Pixel-unshuffle a token map onto the latent grid (resampled first when the token grid is
        not ``unshuffle`` times the latent grid, e.g. for downscaled inputs)."""
        h, w = feats.shape[-2:]
        r = self.unshuffle
        target = (latent_hw[0] * r, latent_hw[1] * r)
        if (h, w) != target:
            feats = F.interpolate(feats, size=target, mode="bilinear", align_corners=False, antialias=h > target[0])
        return F.pixel_unshuffle(feats, r)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        latent_hw = (images.shape[-2] // self.downsample, images.shape[-1] // self.downsample)
        with torch.no_grad():
            out = self.vfm(images, self.layers)
        maps = [
            self._tokens_to_grid(comp(out.layers[layer].float(), out.grid), latent_hw)
            for comp, layer in zip(self.compress, self.layers)
        ]
        moments = self.fuse(torch.cat(maps, dim=1))
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def training_phases(self, lr: float) -> list[Phase]:
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("vfm.")]
        return [Phase("g", params, lr, betas=(0.9, 0.99))]

    def phase_loss(self, phase, images, labels, nimg):
        target = to_float(images)
        post = self.encode(images)
        recon = self.decode(post.sample())
        l1 = (recon - target).abs().mean()
        kl = post.kl().mean()
        loss = self.args.l1_weight * l1 + self.args.kl_weight * kl
        return loss, {"l1": float(l1), "kl": float(kl)}


def build(args: VfmVaeArgs, ctx) -> VfmVae:
    vfm = ctx.vfm()
    layers = args.layers or ctx.config.vfm.layers or list(vfm.spec.default_layers)
    decoder = ctx.decoder(args.latent_channels, args.downsample, default="conv-decoder")
    res = ctx.config.data.resolution
    scale = ctx.config.vfm.input_scale or vfm.spec.input_scale
    token_grid = int(round(res * scale)) // vfm.patch_size
    latent_grid = res // args.downsample
    if token_grid < latent_grid:
        raise UserError(
            f"the VFM gives a {token_grid}x{token_grid} token grid at {res} px, coarser than the "
            f"{latent_grid}x{latent_grid} latent grid; raise vfm.input_scale or tokenizer.args.downsample"
        )
    return VfmVae(args, vfm, decoder, layers, unshuffle=token_grid // latent_grid)


@hookimpl
def register_tokenizers(register):
    register(
        TokenizerSpec(
            name="vfm-vae",
            description="Frozen VFM encoder + multi-layer KL latent head + decoder (Bi et al. 2025)",
            factory=build,
            config=VfmVaeArgs,
            version="1",
            source="https://github.com/tianciB/VFM-VAE (re-implemented from the paper's description)",
            paper="Bi et al. 2025, Vision Foundation Models Can Be Good Tokenizers for Latent Diffusion Models (arXiv 2510.18457)",
            license="Apache-2.0",
            latent_channels=32,
            downsample=16,
            uses_vfm=True,
            uses_decoder=True,
            default_decoder="conv-decoder",
            normalisation="per-channel",
        )
    )
