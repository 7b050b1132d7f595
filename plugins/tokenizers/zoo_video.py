"""Plugin: image VAEs of video families in the zoo: Wan 2.1 (``AutoencoderKLWan``) and Qwen-Image
(``AutoencoderKLQwenImage``), both 3-D causal VAEs used on one frame.

An image is a clip of one frame ([B, 3, 1, H, W]); the causal encoder maps the first frame to one
latent frame, f8 with 16 channels. Decoding returns one frame, clamped to [-1, 1] by the class.
The shipped normalisation is the config's 16 per-channel ``latents_mean`` / ``latents_std``:
(z - mean) / std, as the Wan and Qwen-Image pipelines apply it.
"""
from __future__ import annotations

import torch

from vfmbench.hookspecs import hookimpl
from vfmbench_plugins.tokenizers.released import Release, ReleasedTokenizer, kl_meta, release_spec


class OneFrameRelease(ReleasedTokenizer):
    def moments(self, x: torch.Tensor):
        dist = self.model.encode(x.unsqueeze(2)).latent_dist
        return dist.mean.squeeze(2), dist.logvar.squeeze(2)

    def reconstruct_pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z.unsqueeze(2)).sample.squeeze(2)


# The released configs are the classes' defaults (base_dim 96, dim_mult 1,2,4,4, two ResNet blocks,
# temporal downsampling on the last two levels; the 16 statistics are the class defaults).
WAN = dict(_class_name="AutoencoderKLWan", base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
           temperal_downsample=[False, True, True], dropout=0.0)
QWEN = dict(WAN, _class_name="AutoencoderKLQwenImage")
TINY = {"base_dim": 16, "num_res_blocks": 1}
META = dict(latent_channels=16, downsample=8, encoder_params_m=53.6, decoder_params_m=73.3, license="Apache-2.0",
            shipped_normalisation="16 per-channel latents_mean / latents_std (config)")

RELEASES = (
    Release("wan21-vae", "Wan 2.1 VAE (3-D causal, one frame), f8 16 channels", "AutoencoderKLWan", WAN, kl_meta(
        release="Wan-AI/Wan2.1-T2V-1.3B-Diffusers (vae/)", native_resolution=480,
        fetch="hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/config.json vae/diffusion_pytorch_model.safetensors --local-dir DIR",
        paper="Wan Team 2025, Wan: Open and Advanced Large-Scale Video Generative Models (arXiv 2503.20314)",
        source="https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers", **META), tiny=TINY, latent_keys=("z_dim",)),
    Release("qwen-image-vae", "Qwen-Image VAE (Wan-2.1 architecture, image-tuned decoder), one frame, f8 16 channels",
            "AutoencoderKLQwenImage", QWEN, kl_meta(
        release="Qwen/Qwen-Image (vae/)", native_resolution=1328,
        fetch="hf download Qwen/Qwen-Image vae/config.json vae/diffusion_pytorch_model.safetensors --local-dir DIR",
        paper="Qwen Team 2025, Qwen-Image Technical Report (arXiv 2508.02324)", source="https://huggingface.co/Qwen/Qwen-Image", **META),
            tiny=TINY, latent_keys=("z_dim",)),
)


@hookimpl
def register_tokenizers(register):
    for release in RELEASES:
        register(release_spec(OneFrameRelease, release))
