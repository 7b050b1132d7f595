"""CLIP vision towers through open_clip: OpenAI CLIP (B/16, L/14, L/14-336) and LAION OpenCLIP
(L/14, H/14, bigG/14). Only the vision tower is built; a full open_clip checkpoint (or OpenAI's
TorchScript .pt) loads through its ``visual.*`` tensors.

CLIP mean/std (LAION's L/14 uses 0.5), bicubic resize. ``input_scale`` maps 256 px images to a
16x16 grid (32x32 for the 336 px model); other sizes resample the position embedding.
"""
from __future__ import annotations

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import VfmSpec
from vfmbench.vfm import OpenClipAdapter, builtin_vfm_spec

ADAPTER = OpenClipAdapter()

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
TINY = {"embed_dim": 32, "vision_cfg": dict(image_size=64, patch_size=8, width=64, layers=4, head_width=32)}
OPENAI_PAPER = "Learning Transferable Visual Models From Natural Language Supervision (Radford et al., 2021), arXiv:2103.00020"
LAION_PAPER = "Reproducible scaling laws for contrastive language-image learning (Cherti et al., 2023), arXiv:2212.07143"

# The columns of VARIANTS, VfmSpec fields.
COLUMNS = ("name", "model_id", "weights_tag", "source", "patch_size", "resolution", "input_scale", "width", "depth", "mean", "std", "published_params", "aliases")
VARIANTS = [
    ("clip-b16", "ViT-B-16", "openai", "timm/vit_base_patch16_clip_224.openai", 16, 224, 1.0, 768, 12, CLIP_MEAN, CLIP_STD, 86_000_000, ("clip-b",)),
    ("clip-l14", "ViT-L-14", "openai", "timm/vit_large_patch14_clip_224.openai", 14, 224, 0.875, 1024, 24, CLIP_MEAN, CLIP_STD, 304_000_000, ("clip", "clip-l")),
    ("clip-l14-336", "ViT-L-14-336", "openai", "timm/vit_large_patch14_clip_336.openai", 14, 336, 1.75, 1024, 24, CLIP_MEAN, CLIP_STD, 304_000_000, ()),
    ("openclip-l14", "ViT-L-14", "laion2b_s32b_b82k", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", 14, 224, 0.875, 1024, 24, HALF, HALF, 304_000_000, ("openclip", "openclip-l")),
    ("openclip-h14", "ViT-H-14", "laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", 14, 224, 0.875, 1280, 32, CLIP_MEAN, CLIP_STD, 632_000_000, ("openclip-h",)),
    ("openclip-bigg14", "ViT-bigG-14", "laion2b_s39b_b160k", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", 14, 224, 0.875, 1664, 48, CLIP_MEAN, CLIP_STD, 1_845_000_000, ("openclip-bigg",)),
]
# The fields every variant shares.
COMMON = dict(library="open_clip", license="MIT", interpolation="bicubic", num_prefix_tokens=1, tiny=TINY, adapter=ADAPTER)


def _spec(row: tuple) -> VfmSpec:
    fields = dict(zip(COLUMNS, row))
    openai = fields["weights_tag"] == "openai"
    return builtin_vfm_spec(
        **COMMON,
        **fields,
        description=f"{'OpenAI CLIP' if openai else 'OpenCLIP (LAION-2B)'} {fields['model_id']} vision tower ({fields['weights_tag']})",
        paper=OPENAI_PAPER if openai else LAION_PAPER,
        family="clip" if openai else "openclip",
    )


@hookimpl
def register_vfms(register):
    for row in VARIANTS:
        register(_spec(row))
