"""Stage ``recon-eval``: reconstruct the first ``metrics.recon_images`` val images and compute the
reconstruction metrics (rFID against the val split's cached features, PSNR, SSIM, LPIPS, ...)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .. import transforms
from ..context import RunContext
from ..hookspecs import hookimpl
from ..images import save_pairs
from ..specs import StageSpec


def run(ctx: RunContext) -> dict[str, Any]:
    """Every rank reconstructs and featurises its block of the val images (posterior noise per
    image index, so the result does not depend on the world size); rank 0 gets the metrics."""
    d = ctx.folder
    tok = ctx.tokenizer()
    ev = ctx.evaluator()
    ev.sharded = True
    ev.image_feature_cache = {"hits": 0, "misses": 0}  # this stage's
    n = ctx.cfg.metrics.recon_images
    first = None
    with torch.no_grad():
        for start, images, _, post, _ in ctx.posteriors("val", n, "reconstruct"):
            recon = tok.decode_uint8(ctx.posterior_sample(post, ("recon-eval", "val"), start))
            ev.add_pairs(images, recon)
            if start == 0:
                first = (images[:8].cpu(), recon[:8].cpu())
    # the first n images of the val split's cached features (the gFID reference reads the same cache)
    n_val = len(ctx.dataset("val"))
    reference = ev.dataset_reference(ctx.val_reference_key(n_val), ctx.val_reference_shard(n_val), take=n)
    rows = ev.finish("reconstruction", reference, extra_protocol=transforms.protocol(ctx.dataset("val")))
    first = next((f for f in ctx.dist.gather_object(first) or [] if f is not None), None)
    if not ctx.dist.is_main():
        return {}
    save_pairs(*first, d / "reconstructions.png")
    ctx.write_rows(rows, images={"reconstructions": "recon-eval/reconstructions.png"})
    return {"metrics": {r["metric"]: r["value"] for r in rows}, "vfm_feature_cache": dataclasses.asdict(ctx.feature_stats),
            "reference_cache_hits": ev.reference_cache_hits, "image_feature_cache": dict(ev.image_feature_cache)}


SPEC = StageSpec(
    name="recon-eval", description="reconstruction metrics of the val split (rFID, PSNR, SSIM, LPIPS, ...)",
    needs=("tokenizer",), produces=("rows",), parallel=True, order=20, run=run,
)


@hookimpl
def register_stages(register):
    register(SPEC)
