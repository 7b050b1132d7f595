"""Extractor ``lpips-vgg``: per-image LPIPS (VGG16 backbone, v0.1 linear weights) of uint8 pairs.
Weights: ``metrics.lpips_weights``, else the torch hub cache, else (smoke runs only) a random backbone."""
from __future__ import annotations

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import ExtractorSpec


class Lpips:
    """``LpipsVgg`` with the extractor attributes the evaluator reads."""

    cache_name = "lpips"
    features = ("lpips",)

    def __init__(self, cfg, features, device, cache_dir):
        from vfmbench.metrics.image import LpipsVgg

        self.net = LpipsVgg(cfg.metrics.lpips_weights, smoke=cfg.run.smoke, cache_dir=cache_dir, device=device)
        self.weights_id, self.is_official = self.net.weights_id, self.net.is_official
        self.protocol = {"lpips_weights": self.weights_id}

    def __call__(self, images, recon):
        return {"lpips": self.net(images, recon)}


@hookimpl
def register_extractors(register):
    register(ExtractorSpec(
        name="lpips-vgg", description="LPIPS-VGG distance per image pair (VGG16 + v0.1 linear layers)",
        factory=Lpips, inputs="pairs", features=("lpips",), version="1",
        source="https://github.com/richzhang/PerceptualSimilarity", paper="https://arxiv.org/abs/1801.03924", license="BSD-2-Clause",
    ))
