"""Plugin: paper-size presets of the baseline tokenizer families (GPU runs on ImageNet).

One preset per family: ``paper-sd-vae``, ``paper-va-vae``, ``paper-distill``, ``paper-rae``. Each
carries every family's paper-size component arguments, so ``--tokenizer``/``--vfm`` can swap the
family or the teacher on top of any of them. All of them train on an ImageNet folder (``--set data.root=DIR`` with
``DIR/{train,val}/<class>/*``) at 256 px with pretrained VFM weights, and evaluate with the paper
protocol sizes (50k reconstructions, 50k samples). The diffusion side is ``flow-dit`` at
LightningDiT-XL size (1152 / 28 / 16, patch 1 on 16x16 latents; patch 2 on SD-VAE's 32x32, as
DiT-XL/2) for 64 epochs, the budget of the VFM-VAE paper's tokenizer table (Table A).

Sources of the tokenizer numbers: architectures from the papers (kl-f8: 83.65M parameters, decoder
49.49M; VA-VAE: LDM ch 128, ch_mult [1, 1, 2, 2, 4], attention at 16 px, z 32; RAE: DINOv2-B with
registers, ViT-XL decoder, noise tau 0.8). Training lengths: VA-VAE 160M images (about 125
epochs, Table A); ``distill`` gets VA-VAE's budget so that only the objective differs; RAE's
decoder 16 epochs at batch 512 (our reading of the RAE paper; not verified against its configs).
"""
from __future__ import annotations

from vfmbench.config import deep_merge
from vfmbench.hookspecs import hookimpl
from vfmbench.metrics.adm import ADM_IMAGENET256
from vfmbench.specs import PresetSpec

IMAGENET_TRAIN = 1_281_167
EPOCHS_64 = 64 * IMAGENET_TRAIN

BASE = {
    "run": {"smoke": False, "device": "auto", "seed": 0, "precision": "fp32"},
    "data": {"dataset": "imagefolder", "resolution": 256, "batch_size": 64, "num_workers": 8},
    "vfm": {"size": "full", "pretrained": True},
    "diffusion": {
        "name": "flow-dit",
        "train": {"images": EPOCHS_64, "batch_size": 1024, "lr": 2e-4, "ema_halflife_images": 7_000_000, "ckpt_every_images": 5_000_000},
        "sample": {"num_images": 50_000, "sampler": "euler", "steps": 250, "cfg_scale": 1.0, "batch_size": 256},
    },
    "metrics": {"recon_images": 50_000, "batch_size": 256, "reference": ADM_IMAGENET256,
                "isc_split_order": "consecutive"},  # generation metrics as the ADM evaluator
}
DIT_XL = {"width": 1152, "depth": 28, "heads": 16, "patch_size": 1, "time_sampling": "lognormal"}

COMPONENTS = {
    # official weights; to train from scratch: --set tokenizer.args.pretrained= --set tokenizer.train.images=108000000
    "sd-vae": {"pretrained": "ft-ema", "normalisation": "scaling-factor"},
    "va-vae": {"latent_channels": 32, "downsample": 16, "vf_weight": 0.1, "margin_cos": 0.5, "margin_dm": 0.25},
    "distill": {"latent_channels": 32, "downsample": 16, "target": "cosine"},
    "rae": {"encoder_norm": "layernorm", "noise_tau": 0.8},
    "ldm-decoder": {"base_channels": 128, "channel_mult": [1, 1, 2, 2, 4], "blocks": 2, "attn_levels": [-1]},
    "vit-decoder": {"width": 1152, "depth": 28, "heads": 16, "mlp_ratio": 4096 / 1152},  # RAE ViT-XL: MLP 4096
}

FAMILIES = {
    "sd-vae": {
        "description": "SD-VAE kl-f8 (official sd-vae-ft-ema weights, 0.18215 scaling) + DiT-XL/2-size flow model, ImageNet 256",
        "values": {
            "tokenizer": {"name": "sd-vae", "train": {"images": 0}},
            "component_args": {"flow-dit": {**DIT_XL, "patch_size": 2}},
        },
    },
    "va-vae": {
        "description": "VA-VAE f16d32 aligned to DINOv2-L, 160M images, + LightningDiT-XL/1-size flow model, ImageNet 256",
        "values": {
            "vfm": {"name": "dinov2-l14"},
            "tokenizer": {"name": "va-vae", "train": {"images": 160_000_000, "batch_size": 256, "lr": 1e-4, "ckpt_every_images": 2_000_000}},
        },
    },
    "distill": {
        "description": "LDM f16d32 encoder distilled from DINOv2-L (cosine), VA-VAE's budget, + LightningDiT-XL/1-size flow model",
        "values": {
            "vfm": {"name": "dinov2-l14"},
            "tokenizer": {"name": "distill", "train": {"images": 160_000_000, "batch_size": 256, "lr": 1e-4, "ckpt_every_images": 2_000_000}},
        },
    },
    "rae": {
        "description": "RAE: frozen DINOv2-B (registers) tokens 768x16x16 + ViT-XL decoder (16 epochs), + XL flow model",
        "values": {
            "vfm": {"name": "dinov2-reg-b14"},
            "tokenizer": {"name": "rae", "train": {"images": 16 * IMAGENET_TRAIN, "batch_size": 512, "lr": 2e-4, "ckpt_every_images": 2_000_000}},
        },
    },
}


def family_preset(family: str) -> dict:
    values = deep_merge(BASE, {"component_args": {**COMPONENTS, "flow-dit": DIT_XL}})
    return deep_merge(values, FAMILIES[family]["values"])


@hookimpl
def register_presets(register):
    for family, entry in FAMILIES.items():
        register(
            PresetSpec(
                name=f"paper-{family}",
                description=entry["description"] + " (GPU; --set data.root=IMAGENET_DIR)",
                values=family_preset(family),
                version="1",
                source="vfmbench",
                license="Apache-2.0",
            )
        )
