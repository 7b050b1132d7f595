"""Extractor ``pixels``: per-image PSNR and SSIM of uint8 pairs, as [0, 1] floats (no network)."""
from __future__ import annotations

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import ExtractorSpec


class Pixels:
    cache_name = ""  # cheap: not cached
    weights_id = ""
    is_official = True

    def __init__(self, cfg, features, device, cache_dir):
        self.features = tuple(features)
        self.ssim_range = cfg.metrics.ssim_range
        self.protocol = {"pixel_data_range": "[0, 1] (float of uint8/255)", "ssim_range": self.ssim_range}

    def __call__(self, images, recon):
        from vfmbench.metrics.image import psnr_per_image, ssim_per_image

        fns = {"psnr": psnr_per_image, "ssim": lambda a, b: ssim_per_image(a, b, self.ssim_range)}
        return {f: fns[f](images, recon) for f in self.features}


@hookimpl
def register_extractors(register):
    register(ExtractorSpec(
        name="pixels", description="per-image PSNR (dB) and SSIM (Gaussian window 11, sigma 1.5) of uint8 pairs",
        factory=Pixels, inputs="pairs", features=("psnr", "ssim"), version="1",
    ))
