"""Extractor ``abs-error``: per-image mean absolute pixel error of uint8 pairs, on [0, 1]."""
from __future__ import annotations

import numpy as np
import torch

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import ExtractorSpec


class AbsError:
    cache_name = ""  # cheap: never cached
    weights_id = ""  # no network
    is_official = True
    protocol = {"abs_error_range": "[0, 1] (uint8/255)"}

    def __init__(self, cfg, features, device, cache_dir):
        self.features = tuple(features)

    def __call__(self, images: torch.Tensor, recon: torch.Tensor) -> dict[str, np.ndarray]:
        d = (images.double() - recon.double()).abs() / 255.0
        return {"mae": d.flatten(1).mean(1).cpu().numpy()}


@hookimpl
def register_extractors(register):
    register(ExtractorSpec(name="abs-error", description="per-image mean absolute pixel error on [0, 1]", factory=AbsError,
                           inputs="pairs", features=("mae",), version="1", license="Apache-2.0"))
