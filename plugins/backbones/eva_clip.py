"""EVA-CLIP vision towers through timm: EVA-01-CLIP-g/14 (the 336 px ImageNet fine-tune VFM-VAE
lists, and the 224 px CLIP tower) and EVA-02-CLIP B/16, L/14, L/14-336.

timm builds them with ``dynamic_img_size=True`` (absolute position embeddings resampled, RoPE
recomputed per grid) and without the classifier. CLIP mean/std; bilinear resize as in VFM-VAE.
"""
from __future__ import annotations

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import VfmSpec
from vfmbench.vfm import TimmAdapter, builtin_vfm_spec

ADAPTER = TimmAdapter()

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2)
EVA01_PAPER = "EVA: Exploring the Limits of Masked Visual Representation Learning at Scale (Fang et al., 2023), arXiv:2211.07636"
EVA_CLIP_PAPER = "EVA-CLIP: Improved Training Techniques for CLIP at Scale (Sun et al., 2023), arXiv:2303.15389"

# The columns of VARIANTS, VfmSpec fields.
COLUMNS = ("name", "model_id", "patch_size", "resolution", "input_scale", "width", "depth", "published_params", "paper", "description", "aliases")
VARIANTS = [
    ("eva-clip-g14-336", "eva_giant_patch14_336.clip_ft_in1k", 14, 336, 1.75, 1408, 40, 1_000_000_000, EVA01_PAPER,
     "EVA-01-CLIP-g/14 vision tower fine-tuned on ImageNet-1k at 336 px (the EVA model VFM-VAE lists)", ("eva-clip", "eva")),
    ("eva-clip-g14", "eva_giant_patch14_clip_224.laion400m", 14, 224, 0.875, 1408, 40, 1_000_000_000, EVA_CLIP_PAPER,
     "EVA-01-CLIP-g/14 vision tower (LAION-400M)", ()),
    ("eva02-clip-l14-336", "eva02_large_patch14_clip_336.merged2b", 14, 336, 1.75, 1024, 24, 304_000_000, EVA_CLIP_PAPER,
     "EVA-02-CLIP-L/14 vision tower at 336 px (Merged-2B)", ()),
    ("eva02-clip-l14", "eva02_large_patch14_clip_224.merged2b", 14, 224, 0.875, 1024, 24, 304_000_000, EVA_CLIP_PAPER,
     "EVA-02-CLIP-L/14 vision tower (Merged-2B)", ("eva02-clip",)),
    ("eva02-clip-b16", "eva02_base_patch16_clip_224.merged2b", 16, 224, 1.0, 768, 12, 86_000_000, EVA_CLIP_PAPER,
     "EVA-02-CLIP-B/16 vision tower (Merged-2B)", ()),
]
# The fields every variant shares.
COMMON = dict(license="MIT", family="eva-clip", library="timm", interpolation="bilinear", mean=CLIP_MEAN, std=CLIP_STD,
              num_prefix_tokens=1, tiny=TINY, adapter=ADAPTER)


def _spec(row: tuple) -> VfmSpec:
    fields = dict(zip(COLUMNS, row))
    return builtin_vfm_spec(**COMMON, **fields, source=f"timm/{fields['model_id']}")


@hookimpl
def register_vfms(register):
    for row in VARIANTS:
        register(_spec(row))
