"""Plugin: the released ``AutoencoderKL`` tokenizers of the zoo (docs/zoo.md).

One loading family, many releases: SD-VAE ft-EMA / ft-MSE, SDXL-VAE, SD3.5-VAE, FLUX.1-VAE,
EQ-VAE (and its EMA), VA-VAE f16d32 (the original LightningDiT checkpoint and the diffusers-format
port), REPA-E's E2E-VA-VAE and MAR KL-16 (original checkpoint). Each is a ``Release`` record below:
the release's ``config.json`` (architecture), its spec metadata and, for the original-layout
checkpoints, how they map onto ``AutoencoderKL`` (``sd_vae.LDM_KEY_TABLE``). Parameter counts are
the brief's (shared/reference/tokenizer-zoo.md, counted from the release configs with diffusers).

The latent is the posterior over ``AutoencoderKL``'s raw latent (mean by default, see
``released``); the shipped normalisation comes from the release (config scale/shift, config
``latents_mean``/``latents_std``, or VA-VAE's ``latents_stats.pt``).
"""
from __future__ import annotations

import torch

from vfmbench.hookspecs import hookimpl
from vfmbench_plugins.tokenizers.released import Release, ReleasedTokenizer, kl_meta, release_spec


class KlRelease(ReleasedTokenizer):
    """``AutoencoderKL``: a diagonal Gaussian posterior (``latent_dist``) and a decoder."""

    def moments(self, x: torch.Tensor):
        dist = self.model.encode(x).latent_dist
        return dist.mean, dist.logvar

    def reconstruct_pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z).sample


def _sd_arch(**over) -> dict:
    """The LDM kl-f8 architecture (SD 1.x/2.x/XL, SD3/FLUX.1 with 16 channels)."""
    base = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
                norm_num_groups=32, act_fn="silu", sample_size=256, scaling_factor=0.18215)
    return {**base, **over}


def _f16_arch(latent_channels: int, decoder_attention: bool) -> dict:
    """The LDM f16 architecture of VA-VAE / MAR (ch 128, ch_mult 1,1,2,2,4, attention at the 16x16 level of the encoder)."""
    up = (["AttnUpDecoderBlock2D"] if decoder_attention else ["UpDecoderBlock2D"]) + ["UpDecoderBlock2D"] * 4
    return _sd_arch(latent_channels=latent_channels, block_out_channels=[128, 128, 256, 256, 512],
                    down_block_types=["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"], up_block_types=up, scaling_factor=1.0)


def _hf(repo: str, sub: str = "") -> str:
    files = " ".join(f"{sub}{f}" for f in ("config.json", "diffusion_pytorch_model.safetensors"))
    return f"hf download {repo} {files} --local-dir DIR"


SD_META = dict(latent_channels=4, downsample=8, encoder_params_m=34.2, decoder_params_m=49.5)
SD3_META = dict(latent_channels=16, downsample=8, encoder_params_m=34.3, decoder_params_m=49.6, native_resolution=1024)
VAVAE_META = dict(latent_channels=32, downsample=16, encoder_params_m=28.4, decoder_params_m=41.4, native_resolution=256,
                  paper="Yao & Wang 2025, Reconstruction vs. Generation (arXiv 2501.01423)")
REPAE_PAPER = "Leng et al. 2025, REPA-E: Unlocking VAE for End-to-End Tuning with Latent Diffusion Transformers (arXiv 2504.10483)"
EQ_PAPER = "Kouzelis et al. 2025, EQ-VAE: Equivariance Regularized Latent Space (arXiv 2502.09509)"
LDM = "Rombach et al. 2022 (arXiv 2112.10752)"
TINY8 = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}  # CPU-size copies: same classes and key layout
TINY16 = {"block_out_channels": [32, 32, 32, 32, 32], "layers_per_block": 1}

