"""Plugin: the FLUX.2 VAE of the zoo, through its own diffusers class ``AutoencoderKLFlux2``.

Its diffusion-space latent is the 32-channel f8 posterior, 2x2-patchified to 128 channels at f16
(the FLUX.2 pipeline's patchify, channel = c * 4 + 2 * dy + dx, i.e. ``pixel_unshuffle``), then
normalised by the class's affine-free BatchNorm running statistics:
(z - running_mean) / sqrt(running_var + batch_norm_eps). This tokenizer's latent *is* the
patchified one (f16, 128 channels), so the BatchNorm statistics are its per-channel normalisation.
Loading it with ``AutoencoderKL`` would be wrong (no ``bn``; brief pitfall 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vfmbench.hookspecs import hookimpl
from vfmbench_plugins.tokenizers.released import Release, ReleasedTokenizer, kl_meta, release_spec


class Flux2Release(ReleasedTokenizer):
    def moments(self, x: torch.Tensor):
        dist = self.model.encode(x).latent_dist
        return F.pixel_unshuffle(dist.mean, 2), F.pixel_unshuffle(dist.logvar, 2)

    def reconstruct_pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(F.pixel_shuffle(z, 2)).sample

    def shipped_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.model.bn
        return bn.running_mean.detach().float().clone(), torch.sqrt(bn.running_var.detach().float() + self.model.config.batch_norm_eps)


ARCH = dict(_class_name="AutoencoderKLFlux2", in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, act_fn="silu",
            latent_channels=32, norm_num_groups=32, sample_size=1024, use_quant_conv=True, use_post_quant_conv=True,
            mid_block_add_attention=True, batch_norm_eps=1e-4, batch_norm_momentum=0.1, patch_size=[2, 2])

RELEASES = (
    Release("flux2-vae", "FLUX.2 VAE (AutoencoderKLFlux2): f8 32 channels, patchified 2x2 to f16 128 channels, BatchNorm statistics",
            "AutoencoderKLFlux2", ARCH, kl_meta(
        release="black-forest-labs/FLUX.2-dev (vae/)", license="Apache-2.0 (VAE, per the BFL blog via a mirror card)",
        fetch="hf download black-forest-labs/FLUX.2-dev vae/config.json vae/diffusion_pytorch_model.safetensors --local-dir DIR (gated)",
        latent_channels=128, downsample=16, encoder_params_m=34.4, decoder_params_m=49.6, native_resolution=1024,
        shipped_normalisation="BatchNorm running mean/var (eps 1e-4) on the 128 patchified channels",
        paper="Black Forest Labs 2025, FLUX.2", source="https://huggingface.co/black-forest-labs/FLUX.2-dev"),
            encoder_prefixes=("encoder.", "quant_conv."), decoder_prefixes=("decoder.", "post_quant_conv."),
            tiny={"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}),
)


@hookimpl
def register_tokenizers(register):
    for release in RELEASES:
        register(release_spec(Flux2Release, release))
