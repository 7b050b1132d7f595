"""A third-party vfmbench plugin in one module: ``patch-ae``, a linear patch autoencoder.

Each p x p patch is projected linearly to ``latent_channels`` numbers (pixel-unshuffle + 1x1
conv) and back. It is the simplest tokenizer that trains, and shows everything a plugin needs:
a spec with metadata, an args dataclass, a factory, and one ``register_tokenizers`` hook.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from vfmbench.hookspecs import hookimpl
from vfmbench.interfaces import DiagonalGaussian, Phase, Tokenizer, to_float
from vfmbench.specs import TokenizerSpec

__version__ = "0.1.0"


@dataclass
class PatchAeArgs:
    latent_channels: int = 8
    downsample: int = 8
    kl_weight: float = 1e-6


class PatchAe(Tokenizer):
    def __init__(self, args: PatchAeArgs):
        super().__init__(args.latent_channels, args.downsample)
        self.args = args
        p2 = 3 * args.downsample**2
        self.enc = nn.Conv2d(p2, 2 * args.latent_channels, 1)
        self.dec = nn.Conv2d(args.latent_channels, p2, 1)

    def encode(self, images):
        mean, logvar = self.enc(F.pixel_unshuffle(to_float(images), self.downsample)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar - 8.0)

    def decode(self, z):
        return F.pixel_shuffle(self.dec(z), self.downsample)

    def training_phases(self, lr):
        return [Phase("g", list(self.parameters()), lr)]

    def phase_loss(self, phase, images, labels, nimg):
        post = self.encode(images)
        l1 = (self.decode(post.sample()) - to_float(images)).abs().mean()
        kl = post.kl().mean()
        return l1 + self.args.kl_weight * kl, {"l1": float(l1)}


@hookimpl
def register_tokenizers(register):
    register(
        TokenizerSpec(
            name="patch-ae",
            description="Example plugin: linear patch autoencoder (pixel-unshuffle + 1x1 conv)",
            factory=lambda args, ctx: PatchAe(args),
            config=PatchAeArgs,
            version="1",
            source="examples/vfmbench-example-plugin",
            license="Apache-2.0",
            latent_channels=8,
            downsample=8,
            uses_vfm=False,
            uses_decoder=False,
        )
    )
