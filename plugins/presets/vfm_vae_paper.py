"""Plugin: the ``vfm-vae-paper`` preset, VFM-VAE's four-stage tokenizer recipe (Bi et al. 2025).

SigLIP2-L/16 at 512 px (256 px images upsampled x2), taps [0, 12, -1]; f16d32 latents; the
paper's decoder; Adam betas (0, 0.99), global batch 512, EMA half-life 160 k images; 44 M images
in four stages, each starting from the previous stage's weights:

=====================  ==========  =====  ============================================  ==========================================
stage                  images      lr     trains                                        losses
=====================  ==========  =====  ============================================  ==========================================
0 strong-alignment     20 M        1e-4   encoder head, VF proj, post-quant, decoder    L1 1, LPIPS 10, KL 1e-6, VF 5 (adaptive),
                                                                                        GAN 1, multi-scale L1 0.1 (first 5 M);
                                                                                        equivariance
1 weak-alignment       20 M        1e-4   same                                          as stage 0 with VF 1, no multi-scale L1
2 ssim-finetune        1 M         5e-5   post-quant, mapping, synthesis (head frozen)  L1 1, LPIPS 2, SSIM 1, GAN 1; equivariance
3 patchgan-finetune    3 M         5e-5   high-resolution half of the decoder           GAN 1, PatchGAN 1, feature matching 10
=====================  ==========  =====  ============================================  ==========================================

Data: ImageNet-1k in the ImageNet folder layout (``--set data.root=DIR``). The tokenizer trains on
VFM-VAE's augmentation (``data.train_transform=vfm-vae-random-crop``, images with a short side of
at least 256); reconstruction metrics use its reported resize + centre crop
(``data.eval_transform=resize-center-crop``; ``adm-center-crop`` for ADM-protocol rows); the latent
cache uses ADM's centre crop. The preset stops after
the tokenizer, its reconstruction metrics and the latent cache; diffusion presets build on it.
"""
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import PresetSpec

ADAPTER_AND_DECODER = ["encoder-head", "vf-proj", "post-quant", "mapping", "synthesis"]

STAGES = [
    {"name": "strong-alignment", "images": 20_000_000, "lr": 1e-4, "train": ADAPTER_AND_DECODER,
     "l1": 1.0, "lpips": 10.0, "ssim": 0.0, "kl": 1e-6, "vf": 5.0, "gan": 1.0, "patchgan": 0.0, "feature_matching": 0.0,
     "multiscale_l1": 0.1, "multiscale_images": 5_000_000, "equivariance": True},
    {"name": "weak-alignment", "images": 20_000_000, "lr": 1e-4, "train": ADAPTER_AND_DECODER,
     "l1": 1.0, "lpips": 10.0, "ssim": 0.0, "kl": 1e-6, "vf": 1.0, "gan": 1.0, "patchgan": 0.0, "feature_matching": 0.0,
     "multiscale_l1": 0.1, "multiscale_images": 0, "equivariance": True},
    {"name": "ssim-finetune", "images": 1_000_000, "lr": 5e-5, "train": ["post-quant", "mapping", "synthesis"],
     "l1": 1.0, "lpips": 2.0, "ssim": 1.0, "kl": 0.0, "vf": 0.0, "gan": 1.0, "patchgan": 0.0, "feature_matching": 0.0,
     "multiscale_l1": 0.1, "multiscale_images": 0, "equivariance": True},
    {"name": "patchgan-finetune", "images": 3_000_000, "lr": 5e-5, "train": ["decoder-high"],
     "l1": 0.0, "lpips": 0.0, "ssim": 0.0, "kl": 0.0, "vf": 0.0, "gan": 1.0, "patchgan": 1.0, "feature_matching": 10.0,
     "multiscale_l1": 0.1, "multiscale_images": 0, "equivariance": False},
]

PAPER = {
    "run": {"stages": ["tokenizer", "recon-eval", "latents", "latent-eval", "results"]},
    # VFM-VAE's training data (training/data_wds.py, imagenet_train_hr_indices): random crops of 0.5-1 of the
    # short side, Lanczos, flips, images with a short side >= 256; rFID as its reconstruction tool (resize + centre crop)
    "data": {"dataset": "imagefolder", "resolution": 256, "train_transform": "vfm-vae-random-crop",
             "min_short_side": 256, "eval_transform": "resize-center-crop"},
    "vfm": {"name": "siglip2-l16-512", "size": "full", "pretrained": True, "layers": [0, 12, -1]},
    "tokenizer": {
        "name": "vfm-vae",
        "train": {"images": 44_000_000, "batch_size": 512, "lr": 1e-4, "ema_halflife_images": 160_000,
                  "ckpt_every_images": 1_000_000, "log_every_images": 10_000},
    },
    "metrics": {"recon_images": 50_000, "latent": {"uniformity": True}},
    "component_args": {
        "vfm-vae": {
            "latent_channels": 32, "downsample": 16, "compress_width": 64, "decompress_width": 512, "mlp_ratio": 2.0,
            "betas": [0.0, 0.99], "disc_vfm": "dino-s16", "disc_hooks": [0, 3, 6, 9, 12], "disc_resolution": 224,
            "safe_loss_factor": 10.0, "safe_loss_warmup_images": 50_000, "stages": STAGES,
        },
        "vfm-vae-decoder": {
            "channels": [512, 512, 512, 512, 256, 128], "layers": [7, 7, 7, 7, 5, 5], "kernel_sizes": [5, 5, 7, 7, 7, 7],
            "blur": [3, 3, 3, 5, 5, 5], "inject_blocks": [0, 1, 2, 3], "inject_channels": [512, 256, 128, 128],
            "attn_blocks": [0, 1, 2], "attn_depth": 2, "w_dim": 512, "const_noise": True, "noise_resolution": 256,
        },
    },
}


@hookimpl
def register_presets(register):
    register(
        PresetSpec(
            name="vfm-vae-paper",
            description="VFM-VAE's four-stage tokenizer recipe: SigLIP2-L/16, f16d32, 44 M ImageNet images at batch 512 (needs GPUs and weights)",
            values=PAPER,
            version="1",
            source="https://github.com/tianciB/VFM-VAE configs (stage 0-3), re-expressed as data",
            paper="Bi et al. 2025, Vision Foundation Models Can Be Good Tokenizers for Latent Diffusion Models (arXiv 2510.18457)",
            license="Apache-2.0",
        )
    )
