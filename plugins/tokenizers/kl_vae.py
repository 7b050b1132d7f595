"""Plugin: ``kl-vae``, the plain KL autoencoder baseline with a trainable convolutional encoder.

The LDM AutoencoderKL shape (Rombach et al. 2022) at any width: conv encoder -> diagonal Gaussian
-> decoder (``--decoder``, default ``conv-decoder``); L1 plus a small KL term, weighted as LDM:
``l1_weight * mean|x_hat - x| + kl_weight * KL / (3 H W)`` (KL summed over the latent; LDM sums
both terms over their elements, here divided by the 3 H W image values).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from vfmbench import perf
from vfmbench.hookspecs import hookimpl
from vfmbench.interfaces import DiagonalGaussian, Phase, Tokenizer, to_float
from vfmbench.specs import TokenizerSpec
from vfmbench_plugins.layers import ConvEncoder


@dataclass
class KlVaeArgs:
    latent_channels: int = 4
    downsample: int = 8
    base_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    blocks: int = 2
    l1_weight: float = 1.0
    kl_weight: float = 1e-6


class KlVae(Tokenizer):
    def __init__(self, args: KlVaeArgs, decoder: nn.Module):
        super().__init__(args.latent_channels, args.downsample)
        self.args = args
        self.encoder = ConvEncoder(2 * args.latent_channels, args.downsample, args.base_channels, args.channel_mult, args.blocks)
        self.decoder = decoder

    def encode(self, images):
        mean, logvar = self.encoder(to_float(images)).float().chunk(2, dim=1)  # fp32 latent and KL under autocast
        return DiagonalGaussian(mean, logvar)

    def decode(self, z):
        return self.decoder(z)

    # -- precision and speed switches (vfmbench.perf) --
    def set_grad_checkpointing(self, enabled: bool) -> None:
        self.encoder.set_grad_checkpointing(enabled)
        perf.set_grad_checkpointing(self.decoder, enabled, f"decoder {type(self.decoder).__name__}")

    def set_channels_last(self, enabled: bool) -> None:
        self.encoder.set_channels_last(enabled)
        perf.set_channels_last(self.decoder, enabled)

    def compile_targets(self) -> list[nn.Module]:
        return [self.encoder, self.decoder]

    def training_phases(self, lr: float) -> list[Phase]:
        return [Phase("g", [p for p in self.parameters() if p.requires_grad], lr, betas=(0.9, 0.99))]

    def phase_loss(self, phase, images, labels, nimg):
        target = to_float(images)
        post = self.encode(images)
        recon = self.decode(post.sample())
        l1 = (recon - target).abs().mean()
        kl = post.kl().mean()
        return self.args.l1_weight * l1 + self.args.kl_weight * kl / target[0].numel(), {"l1": float(l1.detach()), "kl": float(kl.detach())}


def build(args: KlVaeArgs, ctx) -> KlVae:
    return KlVae(args, ctx.decoder(args.latent_channels, args.downsample, default="conv-decoder"))


@hookimpl
def register_tokenizers(register):
    register(
        TokenizerSpec(
            name="kl-vae",
            description="Plain KL autoencoder with a trainable conv encoder (LDM AutoencoderKL shape), trained from scratch",
            factory=build,
            config=KlVaeArgs,
            version="1",
            source="vfmbench",
            paper="Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models",
            license="Apache-2.0",
            latent_channels=4,
            downsample=8,
            uses_vfm=False,
            uses_decoder=True,
            default_decoder="conv-decoder",
            normalisation="per-channel",
        )
    )
