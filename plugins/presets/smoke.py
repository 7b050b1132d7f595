"""Plugin: the ``smoke`` preset, the embedded default: CPU, offline, tiny models, a few minutes on 2 cores.

Every component is the real code path at test size: a random-init VFM of the real library class
(``vfm.size=tiny``), the built-in procedural ``shapes`` dataset at 64 px, and a deterministic
He-initialised Inception file instead of the official one. Every number it produces is labelled
``smoke`` and is never shown beside paper-protocol numbers.
"""
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import PresetSpec

SMOKE = {
    "run": {"smoke": True, "device": "auto", "seed": 0},
    "data": {"dataset": "shapes", "resolution": 64, "train_images": 2048, "val_images": 256},
    "vfm": {"name": "siglip", "size": "tiny", "pretrained": False},
    "tokenizer": {
        "name": "vfm-vae",
        "train": {"images": 3072, "batch_size": 32, "lr": 2e-3, "ema_halflife_images": 500, "ckpt_every_images": 1024},
    },
    "diffusion": {
        "name": "flow-dit",
        "train": {"images": 8192, "batch_size": 64, "lr": 1e-3, "ema_halflife_images": 1000, "ckpt_every_images": 2048},
        "sample": {"num_images": 128, "sampler": "euler", "steps": 16, "cfg_scale": 1.0, "batch_size": 64},
    },
    "metrics": {"recon_images": 128, "batch_size": 64, "isc_splits": 4, "probe": {"epochs": 100}},
    "component_args": {
        "vfm-vae": {
            "latent_channels": 8, "compress_width": 16, "decompress_width": 64, "disc_hooks": [2, 4], "disc_resolution": 64,
            "patchgan_ndf": 8, "patchgan_scales": 2, "eq_latent_scales": [0.5, 1.0], "eq_image_scales": [0.5],
            "safe_loss_warmup_images": 256, "lpips_images": 2,
            "stages": [  # the paper's four stages, a few steps each (LPIPS weight 1: the smoke VGG is random)
                {"name": "strong-alignment", "images": 512, "lpips": 1.0, "vf": 5.0, "multiscale_images": 256},
                {"name": "weak-alignment", "images": 256, "lpips": 1.0, "vf": 1.0},
                {"name": "ssim-finetune", "images": 256, "train": ["post-quant", "mapping", "synthesis"], "lpips": 1.0, "ssim": 1.0, "kl": 0.0, "vf": 0.0},
                {"name": "patchgan-finetune", "images": 256, "train": ["decoder-high"], "l1": 0.0, "lpips": 0.0, "kl": 0.0, "vf": 0.0,
                 "patchgan": 1.0, "feature_matching": 10.0, "equivariance": False},
            ],
        },
        "vfm-vae-decoder": {
            "channels": [64, 64, 32, 16], "layers": [2, 2, 1, 1], "kernel_sizes": [5, 5, 7, 7], "blur": [3, 3, 3, 5],
            "inject_blocks": [0, 1], "inject_channels": [64, 32], "attn_blocks": [0], "attn_depth": 1, "attn_heads": 4,
            "w_dim": 64, "noise_resolution": 64,
        },
        "sd-vae-decoder": {"base_channels": 16, "channel_mult": [1, 1, 2, 2, 4], "blocks": 1},
        "sd-vae-msf-decoder": {"base_channels": 16, "channel_mult": [1, 1, 2, 2, 4], "blocks": 1},
        "kl-vae": {"latent_channels": 4, "downsample": 8, "base_channels": 32, "channel_mult": [1, 2, 2], "blocks": 1},
        "conv-decoder": {"base_channels": 32, "channel_mult": [1, 2, 2, 2], "blocks": 1},
        "flow-dit": {"width": 128, "depth": 4, "heads": 4, "patch_size": 1},
        "sd-vae": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "loss": {"lpips_images": 4}},
        "va-vae": {"latent_channels": 8, "base_channels": 32, "channel_mult": [1, 1, 2], "blocks": 1, "loss": {"lpips_images": 4}},
        "distill": {"latent_channels": 8, "base_channels": 32, "channel_mult": [1, 1, 2], "blocks": 1, "projector_hidden": 64, "loss": {"lpips_images": 4}},
        "rae": {"loss": {"lpips_images": 4}},
        "ldm-decoder": {"base_channels": 32, "channel_mult": [1, 1, 2], "blocks": 1},
        "vit-decoder": {"width": 64, "depth": 2, "heads": 2},
        "lightningdit": {"size": "tiny", "eval_every_images": 4096, "eval_steps": 8},
        "sit": {"size": "tiny", "align_dim": 64, "align_depth": 2, "projector_dim": 128, "eval_every_images": 4096, "eval_steps": 8},
    },
}


@hookimpl
def register_presets(register):
    register(
        PresetSpec(
            name="smoke",
            description="Embedded default: CPU, offline, tiny random-init models on the procedural shapes dataset (numbers labelled smoke)",
            values=SMOKE,
            version="1",
            source="vfmbench",
            license="Apache-2.0",
        )
    )
