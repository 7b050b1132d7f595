"""SigLIP 2 and SigLIP vision towers (transformers ``SiglipVisionModel``).

The fixed-resolution SigLIP 2 checkpoints (google/siglip2-*-patchNN-RES) use the SigLIP
architecture, so one adapter serves both generations; a ``save_pretrained`` folder of the full
``SiglipModel`` loads too (the text tower is ignored). The paper default is SigLIP2-L/16 at 512 px
with 256 px images upsampled x2 (bilinear, mean/std 0.5) and taps [0, 12, -1].
"""
from __future__ import annotations

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import VfmSpec
from vfmbench.vfm import TransformersAdapter, builtin_vfm_spec

# Every SigLIP input goes through the position-embedding interpolation, so any size works.
ADAPTER = TransformersAdapter("SiglipVisionModel", "SiglipVisionConfig", forward_kwargs={"interpolate_pos_encoding": True})

HALF = (0.5, 0.5, 0.5)
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=8)
WIDTHS = {  # hidden, mlp, depth, heads
    "b": (768, 3072, 12, 12),
    "l": (1024, 4096, 24, 16),
    "so400m": (1152, 4304, 27, 16),
}
SIGLIP2_PAPER = "SigLIP 2: Multilingual Vision-Language Encoders with Improved Semantic Understanding, Localization, and Dense Features (Tschannen et al., 2025), arXiv:2502.14786"
SIGLIP_PAPER = "Sigmoid Loss for Language Image Pre-Training (Zhai et al., 2023), arXiv:2303.15343"
# The fields every variant shares.
COMMON = dict(license="Apache-2.0", library="transformers", interpolation="bilinear", mean=HALF, std=HALF, num_prefix_tokens=0,
              tiny=TINY, adapter=ADAPTER)

# name, generation, size, patch, resolution, input_scale (for 256 px images), published params, aliases
VARIANTS = [
    ("siglip2-l16-512", 2, "l", 16, 512, 2.0, 303_000_000, ("siglip", "siglip2", "siglip2-l")),
    ("siglip2-l16-384", 2, "l", 16, 384, 2.0, 303_000_000, ()),
    ("siglip2-l16-256", 2, "l", 16, 256, 1.0, 303_000_000, ()),
    ("siglip2-b16-256", 2, "b", 16, 256, 1.0, 86_000_000, ("siglip2-b",)),
    ("siglip2-so400m16-512", 2, "so400m", 16, 512, 2.0, 400_000_000, ("siglip2-so400m",)),
    ("siglip-so400m14-384", 1, "so400m", 14, 384, 1.75, 400_000_000, ("siglip1", "siglip-so400m")),
    ("siglip-l16-384", 1, "l", 16, 384, 2.0, 303_000_000, ("siglip-l",)),
    ("siglip-b16-224", 1, "b", 16, 224, 1.0, 86_000_000, ("siglip-b",)),
]


def _hub_id(generation: int, size: str, patch: int, res: int) -> str:
    word = {"b": "base", "l": "large", "so400m": "so400m"}[size]
    return f"google/siglip{'2' if generation == 2 else ''}-{word}-patch{patch}-{res}"


def _spec(name, generation, size, patch, res, scale, published, aliases) -> VfmSpec:
    hidden, mlp, depth, heads = WIDTHS[size]
    hub = _hub_id(generation, size, patch, res)
    return builtin_vfm_spec(
        **COMMON,
        name=name,
        description=f"SigLIP{' 2' if generation == 2 else ''} ViT-{size.upper() if size != 'so400m' else 'So400m'}/{patch} at {res} px, vision tower with its attention-pooling head",
        source=hub,
        paper=SIGLIP2_PAPER if generation == 2 else SIGLIP_PAPER,
        aliases=aliases,
        family="siglip2" if generation == 2 else "siglip",
        model_id=hub,
        patch_size=patch,
        resolution=res,
        input_scale=scale,
        width=hidden,
        depth=depth,
        published_params=published,
        arch=dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=depth, num_attention_heads=heads, image_size=res, patch_size=patch),
    )


@hookimpl
def register_vfms(register):
    for variant in VARIANTS:
        register(_spec(*variant))
