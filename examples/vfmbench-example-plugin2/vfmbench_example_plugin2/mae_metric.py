"""Metric ``mae``: mean absolute pixel error of reconstructions (the ``abs-error`` extractor's ``mae``)."""
from __future__ import annotations

import numpy as np

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import MetricSpec


def stats(scores: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(scores)), "n": int(len(scores))}


def value(s: dict[str, float], reference) -> float:
    return s["mean"]


@hookimpl
def register_metrics(register):
    register(MetricSpec(name="mae", description="mean absolute pixel error of reconstructions (on [0, 1])", family="reconstruction",
                        higher_is_better=False, inputs="pairs", extractor="abs-error", feature="mae", stats=stats, value=value,
                        protocol_fields=("num_images", "abs_error_range"), version="1", license="Apache-2.0"))
