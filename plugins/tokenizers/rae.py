"""Plugin: ``rae``, a representation autoencoder (Zheng et al. 2025), and the ``vit-decoder`` decoder.

The latent *is* the frozen VFM's token grid, uncompressed: for DINOv2-B/14 on 256 px images
(resized to 224) it is 768 x 16 x 16. Only the decoder trains.

* **Encoder**: the VFM chosen with ``--vfm`` (RAE: DINOv2-B with registers; the ``paper-rae``
  preset sets it). ``encoder_norm='layernorm'`` (RAE) takes the last block's output and applies the
  final LayerNorm *without* its affine parameters, so every token has zero mean and unit variance
  over channels; ``'vfm'`` takes the VFM's own final normed output.
* **Posterior**: deterministic, a Gaussian at the tokens with log-variance -30 (the clamp floor), so
  ``encode(x).sample()`` is the token grid up to ~3e-7 noise and the KL term is never used.
* **Noise augmentation** (training only): the decoder sees z + sigma * eps with
  sigma ~ U(0, ``noise_tau``) per sample (RAE's tau = 0.8), so that it decodes the slightly
  off-manifold latents a diffusion model produces.
* **Latent normalisation**: per-channel statistics set by the runner (``normalize``/``denormalize``).
* **Decoder**: ``--decoder``, default ``vit-decoder`` (MAE-style: linear embedding, a learned class
  token, fixed 2-D sin-cos positions, pre-norm ViT blocks, LayerNorm, a linear head to
  ``f x f x 3`` pixels per token, where f = resolution / token grid; RAE's ViT-XL is width 1152,
  depth 28, 16 heads, MLP 4096 (its ``decoder_intermediate_size``), LayerNorm eps 1e-12 as
  transformers' ViTMAE layers: 415,056,640 trainable parameters for DINOv2-B latents at 256 px).
  Any decoder that takes a C x h x w latent also works (``conv-decoder``).

Loss: L1 + LPIPS (``vfmbench_plugins.recon_losses``; RAE adds a GAN term, not included here).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vfmbench.errors import UserError, did_you_mean
from vfmbench.hookspecs import hookimpl
from vfmbench.interfaces import DiagonalGaussian, Phase, Tokenizer, to_float
from vfmbench.specs import DecoderSpec, TokenizerSpec
from vfmbench.vfm import target_size
from vfmbench_plugins.recon_losses import ReconLoss, ReconLossArgs

RAE_PAPER = "Zheng, Ma, Tong & Xie 2025, Diffusion Transformers with Representation Autoencoders (arXiv 2510.11690)"
ENCODER_NORMS = ("layernorm", "vfm")
DETERMINISTIC_LOGVAR = -30.0
LN_EPS = 1e-6  # the encoder's final LayerNorm (DINOv2)
DECODER_LN_EPS = 1e-12  # RAE's decoder: transformers ViTMAE layer_norm_eps


# ---------------------------------------------------------------------------------------------
# vit-decoder


def sincos_2d(dim: int, h: int, w: int, device=None) -> torch.Tensor:
    """[h*w, dim] fixed 2-D sin-cos position embedding: half the channels encode rows, half columns."""
    if dim % 4:
        raise UserError(f"the vit-decoder width must be a multiple of 4 for its sin-cos positions, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device), torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
    out = [f(pos.reshape(-1, 1) * omega) for pos in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()


class Block(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=DECODER_LN_EPS)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=DECODER_LN_EPS)
        hidden = int(round(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class VitDecoder(nn.Module):
    """Latent [B, C, h, w] -> image [B, 3, h*f, w*f]: one token per latent position, f x f pixels out per token."""

    def __init__(self, latent_channels: int, patch: int, width: int, depth: int, heads: int, mlp_ratio: float, cls_token: bool):
        super().__init__()
        if width % heads:
            raise UserError(f"vit-decoder width {width} must be a multiple of heads {heads}")
        self.patch, self.width = patch, width
        self.embed = nn.Linear(latent_channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cls_token else None
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=DECODER_LN_EPS)
        self.head = nn.Linear(width, patch * patch * 3)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        x = self.embed(z.flatten(2).transpose(1, 2)) + sincos_2d(self.width, h, w, z.device).to(z.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.head(self.norm(x))
        if self.cls_token is not None:
            x = x[:, 1:]
        p = self.patch
        x = x.view(b, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, h * p, w * p)


@dataclass
class VitDecoderArgs:
    width: int = 1152  # RAE's ViT-XL decoder: 1152 / 28 / 16
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4096 / 1152  # MLP width / width: RAE's ViT-XL decoder_intermediate_size 4096 at 1152
    cls_token: bool = True


def build_vit_decoder(args: VitDecoderArgs, latent_channels: int, downsample: int) -> VitDecoder:
    return VitDecoder(latent_channels, downsample, args.width, args.depth, args.heads, args.mlp_ratio, args.cls_token)


# ---------------------------------------------------------------------------------------------
# rae


@dataclass
class RaeArgs:
    encoder_norm: str = "layernorm"  # layernorm: the final LayerNorm without affine (RAE) | vfm: the VFM's own final output
    noise_tau: float = 0.8  # decoder-training noise: sigma ~ U(0, noise_tau) per sample (0 = off)
    loss: ReconLossArgs = field(default_factory=lambda: ReconLossArgs(l1=1.0, lpips=1.0, kl=0.0))


def token_grid(resolution: int, vfm) -> int:
    """Side of the VFM's token grid for square ``resolution`` px inputs."""
    return target_size(resolution, vfm.input_scale, vfm.patch_size) // vfm.patch_size


