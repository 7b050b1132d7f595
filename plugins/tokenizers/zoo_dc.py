"""Plugin: the released deep-compression autoencoders (DC-AE, Chen et al. 2024) of the zoo.

``AutoencoderDC`` is deterministic: ``encode(x).latent`` is the latent (no posterior), so the
zoo's posterior-mean protocol is its only protocol. The shipped normalisation is a scaling factor
from the efficientvit README (the diffusers ``-in-1.0`` configs do not carry it), kept as release data.
Configs: diffusers' conversion of the ``-in-1.0`` releases (block types, widths, depths, norms).
"""
from __future__ import annotations

import torch

from vfmbench.hookspecs import hookimpl
from vfmbench_plugins.tokenizers.released import Release, ReleasedTokenizer, kl_meta, release_spec


class DcRelease(ReleasedTokenizer):
    """``AutoencoderDC``: a point latent and a decoder."""

    def moments(self, x: torch.Tensor):
        return self.model.encode(x).latent, None

    def reconstruct_pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z).sample


def _dc_arch(latent_channels: int, widths: list[int], enc_depth: list[int], dec_depth: list[int]) -> dict:
    n = len(widths)
    return dict(_class_name="AutoencoderDC", in_channels=3, latent_channels=latent_channels, attention_head_dim=32,
                encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * (n - 3),
                decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * (n - 3),
                encoder_block_out_channels=widths, decoder_block_out_channels=widths,
                encoder_layers_per_block=enc_depth, decoder_layers_per_block=dec_depth,
                encoder_qkv_multiscales=[[]] * n, decoder_qkv_multiscales=[[]] * n,
                upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
                decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * (n - 3), decoder_act_fns=["relu"] * 3 + ["silu"] * (n - 3),
                encoder_out_shortcut=True, decoder_in_shortcut=True, decoder_conv_act_fn="relu", scaling_factor=1.0)


def _tiny(n: int, latent_channels: int) -> dict:
    """CPU size: 32 channels per level, the last as wide as the latent (the shortcuts split or repeat channels)."""
    widths = [32] * (n - 1) + [max(32, latent_channels)]
    return {"encoder_block_out_channels": widths, "decoder_block_out_channels": widths,
            "encoder_layers_per_block": [0] + [1] * (n - 1), "decoder_layers_per_block": [0] + [1] * (n - 1)}


PAPER = "Chen et al. 2024, Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models (arXiv 2410.10733)"
LICENSE = "Apache-2.0 (card metadata; check the later LICENSE.txt)"


def _fetch(repo: str) -> str:
    return f"hf download {repo} config.json diffusion_pytorch_model.safetensors --local-dir DIR"


RELEASES = (
    Release("dc-ae-f32c32-in", "DC-AE f32c32 (ImageNet, 1.0), deterministic", "AutoencoderDC",
            _dc_arch(32, [128, 256, 512, 512, 1024, 1024], [0, 4, 8, 2, 2, 2], [0, 5, 10, 2, 2, 2]), kl_meta(
        release="mit-han-lab/dc-ae-f32c32-in-1.0-diffusers", fetch=_fetch("mit-han-lab/dc-ae-f32c32-in-1.0-diffusers"), license=LICENSE,
        latent_channels=32, downsample=32, encoder_params_m=123.2, decoder_params_m=200.2, native_resolution=512, deterministic=True,
        shipped_normalisation="scale 0.3189 (efficientvit README)", paper=PAPER, source="https://github.com/mit-han-lab/efficientvit"),
            encoder_prefixes=("encoder.",), decoder_prefixes=("decoder.",), scale=0.3189, tiny=_tiny(6, 32)),
    Release("dc-ae-f64c128-in", "DC-AE f64c128 (ImageNet, 1.0), deterministic", "AutoencoderDC",
            _dc_arch(128, [128, 256, 512, 512, 1024, 1024, 2048], [0, 4, 8, 2, 2, 2, 2], [0, 5, 10, 2, 2, 2, 2]), kl_meta(
        release="mit-han-lab/dc-ae-f64c128-in-1.0-diffusers", fetch=_fetch("mit-han-lab/dc-ae-f64c128-in-1.0-diffusers"), license=LICENSE,
        latent_channels=128, downsample=64, encoder_params_m=264.6, decoder_params_m=412.4, native_resolution=512, deterministic=True,
        shipped_normalisation="scale 0.2889 (efficientvit README)", paper=PAPER, source="https://github.com/mit-han-lab/efficientvit"),
            encoder_prefixes=("encoder.",), decoder_prefixes=("decoder.",), scale=0.2889, tiny=_tiny(7, 128)),
)


@hookimpl
def register_tokenizers(register):
    for release in RELEASES:
        register(release_spec(DcRelease, release))
