"""Stage ``gen-eval``: generation metrics of the samples (gFID, sFID, IS, precision/recall, ...)
against the val split or an ADM reference batch (``metrics.reference``)."""
from __future__ import annotations

from typing import Any

from tqdm import tqdm

from ..context import RunContext
from ..hookspecs import hookimpl
from ..results import read_rows, write_rows
from ..specs import StageSpec


def run(ctx: RunContext) -> dict[str, Any]:
    """Every rank featurises its block of the samples (and of the reference on a cache miss);
    rank 0 gets the metrics and writes the rows."""
    from ..metrics.adm import read_samples_npz

    dist, d, cfg = ctx.dist, ctx.folder, ctx.cfg
    images = read_samples_npz(ctx.stage_dir("sample") / "samples.npz")
    ev = ctx.evaluator()
    ev.sharded = True
    ev.image_feature_cache = {"hits": 0, "misses": 0}  # this stage's
    mine = dist.shard_batches(images.shape[0], cfg.metrics.batch_size)
    for _, start, stop in tqdm(mine, desc="sample features", unit="batch", leave=False, dynamic_ncols=True, disable=not dist.is_main() or None):
        ev.add_samples(images[start:stop].to(ctx.device))
    n = len(ctx.dataset("val"))
    sc = cfg.diffusion.sample
    from pathlib import Path

    from ..sampling import sampler_protocol

    extra = {
        **sampler_protocol(sc), "diffusion_weights": Path(cfg.diffusion.weights).name if cfg.diffusion.weights else "trained",
        "label_sampling": sc.label_sampling, "sample_precision": cfg.sample_precision,
        "diffusion_train_precision": cfg.diffusion.train.precision or cfg.run.precision,
        "diffusion_images": cfg.diffusion.train.images,
        "diffusion_epochs": round(cfg.diffusion.train.images / len(ctx.dataset("train")), 4),
    }
    if cfg.metrics.reference:
        reference = ev.adm_reference(cfg.metrics.reference)
    else:
        reference = ev.dataset_reference(ctx.val_reference_key(n), ctx.val_reference_shard(n))
    rows = ev.finish("generation", reference, extra_protocol=extra)
    if not dist.is_main():
        return {}
    rows = [ctx.row(r, images={"samples": "sample/samples.png"}) for r in rows]
    curve = ctx.stage_dir("diffusion") / "convergence.jsonl"  # gFID-versus-images rows of the diffusion stage
    write_rows(d / "rows.jsonl", rows + (read_rows(curve) if curve.exists() else []))
    return {"metrics": {r["metric"]: r["value"] for r in rows}, "reference_cache_hits": ev.reference_cache_hits,
            "image_feature_cache": dict(ev.image_feature_cache)}


SPEC = StageSpec(
    name="gen-eval", description="generation metrics of the samples (gFID, sFID, IS, precision/recall, ...)",
    needs=("samples",), produces=("rows",), parallel=True, order=70, run=run,
)


@hookimpl
def register_stages(register):
    register(SPEC)
