"""Stage ``active-units``: active latent channels of the tokenizer (Burda et al. 2016): a channel is
active when the variance over val images of its posterior mean (averaged over positions) exceeds
0.01. Writes one representation row per run; runs after ``tokenizer``, before ``results``."""
from __future__ import annotations

from typing import Any

import torch

from vfmbench.hookspecs import hookimpl
from vfmbench.specs import StageSpec

THRESHOLD = 0.01


def active_units(means: torch.Tensor, threshold: float = THRESHOLD) -> tuple[int, torch.Tensor]:
    """(number of active channels, per-channel variance) of posterior means [N, C, h, w]."""
    per_image = means.double().mean(dim=(2, 3))  # [N, C]
    var = per_image.var(dim=0, unbiased=True)
    return int((var > threshold).sum()), var


def run(ctx) -> dict[str, Any]:
    n = ctx.cfg.metrics.recon_images
    means = []
    with torch.no_grad():
        for _, _, _, post, _ in ctx.posteriors("val", n, "active units"):
            means.append(post.mean.float().cpu())
    parts = [p for p in ctx.dist.gather_object(torch.cat(means) if means else None) or [] if p is not None]
    if not ctx.dist.is_main():
        return {}
    m = torch.cat(parts)
    count, var = active_units(m)
    ctx.write_rows([{"metric": "active-units", "metric_version": "1", "family": "representation", "value": float(count),
                     "higher_is_better": True, "protocol": {"num_images": int(m.shape[0]), "threshold": THRESHOLD,
                                                            "latents": "posterior mean", "channels": int(m.shape[1])}}])
    return {"active_units": count, "channels": int(m.shape[1]), "variance": [round(float(v), 6) for v in var]}


@hookimpl
def register_stages(register):
    register(StageSpec(name="active-units", description="active latent channels (variance of the posterior mean > 0.01)",
                       needs=("tokenizer",), produces=("rows",), parallel=True, order=25, run=run, version="1"))
