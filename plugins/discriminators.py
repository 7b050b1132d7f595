"""Discriminators shared by first-party tokenizers (not a plugin itself).

* ``diff_augment``: DiffAugment (Zhao et al. 2020) as VFM-VAE configures it: colour (brightness,
  saturation, contrast), translation by up to 1/8 of the image and cutout of a square of 0.2 times
  the image size, drawn per image and differentiable with respect to the image.
* ``ProjectedDiscriminator``: the StyleGAN-T projected discriminator (Sauer et al. 2023). A frozen
  ViT (any ``Vfm`` of the VFM plugins; VFM-VAE uses DINO ViT-S/16) is tapped at several hidden
  states; the class token is added to every patch token (DPT's "add" readout) and each tap has a
  head of spectral-normalised 1-D convolutions over the token sequence with local batch norm
  (virtual batch 8). Images are augmented, randomly cropped or resized to the ViT's input size with
  the interpolation given (VFM-VAE: the generator VFM's) and normalised with the ViT's own
  statistics; gradients flow to the image, not to the ViT.
* ``MultiScalePatchGan``: pix2pixHD's multi-scale PatchGAN (Wang et al. 2018) with local batch
  norm, returning every layer's features for the feature-matching loss.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

# ---------------------------------------------------------------------------------------------
# DiffAugment


def _rand(b: int, x: torch.Tensor) -> torch.Tensor:
    return torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype)


def augment_color(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_rand(b, x) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(b, x) * 2.0) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(b, x) + 0.5) + mean  # contrast


def augment_translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size in each direction; vacated pixels are zero."""
    b, c, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    yy = torch.arange(h, device=x.device).view(1, h, 1) + dy  # source row for each output row
    xx = torch.arange(w, device=x.device).view(1, 1, w) + dx
    padded = F.pad(x, (1, 1, 1, 1))  # a zero border: out-of-range sources read from it
    yy = (yy + 1).clamp(0, h + 1).expand(b, h, w)
    xx = (xx + 1).clamp(0, w + 1).expand(b, h, w)
    index = (yy * (w + 2) + xx).view(b, 1, h * w).expand(b, c, h * w)
    return padded.flatten(2).gather(2, index).view(b, c, h, w)