RELEASES = (
    Release("sd-vae-ft-ema", "SD-VAE kl-f8, decoder fine-tuned with EMA (Stability)", "AutoencoderKL", _sd_arch(), kl_meta(
        release="stabilityai/sd-vae-ft-ema", fetch=_hf("stabilityai/sd-vae-ft-ema"), license="MIT", native_resolution=256,
        shipped_normalisation="scale 0.18215", paper=LDM, source="https://huggingface.co/stabilityai/sd-vae-ft-ema", **SD_META), tiny=TINY8),
    Release("sd-vae-ft-mse", "SD-VAE kl-f8, decoder fine-tuned with MSE emphasis (Stability)", "AutoencoderKL", _sd_arch(), kl_meta(
        release="stabilityai/sd-vae-ft-mse", fetch=_hf("stabilityai/sd-vae-ft-mse"), license="MIT", native_resolution=256,
        shipped_normalisation="scale 0.18215", paper=LDM, source="https://huggingface.co/stabilityai/sd-vae-ft-mse", **SD_META), tiny=TINY8),
    Release("sdxl-vae", "SDXL VAE kl-f8 (fp32; NaN in fp16 without the fp16-fix weights)", "AutoencoderKL",
            _sd_arch(sample_size=1024, scaling_factor=0.13025), kl_meta(
        release="stabilityai/sdxl-vae", fetch=_hf("stabilityai/sdxl-vae"), license="MIT", native_resolution=1024,
        shipped_normalisation="scale 0.13025", paper="Podell et al. 2023, SDXL (arXiv 2307.01952)",
        source="https://huggingface.co/stabilityai/sdxl-vae", **SD_META), tiny=TINY8),
    Release("sd35-vae", "SD3.5 VAE kl-f8, 16 channels, no quant convs (gated release)", "AutoencoderKL",
            _sd_arch(latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                     use_post_quant_conv=False), kl_meta(
        release="stabilityai/stable-diffusion-3.5-large (vae/)", fetch=_hf("stabilityai/stable-diffusion-3.5-large", "vae/") + " (gated: accept the licence, log in)",
        license="Stability AI Community", shipped_normalisation="(z - 0.0609) * 1.5305", paper="Esser et al. 2024, SD3 (arXiv 2403.03206)",
        source="https://huggingface.co/stabilityai/stable-diffusion-3.5-large", **SD3_META), tiny=TINY8),
    Release("flux1-vae", "FLUX.1 VAE kl-f8, 16 channels (schnell copy, Apache-2.0)", "AutoencoderKL",
            _sd_arch(latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                     use_post_quant_conv=False), kl_meta(
        release="black-forest-labs/FLUX.1-schnell (vae/)", fetch=_hf("black-forest-labs/FLUX.1-schnell", "vae/"), license="Apache-2.0",
        shipped_normalisation="(z - 0.1159) * 0.3611", paper="Black Forest Labs 2024, FLUX.1",
        source="https://huggingface.co/black-forest-labs/FLUX.1-schnell", **SD3_META), tiny=TINY8),
    Release("eq-vae", "EQ-VAE: SD-VAE fine-tuned with an equivariance regulariser", "AutoencoderKL", _sd_arch(), kl_meta(
        release="zelaki/eq-vae", fetch=_hf("zelaki/eq-vae"), license="not stated", native_resolution=256,
        shipped_normalisation="scale 0.18215 (SD's; the card states none)", paper=EQ_PAPER, source="https://huggingface.co/zelaki/eq-vae",
        **SD_META), tiny=TINY8),
    Release("eq-vae-ema", "EQ-VAE, EMA weights", "AutoencoderKL", _sd_arch(), kl_meta(
        release="zelaki/eq-vae-ema", fetch=_hf("zelaki/eq-vae-ema"), license="not stated", native_resolution=256,
        shipped_normalisation="scale 0.18215 (SD's; the card states none)", paper=EQ_PAPER, source="https://huggingface.co/zelaki/eq-vae-ema",
        **SD_META), tiny=TINY8),
    Release("va-vae-f16d32", "VA-VAE f16d32 (DINOv2-aligned), original LightningDiT checkpoint + latents_stats.pt", "AutoencoderKL",
            _f16_arch(32, decoder_attention=True), kl_meta(
        release="hustvl/vavae-imagenet256-f16d32-dinov2", license="MIT", shipped_normalisation="per-channel mean/std (latents_stats.pt)",
        fetch="hf download hustvl/vavae-imagenet256-f16d32-dinov2 vavae-imagenet256-f16d32-dinov2.pt --local-dir DIR; "
              "hf download hustvl/LightningDiT-XL-800ep latents_stats.pt --local-dir DIR",
        source="https://github.com/hustvl/LightningDiT", **VAVAE_META),
            layout="ldm", ignore_keys=("linear_proj.weight",), stats_file="latents_stats.pt", tiny=TINY16),
    Release("va-vae-f16d32-hf", "VA-VAE f16d32, diffusers-format port", "AutoencoderKL", _f16_arch(32, decoder_attention=True), kl_meta(
        release="REPA-E/vavae-hf", fetch=_hf("REPA-E/vavae-hf"), license="MIT", shipped_normalisation="config latents_mean / latents_std",
        source="https://huggingface.co/REPA-E/vavae-hf", **VAVAE_META), tiny=TINY16),
    Release("e2e-vavae", "REPA-E E2E-VA-VAE (VA-VAE tuned end to end with the diffusion model), diffusers format", "AutoencoderKL",
            _f16_arch(32, decoder_attention=True), kl_meta(
        release="REPA-E/e2e-vavae-hf", fetch=_hf("REPA-E/e2e-vavae-hf"), license="MIT", shipped_normalisation="config latents_mean / latents_std",
        source="https://huggingface.co/REPA-E/e2e-vavae-hf", **{**VAVAE_META, "paper": REPAE_PAPER}), tiny=TINY16),
    Release("mar-kl16", "MAR KL-16 (LDM f16, 16 channels; no attention in the decoder levels), original checkpoint", "AutoencoderKL",
            _f16_arch(16, decoder_attention=False), kl_meta(
        release="LTH14/mar kl16.ckpt", license="MIT", native_resolution=256, shipped_normalisation="scale 0.2325",
        fetch="python util/download.py in a clone of github.com/LTH14/mar (writes pretrained_models/vae/kl16.ckpt); pass that folder",
        latent_channels=16, downsample=16, encoder_params_m=28.3, decoder_params_m=38.2,
        paper="Li et al. 2024, Autoregressive Image Generation without Vector Quantization (arXiv 2406.11838)",
        source="https://github.com/LTH14/mar"), layout="ldm", scale=0.2325, tiny=TINY16),
)


@hookimpl
def register_tokenizers(register):
    for release in RELEASES:
        register(release_spec(KlRelease, release))
