"""Plugin: ``conv-decoder``, an LDM-style convolutional decoder (ResBlocks + nearest upsampling)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import DecoderSpec
from vfmbench_plugins.layers import ConvDecoder


@dataclass
class ConvDecoderArgs:
    base_channels: int = 128  # channels at the output resolution
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # per level, highest resolution first
    blocks: int = 2  # residual blocks per level


def build(args: ConvDecoderArgs, latent_channels: int, downsample: int) -> ConvDecoder:
    return ConvDecoder(latent_channels, downsample, args.base_channels, args.channel_mult, args.blocks)


@hookimpl
def register_decoders(register):
    register(
        DecoderSpec(
            name="conv-decoder",
            description="LDM-style convolutional decoder: ResBlocks, nearest-neighbour upsampling, GroupNorm/SiLU",
            factory=build,
            config=ConvDecoderArgs,
            version="1",
            source="vfmbench",
            paper="Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models",
            license="Apache-2.0",
        )
    )