def augment_cutout(x: torch.Tensor, ratio: float = 0.2) -> torch.Tensor:
    """Zero a square of ``ratio`` times the image size at a random centre in each image."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    yy = torch.arange(h, device=x.device).view(1, h, 1)
    xx = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((yy - cy + ch // 2) >= 0) & ((yy - cy + ch // 2) < ch) & ((xx - cx + cw // 2) >= 0) & ((xx - cx + cw // 2) < cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTS = {"color": augment_color, "translation": augment_translation, "cutout": augment_cutout}


def diff_augment(x: torch.Tensor, policy: Sequence[str] = ("color", "translation", "cutout")) -> torch.Tensor:
    """DiffAugment of images in [-1, 1] (any float range works), per image, differentiable."""
    for name in policy:
        x = AUGMENTS[name](x)
    return x.contiguous()


# ---------------------------------------------------------------------------------------------
# Projected discriminator


class BatchNormLocal(nn.Module):
    """Batch norm over virtual batches (no running statistics); statistics over the virtual batch and
    every trailing position, per channel. As StyleGAN-T, a batch of B is cut into ceil(B / virtual_bs)
    equal groups of consecutive samples (a batch that does not split evenly: groups of virtual_bs)."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.ndim))
        parts = []
        groups = -(-x.shape[0] // self.virtual_bs)
        size = x.shape[0] // groups if x.shape[0] % groups == 0 else self.virtual_bs
        for chunk in x.split(size):
            mean = chunk.mean(dim=dims, keepdim=True)
            var = chunk.var(dim=dims, keepdim=True, unbiased=False)
            parts.append((chunk - mean) * torch.rsqrt(var + self.eps))
        shape = [1, -1] + [1] * (x.ndim - 2)
        return torch.cat(parts) * self.weight.view(shape) + self.bias.view(shape)


def _sn_conv1d(cin: int, cout: int, kernel: int) -> nn.Module:
    conv = nn.Conv1d(cin, cout, kernel, padding=kernel // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12)


class HeadBlock(nn.Module):
    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = _sn_conv1d(channels, channels, kernel)
        self.norm = BatchNormLocal(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class DiscHead(nn.Module):
    """Tokens [B, C, N] -> logits [B, N]: block (k=1), residual block (k=9) scaled by 1/sqrt(2), conv to 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = HeadBlock(channels, 1)
        self.res = HeadBlock(channels, 9)
        self.out = _sn_conv1d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        h = (self.res(h) + h) / math.sqrt(2.0)
        return self.out(h).flatten(1)


class ProjectedDiscriminator(nn.Module):
    """Trainable heads on a frozen ViT. ``backbone`` is attached later (``attach``) so that the
    heads exist (and load) without the ViT's weights; ``hooks`` are hidden-state indices
    (0 = embedding output, k = output of block k). ``interpolation`` resizes the images to the
    ViT (VFM-VAE: the generator VFM's mode, whatever the discriminator ViT is)."""

    def __init__(self, embed_dim: int, hooks: Sequence[int], resolution: int, crop_p: float = 0.5, augment: bool = True,
                 interpolation: str = "bilinear"):
        super().__init__()
        self.hooks = [int(h) for h in hooks]
        self.interpolation = interpolation
        self.resolution = int(resolution)
        self.crop_p = float(crop_p)
        self.augment = augment
        self.heads = nn.ModuleList(DiscHead(embed_dim) for _ in self.hooks)
        self.backbone = None

    def attach(self, backbone: nn.Module) -> None:
        """Attach the frozen ViT (a ``vfmbench.vfm.FrozenVfm``) as ``self.backbone``."""
        if backbone.embed_dim != self.heads[0].block.conv.in_channels:
            raise ValueError(f"discriminator backbone width {backbone.embed_dim} != head width {self.heads[0].block.conv.in_channels}")
        if max(self.hooks) > backbone.num_blocks or min(self.hooks) < 0:
            raise ValueError(f"discriminator hooks {self.hooks} are out of range 0..{backbone.num_blocks} for {backbone.spec.name}")
        backbone.requires_grad_(False)
        self.backbone = backbone

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the ViT's normalised input at ``resolution`` (rounded to its patch size)."""
        bb = self.backbone
        if self.augment:
            x = diff_augment(x)
        x = (x + 1.0) / 2.0
        size = max(bb.patch_size, round(self.resolution / bb.patch_size) * bb.patch_size)
        h, w = x.shape[-2:]
        if min(h, w) > size and torch.rand(()) < self.crop_p:
            top = int(torch.randint(0, h - size + 1, ()))
            left = int(torch.randint(0, w - size + 1, ()))
            x = x[..., top : top + size, left : left + size]
        elif (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode=self.interpolation, align_corners=False, antialias=min(h, w) > size)
        mean = torch.tensor(bb.spec.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(bb.spec.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> logits [B, total tokens over hooks]."""
        if self.backbone is None:
            raise RuntimeError("the projected discriminator has no backbone: call attach() first")
        bb = self.backbone
        hidden, _ = bb.adapter.hidden_states(bb.model, self._prepare(x), set(self.hooks), final=False)
        p = bb.num_prefix_tokens
        logits = [head(readout(hidden[k], p).float().transpose(1, 2)) for k, head in zip(self.hooks, self.heads)]
        return torch.cat(logits, dim=1)


def readout(seq: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Patch tokens of a [B, prefix + N, C] sequence with the class token (the first prefix token)
    added to each; a ViT without prefix tokens gives its tokens unchanged."""
    if num_prefix == 0:
        return seq
    return seq[:, num_prefix:] + seq[:, :1]


# ---------------------------------------------------------------------------------------------
# Multi-scale PatchGAN


class PatchGan(nn.Module):
    """pix2pixHD's N-layer PatchGAN (k4 convs, stride 2 then 1, local batch norm, LReLU); every
    layer's output is returned, the last being the patch logits."""

    def __init__(self, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, ndf, 4, stride=2, padding=2), nn.LeakyReLU(0.2))]
        nf = ndf
        for n in range(1, n_layers + 1):
            prev, nf = nf, min(nf * 2, 512)
            stride = 2 if n < n_layers else 1
            layers.append(nn.Sequential(nn.Conv2d(prev, nf, 4, stride=stride, padding=2), BatchNormLocal(nf), nn.LeakyReLU(0.2)))
        layers.append(nn.Sequential(nn.Conv2d(nf, 1, 4, stride=1, padding=2)))
        self.layers = nn.ModuleList(layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiScalePatchGan(nn.Module):
    """PatchGANs on the image and on successive 3x3/stride-2 average-pooled copies."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, num_scales: int = 3):
        super().__init__()
        self.scales = nn.ModuleList(PatchGan(ndf, n_layers) for _ in range(num_scales))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for i, d in enumerate(self.scales):
            if i > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d(x))
        return out
