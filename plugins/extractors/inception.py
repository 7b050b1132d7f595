"""Extractor ``inception``: the torch-fidelity Inception-v3 port (FID Inception) of uint8 images:
``pool`` [2048] (FID, KID, precision/recall), ``logits`` [1008] (IS), ``spatial`` [2023] (sFID).
Weights: ``metrics.inception_weights``, else the torch hub cache, else (smoke runs only) random."""
from __future__ import annotations

from vfmbench.hookspecs import hookimpl
from vfmbench.metrics.inception import FEATURES
from vfmbench.specs import ExtractorSpec


class Inception:
    """``InceptionFeatures`` with the extractor attributes the evaluator reads."""

    cache_name = "inception-v3-compat"

    def __init__(self, cfg, features, device, cache_dir):
        from vfmbench.metrics.inception import InceptionFeatures

        self.net = InceptionFeatures.from_config(cfg.metrics.inception_weights, cfg.run.smoke, cache_dir, device=device,
                                                 batch_size=cfg.metrics.batch_size, features=tuple(features))
        self.features, self.weights_id, self.is_official = self.net.features, self.net.weights_id, self.net.is_official
        self.protocol = {"extractor": "inception-v3-compat (torch-fidelity)", "extractor_weights": self.weights_id}

    def __call__(self, images):
        return self.net(images)


@hookimpl
def register_extractors(register):
    register(ExtractorSpec(
        name="inception", description="FID Inception-v3 (torch-fidelity port): pool_3, logits, the ADM sFID spatial features",
        factory=Inception, inputs="images", features=FEATURES, version="1",
        source="https://github.com/toshas/torch-fidelity", paper="https://arxiv.org/abs/1706.08500", license="Apache-2.0",
    ))
