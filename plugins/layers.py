"""Convolutional building blocks shared by first-party plugins (not a plugin itself).

LDM-style residual blocks (GroupNorm, SiLU, 3x3 convs) and the encoder/decoder stacks built
from them: the SD-VAE shape at any downsampling factor and width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vfmbench import perf


def group_norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def stage_channels(base: int, mult: list[int], levels: int) -> list[int]:
    """Channels of each resolution level (highest resolution first); ``mult`` is repeated at its end."""
    mult = list(mult) or [1]
    return [base * mult[min(i, len(mult) - 1)] for i in range(levels + 1)]


class SpeedSwitches:
    """The run's speed switches for a module (``run.grad_checkpointing``, ``run.channels_last``):
    ``run(block, *args)`` recomputes ``block``'s activations in backward when checkpointing is on."""

    grad_checkpointing = False
    channels_last = False

    def run(self, module: nn.Module, *args):
        return perf.checkpoint(module, *args) if self.grad_checkpointing else module(*args)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.grad_checkpointing = bool(enabled)

    def set_channels_last(self, enabled: bool) -> None:
        self.channels_last = bool(enabled)
        perf.to_channels_last(self, enabled)


class _ConvStack(SpeedSwitches, nn.Module):
    """``conv_in -> body (a Sequential) -> norm_out -> SiLU -> conv_out`` with the run's switches:
    gradient checkpointing per body layer, channels-last weights and activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(perf.channels_last_input(x, self.channels_last))
        for layer in self.body:
            x = self.run(layer, x) if isinstance(layer, ResBlock) else layer(x)
        out = self.conv_out(F.silu(self.norm_out(x)))
        return out.contiguous() if self.channels_last else out


class ConvEncoder(_ConvStack):
    """uint8-normalised image [-1, 1] -> 2 * latent_channels moments at 1/downsample resolution."""

    def __init__(self, out_channels: int, downsample: int, base: int, mult: list[int], blocks: int):
        super().__init__()
        levels = int(round(math.log2(downsample)))
        if 2**levels != downsample:
            raise ValueError(f"downsample must be a power of two, got {downsample}")
        ch = stage_channels(base, mult, levels)
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(levels + 1):
            cin = ch[max(i - 1, 0)]
            for b in range(blocks):
                layers.append(ResBlock(cin if b == 0 else ch[i], ch[i]))
            if i < levels:
                layers.append(nn.Conv2d(ch[i], ch[i], 3, stride=2, padding=1))
        self.body = nn.Sequential(*layers)
        self.norm_out = group_norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], out_channels, 3, padding=1)


class ConvDecoder(_ConvStack):
    """Latent feature map [B, C, h, w] -> image [B, 3, h*downsample, w*downsample] in about [-1, 1]."""

    def __init__(self, in_channels: int, downsample: int, base: int, mult: list[int], blocks: int):
        super().__init__()
        levels = int(round(math.log2(downsample)))
        if 2**levels != downsample:
            raise ValueError(f"downsample must be a power of two, got {downsample}")
        ch = stage_channels(base, mult, levels)[::-1]  # lowest resolution first
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(levels + 1):
            cin = ch[max(i - 1, 0)]
            for b in range(blocks):
                layers.append(ResBlock(cin if b == 0 else ch[i], ch[i]))
            if i < levels:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
                layers.append(nn.Conv2d(ch[i], ch[i], 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.norm_out = group_norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 3, 3, padding=1)
