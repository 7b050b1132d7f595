"""DINO (v1) ViT-S/16, the frozen backbone of VFM-VAE's projected discriminator (through timm,
``vit_small_patch16_224.dino``: the facebookresearch/dino ``dino_deitsmall16_pretrain`` weights).

ImageNet mean/std and bicubic resize (the checkpoint's pretrained config), 224 px native input
(a 14 x 14 grid of 16 px patches), one class token. As a discriminator backbone VFM-VAE taps the
patch embedding and blocks 3, 6, 9 and 12 (hidden states 0, 3, 6, 9, 12), adds the class token to
every patch token and resizes its inputs with the generator VFM's interpolation, not this one
(``vfmbench_plugins.discriminators.ProjectedDiscriminator``). Local weights: a timm
``model.safetensors`` or the original ``dino_deitsmall16_pretrain.pth`` (``vfm.weights``, or
``tokenizer.args.disc_vfm_weights`` for the discriminator).
"""
from __future__ import annotations

from vfmbench.hookspecs import hookimpl
from vfmbench.vfm import TimmAdapter, builtin_vfm_spec

MODEL_ID = "vit_small_patch16_224.dino"
TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2)


@hookimpl
def register_vfms(register):
    register(builtin_vfm_spec(
        name="dino-s16",
        description="DINO (v1) ViT-S/16, self-supervised on ImageNet-1k (VFM-VAE's discriminator backbone)",
        source=f"timm/{MODEL_ID}",
        paper="Emerging Properties in Self-Supervised Vision Transformers (Caron et al., 2021), arXiv:2104.14294",
        license="Apache-2.0",
        aliases=("dino", "dino-vits16"),
        family="dino",
        library="timm",
        model_id=MODEL_ID,
        patch_size=16,
        resolution=224,
        input_scale=0.875,
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        width=384,
        depth=12,
        num_prefix_tokens=1,
        published_params=21_000_000,
        tiny=TINY,
        adapter=TimmAdapter(),
    ))
