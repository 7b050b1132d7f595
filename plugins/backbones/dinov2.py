"""DINOv2 ViT-S/B/L/g, with and without registers (transformers ``Dinov2Model`` /
``Dinov2WithRegistersModel``; hub ids facebook/dinov2-* and facebook/dinov2-with-registers-*).

ImageNet mean/std, bicubic resize. 256 px images are resized by 0.875 to 224 px, a 16x16 grid of
14 px patches. The checkpoints' position embedding covers 518 px (37x37); transformers interpolates
it to any input, so nothing ever runs at 518 unless asked.
"""
from __future__ import annotations

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import VfmSpec
from vfmbench.vfm import TransformersAdapter, builtin_vfm_spec

PLAIN = TransformersAdapter("Dinov2Model", "Dinov2Config")
REGISTERS = TransformersAdapter("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=8)
SIZES = {  # hidden, depth, heads, swiglu, hub word, published params
    "s": (384, 12, 6, False, "small", 21_000_000),
    "b": (768, 12, 12, False, "base", 86_000_000),
    "l": (1024, 24, 16, False, "large", 300_000_000),
    "g": (1536, 40, 24, True, "giant", 1_100_000_000),
}
PAPER = "DINOv2: Learning Robust Visual Features without Supervision (Oquab et al., 2023), arXiv:2304.07193"
REG_PAPER = "Vision Transformers Need Registers (Darcet et al., 2024), arXiv:2309.16588"
# The fields every variant shares.
COMMON = dict(license="Apache-2.0", family="dinov2", library="transformers", patch_size=14, resolution=224, input_scale=0.875,
              interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, tiny=TINY)


def _spec(size: str, registers: bool) -> VfmSpec:
    hidden, depth, heads, swiglu, word, published = SIZES[size]
    hub = f"facebook/dinov2-with-registers-{word}" if registers else f"facebook/dinov2-{word}"
    name = f"dinov2-reg-{size}14" if registers else f"dinov2-{size}14"
    if registers:
        aliases = ("dinov2-reg",) if size == "l" else ()
    else:
        aliases = ("dinov2", f"dinov2-{size}") if size == "l" else (f"dinov2-{size}",)
    arch = dict(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, use_swiglu_ffn=swiglu, image_size=518, patch_size=14)
    if registers:
        arch["num_register_tokens"] = 4
    return builtin_vfm_spec(
        **COMMON,
        name=name,
        description=f"DINOv2 ViT-{size.upper() if size != 'g' else 'g'}/14{' with 4 registers' if registers else ''}",
        source=hub,
        paper=REG_PAPER if registers else PAPER,
        aliases=aliases,
        model_id=hub,
        width=hidden,
        depth=depth,
        num_prefix_tokens=5 if registers else 1,
        published_params=published,
        arch=arch,
        adapter=REGISTERS if registers else PLAIN,
    )


@hookimpl
def register_vfms(register):
    for registers in (False, True):
        for size in SIZES:
            register(_spec(size, registers))
