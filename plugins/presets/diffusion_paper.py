"""Plugin: the VFM-VAE paper's two diffusion recipes, at paper size and as CPU smoke variants.

``lightningdit-xl1-paper`` (brief §3.2): LightningDiT-XL/1 (patch 1 on 16x16x32 latents, QK-norm,
SwiGLU, RoPE, RMSNorm, cosine loss; 674,965,856 parameters as the reference module), AdamW lr 2e-4,
betas (0.9, 0.95), no weight decay, no gradient clipping and bf16 autocast (as the reference trains),
batch 1024, label dropout 0.1, EMA 0.9999 per step; 600k steps (614.4M images) with log-normal t,
then uniform to 700k steps (716.8M images, about 560 epochs; LightningDiT issue #23). Sampler as
LightningDiT's ``inference.py`` with the VFM-VAE stage-1 yaml: Euler ODE on a 250-point grid
(``num_sampling_steps: 250`` = 249 Euler steps, so ``steps: 249`` here), timestep shift 0.3
(``s t / (1 + (s - 1) t)``, t = 0 noise: steps packed at the noise end), CFG 4.0 on latent channels
0-2 only (``guided_channels: 3``) and only for t >= 0.125, 50k samples with random labels.

``reg-sit-xl1-paper`` (brief §3.3): SiT-XL/1 with REG (QK-norm, REPA projector on block 8 to
DINOv2-B/14's final tokens, proj coefficient 0.5, DINOv2 class token as an extra noised token with
loss weight 0.03), uniform t, AdamW lr 2e-4, betas (0.9, 0.95), no weight decay, clip 1.0, batch
1024, label dropout 0.1, EMA 0.9999, no horizontal flips (``hflip: false``, as REG's loader);
800k steps (819.2M images, about 640 epochs); 684,766,240 parameters as the reference module.
Sampler (VFM-VAE ``sample.sh``): Euler-Maruyama SDE, 250 steps, CFG 4.0 on the latent and 4.0 on the
class token (``cls_cfg_scale``, here ``joint_cfg_scale``) over REG's guidance interval [0, 0.8]
(their t = 1 is noise; [0.2, 1] here). The DINOv2 targets are computed per
batch (``align_features=online``): cached for ImageNet and its flips they would take about 1 TB.
Tokenizer latents feeding REG make the paper's "dual-side alignment" (§3.4).

Both build on the ``vfm-vae-paper`` preset (ImageNet from an image folder at 256 px, ``--set
data.root=DIR``; the VFM-VAE tokenizer on SigLIP2-L/16 at 512 px, f16d32, 44M images over its four
stages, or ``--set tokenizer.weights=PATH`` for trained weights) and run every stage. EMA 0.9999
at batch 1024 is written as a half-life of
7,097,468 images (``1024 * ln 0.5 / ln 0.9999``), and a convergence evaluation every 16 epochs
(FID-10k of the EMA weights, 250 sampler steps, no guidance), which gives the gFID-versus-epochs
curve in ``diffusion/convergence.{jsonl,png}`` with points at 64 and 80 epochs among others.

``lightningdit-smoke`` and ``reg-sit-smoke`` are the ``smoke`` preset (CPU, tiny random-init
models, shapes at 64 px) with the same recipe shapes scaled down: schedule switches, samplers,
guidance, shift, and a convergence curve every 2048 images.
"""
from __future__ import annotations

import math

from vfmbench.config import STAGES, deep_merge
from vfmbench.hookspecs import hookimpl
from vfmbench.metrics.adm import ADM_IMAGENET256
from vfmbench.specs import PresetSpec
from vfmbench_plugins.presets.smoke import SMOKE
from vfmbench_plugins.presets.vfm_vae_paper import PAPER as TOKENIZER_PAPER

IMAGENET_TRAIN = 1_281_167
BATCH = 1024
EMA_HALFLIFE = round(BATCH * math.log(0.5) / math.log(0.9999))  # 7,097,468 images: EMA 0.9999 per step of 1024
EVAL_EVERY = 16 * IMAGENET_TRAIN  # 16 epochs: points at 64, 80, 480, 560 epochs among others

CONVERGENCE = {"eval_every_images": EVAL_EVERY, "eval_num_images": 10_000, "eval_steps": 250, "eval_cfg_scale": 1.0}

BASE = deep_merge(TOKENIZER_PAPER, {
    "run": {"smoke": False, "device": "auto", "seed": 0, "precision": "fp32", "stages": list(STAGES)},
    "data": {"num_workers": 8},
    # gFID/sFID/IS/precision/recall as the ADM evaluator: its reference batch (the run stops before any work
    # without it) and IS over 10 consecutive chunks of the 50k samples
    "metrics": {"recon_images": 50_000, "batch_size": 256, "reference": ADM_IMAGENET256, "isc_split_order": "consecutive"},
})

