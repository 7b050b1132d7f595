"""Stage ``diffusion``: train the latent diffusion model on the cached (normalised) latents, a
random horizontal flip per item, with REPA/REG alignment targets when the model asks for them and
convergence evaluations (gFID versus images) when it declares them; writes ``diffusion/model.pt``."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..build import param_counts
from ..checkpoint import load_torch, save_torch
from ..context import RunContext
from ..hookspecs import hookimpl
from ..images import plot_curves
from ..specs import StageSpec
from ..train import train_loop


def _alignment(ctx: RunContext, model):
    """Diffusion-side VFM alignment (REPA/REG): per-item targets for the image or its flip, or None."""
    request = model.alignment_request() if hasattr(model, "alignment_request") else None
    if request is None:
        return None
    from ..alignment import alignment_targets

    dist, cfg = ctx.dist, ctx.cfg
    ds = ctx.dataset("train")
    if not dist.is_main():
        dist.barrier()  # rank 0 fills the feature cache first
    align = alignment_targets(
        ctx.host, cfg, request, device=ctx.device, cache_dir=ctx.cache_dir, stats=ctx.feature_stats,
        key_fields={"dataset": getattr(ds, "cache_id", cfg.data.dataset), "split": "train", "resolution": cfg.data.resolution, "images": len(ds)},
        batches=lambda flip: (x.flip(-1) if flip else x for x, _ in ctx.iter_split("train", 0, "alignment features")),
        images=lambda idx: ctx.image_batch("train", idx)[0],
    )
    if dist.is_main():
        dist.barrier()
    return align


def run(ctx: RunContext) -> dict[str, Any]:
    from ..convergence import ConvergenceCurve

    dist, d, cfg, device = ctx.dist, ctx.folder, ctx.cfg, ctx.device
    if cfg.diffusion.weights:  # released or earlier weights: nothing to train, the sample stage loads them
        return {"skipped": "diffusion.weights is set", "weights": cfg.diffusion.weights}
    tok = ctx.tokenizer()
    data = load_torch(ctx.stage_dir("latents") / "train.pt")
    z = tok.normalize(data["latents"].to(device))
    zf = tok.normalize(data["flipped"].to(device)) if data["flipped"].numel() else z
    labels = data["labels"].to(device)
    torch.manual_seed(cfg.run.seed + 1)
    model = ctx.diffusion_model()
    tc = cfg.diffusion.train
    align = _alignment(ctx, model)

    def get_batch(idx: torch.Tensor):
        idx = idx.to(device)
        use_flip = torch.rand(idx.shape[0], device=device) < (0.5 if getattr(model, "train_hflip", True) else 0.0)  # global RNG: restored on resume
        x = torch.where(use_flip.view(-1, 1, 1, 1), zf[idx], z[idx])
        if align is None:
            return x, labels[idx]
        return x, labels[idx], align(idx, use_flip, device)

    # Convergence evaluation: train in segments, sample and evaluate the EMA weights after each (on rank 0).
    settings = model.convergence_eval() if hasattr(model, "convergence_eval") else None
    curve = ConvergenceCurve(ctx, model, settings, d) if settings else None
    first = None
    points = curve.points(tc.images) if curve else [tc.images]
    for i, total in enumerate(points):
        if curve is not None and i < len(points) - 1 and curve.is_done(total, tc.batch_size):
            continue  # evaluated before an interruption: training continues in the next segment
        result = train_loop(
            model, model.training_phases(tc.lr), get_batch, z.shape[0], total_images=total, batch_size=tc.batch_size,
            ckpt_path=d / "ckpt.pt", seed=cfg.run.seed + 1, ema_halflife_images=tc.ema_halflife_images,
            ckpt_every_images=tc.ckpt_every_images, keep_checkpoints=tc.keep_checkpoints, log_every_images=tc.log_every_images or max(tc.batch_size, tc.images // 100),
            grad_accum=tc.grad_accum, log_path=d / "train_log.jsonl", desc="diffusion",
            precision=tc.precision or cfg.run.precision, compile=cfg.run.compile, compile_backend=cfg.run.compile_backend,
        )
        first = first or result
        if curve is not None:
            if dist.is_main():
                curve.evaluate(result.nimg)
            dist.barrier()
    if dist.is_main():
        save_torch(model.state_dict(), d / "model.pt")
        plot_curves(d / "train_log.jsonl", d / "curves.png", title=f"{model.spec.name} training")
    info = {"params": param_counts(model), "images": result.nimg, "steps": result.steps, "resumed_from": first.resumed_from, "skipped_steps": result.skipped_steps}
    if align is not None:
        info["vfm_feature_cache"] = dataclasses.asdict(ctx.feature_stats)
    if curve is not None:
        info["convergence_gfid"] = curve.summary()
    return info


SPEC = StageSpec(
    name="diffusion", description="train the latent diffusion model on the cached latents; writes diffusion/model.pt",
    needs=("tokenizer", "latents"), produces=("diffusion",), parallel=True, order=50, run=run,
    provided=lambda cfg: "diffusion.weights" if cfg.diffusion.weights else "",
)


@hookimpl
def register_stages(register):
    register(SPEC)