class Rae(Tokenizer):
    frozen_prefixes = ("vfm.",)

    def __init__(self, args: RaeArgs, vfm, decoder: nn.Module, downsample: int, recon_loss: ReconLoss):
        super().__init__(vfm.embed_dim, downsample)
        self.args = args
        self.vfm = vfm
        self.vfm.requires_grad_(False)
        self.decoder = decoder
        self.recon_loss = recon_loss
        self.layer = -2 if args.encoder_norm == "layernorm" else -1

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        g = token_grid(resolution, self.vfm)
        return (self.latent_channels, g, g)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] latent token grid (no gradient)."""
        with torch.no_grad():
            out = self.vfm(images, [self.layer])
            t = out.layers[self.layer].float()
            if self.args.encoder_norm == "layernorm":
                t = F.layer_norm(t, (t.shape[-1],), eps=LN_EPS)
        b, _, d = t.shape
        return t.transpose(1, 2).reshape(b, d, *out.grid)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        z = self.tokens(images)
        return DiagonalGaussian(z, torch.full_like(z, DETERMINISTIC_LOGVAR))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def noise_augment(self, z: torch.Tensor) -> torch.Tensor:
        if self.args.noise_tau <= 0:
            return z
        sigma = self.args.noise_tau * torch.rand(z.shape[0], 1, 1, 1, device=z.device, dtype=z.dtype)
        return z + sigma * torch.randn_like(z)

    def training_phases(self, lr: float) -> list[Phase]:
        return [Phase("g", [p for p in self.decoder.parameters() if p.requires_grad], lr, betas=(0.9, 0.95))]

    def phase_loss(self, phase, images, labels, nimg):
        z = self.noise_augment(self.tokens(images))
        terms = self.recon_loss(self.decode(z), to_float(images))
        return terms.total, terms.logs


def build(args: RaeArgs, ctx) -> Rae:
    if args.encoder_norm not in ENCODER_NORMS:
        raise UserError(f"tokenizer.args.encoder_norm={args.encoder_norm!r}: {did_you_mean(args.encoder_norm, ENCODER_NORMS)}")
    if args.noise_tau < 0:
        raise UserError(f"tokenizer.args.noise_tau must be >= 0, got {args.noise_tau}")
    vfm = ctx.vfm()
    res = ctx.config.data.resolution
    g = token_grid(res, vfm)
    if res % g:
        raise UserError(
            f"the VFM gives a {g}x{g} token grid at {res} px; the decoder needs resolution / grid to be an integer "
            "(change data.resolution or vfm.input_scale)"
        )
    decoder = ctx.decoder(vfm.embed_dim, res // g, default="vit-decoder")
    return Rae(args, vfm, decoder, res // g, ReconLoss.from_context(args.loss, ctx))


@hookimpl
def register_tokenizers(register):
    register(
        TokenizerSpec(
            name="rae",
            description="Representation autoencoder: frozen VFM tokens as the uncompressed latent + trained decoder (ViT by default)",
            factory=build,
            config=RaeArgs,
            version="1",
            source="https://github.com/bytetriper/RAE (re-implemented from the paper's description)",
            paper=RAE_PAPER,
            license="Apache-2.0",
            latent_channels=768,  # DINOv2-B; the instance takes the VFM's width
            downsample=16,  # 256 px -> 224 px -> 16x16 patches of 14; the instance takes the VFM's grid
            uses_vfm=True,
            uses_decoder=True,
            default_decoder="vit-decoder",
            normalisation="per-channel",
        )
    )


@hookimpl
def register_decoders(register):
    register(
        DecoderSpec(
            name="vit-decoder",
            description="MAE-style ViT decoder: one token per latent position, f x f pixels per token (RAE's ViT-XL by default)",
            factory=build_vit_decoder,
            config=VitDecoderArgs,
            version="1",
            source="vfmbench (re-implemented from the RAE and MAE descriptions)",
            paper=RAE_PAPER,
            license="Apache-2.0",
        )
    )