LIGHTNINGDIT_ARGS = {
    "size": "xl", "patch_size": 1, "qk_norm": True, "swiglu": True, "rope": True, "rmsnorm": True, "pos_embed": "sincos",
    "cos_loss_weight": 1.0, "label_dropout": 0.1, "time_sampling": "lognormal", "lognormal_mean": 0.0, "lognormal_std": 1.0,
    "time_sampling_until_images": 600_000 * BATCH, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.0, "grad_clip": 0.0,
    **CONVERGENCE,
}
LIGHTNINGDIT = {
    "diffusion": {
        "name": "lightningdit",
        "train": {"images": 700_000 * BATCH, "batch_size": BATCH, "lr": 2e-4, "ema_halflife_images": EMA_HALFLIFE,
                  "ckpt_every_images": 10_000 * BATCH, "log_every_images": 1_000 * BATCH, "precision": "bf16"},
        "sample": {"num_images": 50_000, "sampler": "euler", "steps": 249, "cfg_scale": 4.0, "cfg_interval": [0.125, 1.0],
                   "timestep_shift": 0.3, "guided_channels": 3, "label_sampling": "random", "batch_size": 256, "precision": "fp32"},
    },
    "component_args": {"lightningdit": LIGHTNINGDIT_ARGS},
}

REG_ARGS = {
    "size": "xl", "patch_size": 1, "qk_norm": True, "pos_embed": "sincos", "label_dropout": 0.1, "time_sampling": "uniform",
    "align": "reg", "align_vfm": "dinov2-b14", "align_vfm_layer": -1, "align_dim": 768, "align_depth": 8, "projector_dim": 2048,
    "proj_coeff": 0.5, "cls_coeff": 0.03, "align_features": "online", "hflip": False,
    "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.0, "grad_clip": 1.0,
    **CONVERGENCE,
}
REG = {
    "diffusion": {
        "name": "sit",
        "train": {"images": 800_000 * BATCH, "batch_size": BATCH, "lr": 2e-4, "ema_halflife_images": EMA_HALFLIFE,
                  "ckpt_every_images": 10_000 * BATCH, "log_every_images": 1_000 * BATCH},
        "sample": {"num_images": 50_000, "sampler": "euler-maruyama", "steps": 250, "cfg_scale": 4.0, "cfg_interval": [0.2, 1.0],
                   "joint_cfg_scale": 4.0, "timestep_shift": 1.0, "label_sampling": "random", "batch_size": 256, "precision": "fp32"},
    },
    "component_args": {"sit": REG_ARGS},
}

# The smoke variants: the smoke preset's sizes (its component_args hold the tiny models), the recipes' shapes.
SMOKE_TRAIN = {"images": 8192, "batch_size": 64, "lr": 1e-3, "ema_halflife_images": 1000, "ckpt_every_images": 2048}
LIGHTNINGDIT_SMOKE = {
    "diffusion": {
        "name": "lightningdit",
        "train": SMOKE_TRAIN,
        "sample": {"num_images": 128, "sampler": "euler", "steps": 16, "cfg_scale": 4.0, "cfg_interval": [0.125, 1.0],
                   "timestep_shift": 0.3, "guided_channels": 3, "batch_size": 64},
    },
    "component_args": {"lightningdit": {"time_sampling": "lognormal", "time_sampling_until_images": 7168, "eval_every_images": 2048}},
}
REG_SMOKE = {
    "diffusion": {
        "name": "sit",
        "train": SMOKE_TRAIN,
        "sample": {"num_images": 128, "sampler": "euler-maruyama", "steps": 16, "cfg_scale": 4.0, "cfg_interval": [0.2, 1.0],
                   "batch_size": 64},
    },
    "component_args": {"sit": {"align": "reg", "align_vfm": "dinov2-b14", "time_sampling": "uniform", "eval_every_images": 2048, "hflip": False}},
}

PRESETS = {
    "lightningdit-xl1-paper": (
        "VFM-VAE tokenizer + LightningDiT-XL/1, the paper's recipe (700k steps at batch 1024, bf16, no clipping; "
        "Euler on a 250-point grid, CFG 4.0 on channels 0-2 for t >= 0.125, shift 0.3 toward the noise), ImageNet 256",
        deep_merge(BASE, LIGHTNINGDIT),
    ),
    "reg-sit-xl1-paper": (
        "VFM-VAE tokenizer + REG SiT-XL/1 (DINOv2-B REPA + class token), the paper's recipe (800k steps at batch 1024, no flips, "
        "trained fp32 where REG uses fp16 mixed precision; SDE-250, CFG 4.0 on latent and class token for REG t <= 0.8)",
        deep_merge(BASE, REG),
    ),
    "lightningdit-smoke": ("smoke preset with a tiny LightningDiT in the paper recipe's shape (CPU, labelled smoke)", deep_merge(SMOKE, LIGHTNINGDIT_SMOKE)),
    "reg-sit-smoke": ("smoke preset with a tiny REG SiT in the paper recipe's shape (CPU, labelled smoke)", deep_merge(SMOKE, REG_SMOKE)),
}


@hookimpl
def register_presets(register):
    for name, (description, values) in PRESETS.items():
        suffix = "" if name.endswith("smoke") else " (GPU; --set data.root=IMAGENET_DIR)"
        register(PresetSpec(name=name, description=description + suffix, values=values, version="1", source="vfmbench", license="Apache-2.0"))
