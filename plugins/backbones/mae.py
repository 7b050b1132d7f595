"""MAE ViT-B/16, L/16 and H/14 encoders (transformers ``ViTMAEModel``; facebook/vit-mae-*).

``ViTMAEModel`` masks and shuffles patches in its forward. As a frozen feature extractor every
patch must be kept in place: the adapter sets ``mask_ratio=0`` on build and load, and passes
``noise = arange(num_patches)`` so the library's argsort keeps the raster order.
ImageNet mean/std (the checkpoints' processor), bilinear resize as in VFM-VAE.
"""
from __future__ import annotations

import torch

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import VfmSpec
from vfmbench.vfm import TransformersAdapter, builtin_vfm_spec


class MaeAdapter(TransformersAdapter):
    """``ViTMAEModel`` without masking: every patch kept, in raster order."""

    def __init__(self):
        super().__init__("ViTMAEModel", "ViTMAEConfig", config_overrides={"mask_ratio": 0.0}, forward_kwargs={"interpolate_pos_encoding": True})

    def call_kwargs(self, model, x):
        patch = model.config.patch_size
        n = (x.shape[-2] // patch) * (x.shape[-1] // patch)
        noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)
        return {**self.forward_kwargs, "noise": noise}


ADAPTER = MaeAdapter()
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=8)
PAPER = "Masked Autoencoders Are Scalable Vision Learners (He et al., 2022), arXiv:2111.06377"
# The fields every variant shares (licence: facebookresearch/mae; the hub model card says Apache-2.0).
COMMON = dict(paper=PAPER, license="CC-BY-NC-4.0", family="mae", library="transformers", resolution=224, interpolation="bilinear",
              mean=IMAGENET_MEAN, std=IMAGENET_STD, num_prefix_tokens=1, tiny=TINY, adapter=ADAPTER)

# name, hub word, hidden, mlp, depth, heads, patch, input_scale, published params, aliases
VARIANTS = [
    ("mae-b16", "base", 768, 3072, 12, 12, 16, 1.0, 86_000_000, ("mae-b",)),
    ("mae-l16", "large", 1024, 4096, 24, 16, 16, 1.0, 304_000_000, ("mae", "mae-l")),
    ("mae-h14", "huge", 1280, 5120, 32, 16, 14, 0.875, 632_000_000, ("mae-h",)),
]


def _spec(name, word, hidden, mlp, depth, heads, patch, scale, published, aliases) -> VfmSpec:
    hub = f"facebook/vit-mae-{word}"
    return builtin_vfm_spec(
        **COMMON,
        name=name,
        description=f"MAE ViT-{word[0].upper()}/{patch} encoder (ImageNet-1k pre-training, no masking)",
        source=hub,
        aliases=aliases,
        model_id=hub,
        patch_size=patch,
        input_scale=scale,
        width=hidden,
        depth=depth,
        published_params=published,
        arch=dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=depth, num_attention_heads=heads, image_size=224, patch_size=patch),
    )


@hookimpl
def register_vfms(register):
    for variant in VARIANTS:
        register(_spec(*variant))
