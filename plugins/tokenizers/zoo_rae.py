"""Plugin: the released representation autoencoder (RAE, Zheng et al. 2025) of the zoo, through
diffusers' ``AutoencoderRAE``: frozen DINOv2-B/14 with registers (final LayerNorm without affine)
+ a ViT-XL decoder.

* Input is [0, 1]; the class resizes to 224 (bicubic) and applies the ImageNet mean/std itself;
  the decoder returns 256 px in [0, 1] (brief pitfall 3). The spec's ``input_range`` says so and
  the shared base converts.
* The class's ``encode`` already applies the release's **per-position** statistics
  ([C, H, W] ``latents_mean`` / ``latents_std``: (z - mean) / (std + 1e-5), then the scaling factor).
  This tokenizer's raw latent is the token grid (the class's own inverse applied), its shipped
  ``normalize`` is the class's per-position map; ``per-channel`` uses the runner's statistics.
* Deterministic (noise augmentation is training-only).

The SigLIP2 variant cannot be built with transformers 5 (brief pitfall 2); it is not registered.
"""
from __future__ import annotations

import torch

from vfmbench.hookspecs import hookimpl
from vfmbench_plugins.tokenizers.released import Release, ReleasedTokenizer, kl_meta, release_spec


class RaeRelease(ReleasedTokenizer):
    def _shipped(self) -> bool:
        return self.args.normalisation == "shipped"

    def _to_release(self, z: torch.Tensor) -> torch.Tensor:
        return self.model._normalize_latents(z) * self.model.config.scaling_factor

    def _from_release(self, z: torch.Tensor) -> torch.Tensor:
        return self.model._denormalize_latents(z / self.model.config.scaling_factor)

    def moments(self, x: torch.Tensor):
        return self._from_release(self.model.encode(x).latent), None

    def reconstruct_pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self._to_release(z)).sample

    def shipped_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A per-channel summary (mean over positions) of the per-position statistics; ``normalize`` uses the full ones."""
        m, s = self.model._latents_mean.detach().float(), self.model._latents_std.detach().float()
        c = self.latent_channels
        if m.is_meta or m.numel() < c:
            return torch.zeros(c), torch.ones(c)
        return m.reshape(c, -1).mean(1), (s.reshape(c, -1) + 1e-5).mean(1) / self.model.config.scaling_factor

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return self._to_release(z) if self._shipped() else super().normalize(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return self._from_release(z) if self._shipped() else super().denormalize(z)


def _tiny_stats(c: int, g: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"latents_mean": (torch.randn(c, g, g, generator=gen) * 0.1).tolist(),
            "latents_std": (torch.rand(c, g, g, generator=gen) + 0.5).tolist()}


ARCH = dict(_class_name="AutoencoderRAE", encoder_type="dinov2", encoder_hidden_size=768, encoder_patch_size=14, encoder_num_hidden_layers=12,
            decoder_hidden_size=1152, decoder_num_hidden_layers=28, decoder_num_attention_heads=16, decoder_intermediate_size=4096,
            patch_size=16, encoder_input_size=224, image_size=256, num_channels=3, noise_tau=0.0, reshape_to_2d=True, scaling_factor=1.0)
# CPU size: one encoder layer at the release's width (the latent keeps its 768 channels), 56 px encoder
# input = a 4x4 grid, decoded to 64 px by a one-layer 64-wide decoder.
TINY = {"encoder_num_hidden_layers": 1, "encoder_input_size": 56, "image_size": 64, "decoder_hidden_size": 64,
        "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2, "decoder_intermediate_size": 128, **_tiny_stats(768, 4)}

RELEASES = (
    Release("rae-dinov2-b", "RAE: frozen DINOv2-B/14 with registers + ViT-XL decoder (noise-augmented, tau 0.8), diffusers format",
            "AutoencoderRAE", ARCH, kl_meta(
        release="nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08", license="MIT (code); DINOv2 weights Apache-2.0",
        fetch="hf download nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08 --local-dir DIR",
        latent_channels=768, downsample=16, encoder_params_m=86.6, decoder_params_m=415.1, native_resolution=256, input_range="[0, 1]",
        deterministic=True, shipped_normalisation="per-position mean/std [768, 16, 16] (stat.pt, in the config)",
        paper="Zheng, Ma, Tong & Xie 2025, Diffusion Transformers with Representation Autoencoders (arXiv 2510.11690)",
        source="https://huggingface.co/nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08"),
            encoder_prefixes=("encoder.",), decoder_prefixes=("decoder.",), tiny=TINY, latent_keys=("encoder_type", "encoder_hidden_size", "encoder_patch_size")),
)


@hookimpl
def register_tokenizers(register):
    for release in RELEASES:
        register(release_spec(RaeRelease, release))
