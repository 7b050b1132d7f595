"""Plugins: ``sd-vae-decoder`` and ``sd-vae-msf-decoder``, LDM-style convolutional decoders for the
decoder axis of the VFM-VAE ablation (Bi et al. 2025, Table D):

* ``sd-vae-decoder``: the Stable Diffusion VAE decoder shape (Rombach et al. 2022): conv in,
  a middle ResBlock / single-head self-attention / ResBlock, then per resolution level
  ``blocks + 1`` ResBlocks (GroupNorm, SiLU, 3x3 convs) and nearest x2 upsampling + 3x3 conv,
  GroupNorm, SiLU, 3x3 conv out. The "SD-VAE-style baseline" row.
* ``sd-vae-msf-decoder``: the same decoder with multi-scale fusion (the "+ multi-scale fusion"
  row): the latent map is also injected into higher levels (separable 3x3 conv + pixel shuffle +
  GroupNorm + SiLU, concatenated to the level's input) and every level emits an RGB image, summed along a
  skip path (rgb_j = up(rgb_{j-1}) + ToRGB_j(x_j)); the lower-level images feed the multi-scale
  loss.

The third row, "+ modern blocks", is ``vfm-vae-decoder``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vfmbench import perf
from vfmbench.errors import UserError
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import DecoderSpec
from vfmbench_plugins.layers import ResBlock, SpeedSwitches, group_norm


@dataclass
class SdVaeDecoderArgs:
    base_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # per level, highest resolution first; log2(downsample) + 1 levels
    blocks: int = 2  # the LDM decoder runs blocks + 1 ResBlocks per level
    mid_attention: bool = True  # single-head self-attention between the two middle ResBlocks
    inject_levels: list[int] = field(default_factory=list)  # levels (0 = latent grid, 1 = 2x, ...) that also receive the latent
    multiscale: bool = False  # one RGB output per level, summed along a skip path


@dataclass
class SdVaeMsfDecoderArgs(SdVaeDecoderArgs):
    inject_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    multiscale: bool = True


class AttnBlock(nn.Module):
    """LDM's single-head spatial self-attention with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2)[:, None] for t in (self.q(y), self.k(y), self.v(y)))  # [B, 1, N, C]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Injection(nn.Module):
    """Latent map (grid g) -> ``channels`` at grid g * 2**level: separable 3x3 conv (depthwise, then
    pointwise to channels * 4**level), pixel shuffle, GroupNorm, SiLU."""

    def __init__(self, cin: int, channels: int, level: int):
        super().__init__()
        self.level = level
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin)
        self.pointwise = nn.Conv2d(cin, channels * 4**level, 1)
        self.norm = group_norm(channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(F.pixel_shuffle(self.pointwise(self.depthwise(h)), 2**self.level)))


class ToRGB(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.conv = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)))


class SdVaeDecoder(SpeedSwitches, nn.Module):
    """Latent feature map [B, C, g, g] -> image [B, 3, g * downsample, g * downsample] in about [-1, 1].

    ``set_grad_checkpointing(True)`` recomputes the middle block and each level in the backward
    pass; ``set_channels_last(True)`` keeps weights and activations in NHWC.
    """


    def __init__(self, in_channels: int, downsample: int, a: SdVaeDecoderArgs):
        super().__init__()
        levels = int(round(math.log2(downsample)))
        if 2**levels != downsample:
            raise UserError(f"sd-vae-decoder needs a power-of-two downsampling factor, got {downsample}")
        if len(a.channel_mult) != levels + 1:
            raise UserError(f"decoder.args.channel_mult needs {levels + 1} entries (log2(downsample) + 1 levels), got {a.channel_mult}")
        if any(not 0 < j <= levels for j in a.inject_levels):
            raise UserError(f"decoder.args.inject_levels must lie in 1..{levels} (level 0 is the decoder's input), got {a.inject_levels}")
        ch = [a.base_channels * m for m in reversed(a.channel_mult)]  # lowest resolution first
        self.inject_levels = sorted(set(a.inject_levels))
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(ch[0], ch[0]), AttnBlock(ch[0]) if a.mid_attention else nn.Identity(), ResBlock(ch[0], ch[0])])
        self.inject = nn.ModuleDict({str(j): Injection(in_channels, ch[j], j) for j in self.inject_levels})
        self.levels = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for j in range(levels + 1):
            cin = ch[max(j - 1, 0)] + (ch[j] if j in self.inject_levels else 0)
            self.levels.append(nn.Sequential(*[ResBlock(cin if b == 0 else ch[j], ch[j]) for b in range(a.blocks + 1)]))
            if j < levels:
                self.upsample.append(nn.Conv2d(ch[j], ch[j], 3, padding=1))
        self.multiscale = a.multiscale
        if a.multiscale:
            self.torgb = nn.ModuleList(ToRGB(c) for c in ch)
        else:
            self.norm_out = group_norm(ch[-1])
            self.conv_out = nn.Conv2d(ch[-1], 3, 3, padding=1)

    def forward_multiscale(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(final image, RGB outputs of the lower levels from the lowest up; empty without ``multiscale``)."""
        h = perf.channels_last_input(h, self.channels_last)
        x = self.conv_in(h)
        for m in self.mid:
            x = self.run(m, x)
        rgbs: list[torch.Tensor] = []
        for j, level in enumerate(self.levels):
            if j > 0:
                x = self.upsample[j - 1](F.interpolate(x, scale_factor=2.0, mode="nearest"))
            if str(j) in self.inject:
                x = torch.cat([x, self.inject[str(j)](h)], dim=1)
            x = self.run(level, x)
            if self.multiscale:
                rgb = self.torgb[j](x)
                rgbs.append(rgb if not rgbs else F.interpolate(rgbs[-1], scale_factor=2.0, mode="bilinear", align_corners=False) + rgb)
        if not self.multiscale:
            out = self.conv_out(F.silu(self.norm_out(x)))
            return (out.contiguous() if self.channels_last else out), []
        if self.channels_last:
            rgbs = [r.contiguous() for r in rgbs]
        return rgbs[-1], rgbs[:-1]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.forward_multiscale(h)[0]

    def trainable_groups(self) -> dict[str, list[str]]:
        """Stage-selectable parts: no style mapping; the high-resolution half is the upper half of the levels."""
        n = len(self.levels)
        high = range(n // 2, n)
        prefixes = [f"levels.{j}." for j in high] + [f"upsample.{j - 1}." for j in high if j > 0]
        prefixes += [f"inject.{j}." for j in high if str(j) in self.inject]
        prefixes += [f"torgb.{j}." for j in high] if self.multiscale else ["norm_out.", "conv_out."]
        return {"mapping": [], "synthesis": [""], "high": prefixes}


def build(args: SdVaeDecoderArgs, latent_channels: int, downsample: int) -> SdVaeDecoder:
    return SdVaeDecoder(latent_channels, downsample, args)


COMMON = dict(
    factory=build,
    version="1",
    source="vfmbench",
    paper="Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models; ablation of Bi et al. 2025 (arXiv 2510.18457), Table D",
    license="Apache-2.0",
)


@hookimpl
def register_decoders(register):
    register(DecoderSpec(name="sd-vae-decoder", config=SdVaeDecoderArgs,
                         description="SD-VAE (LDM) decoder: ResBlocks, middle self-attention, nearest upsampling (Table D baseline)", **COMMON))
    register(DecoderSpec(name="sd-vae-msf-decoder", config=SdVaeMsfDecoderArgs,
                         description="SD-VAE decoder + multi-scale fusion: latent injected at higher levels, per-level RGB skip outputs (Table D)", **COMMON))
