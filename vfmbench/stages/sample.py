"""Stage ``sample``: class-conditional samples of the trained diffusion model, decoded to uint8
images (``samples.npz``, ADM layout) with their labels and a grid."""
from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from ..context import RunContext
from ..hookspecs import hookimpl
from ..images import save_grid
from ..specs import StageSpec


def run(ctx: RunContext) -> dict[str, Any]:
    """Samples in batches of ``diffusion.sample.batch_size``: batch k's noise (initial and SDE)
    comes from a generator seeded by (seed, k), so the images do not depend on the world size;
    under torchrun each rank samples its block of batches and rank 0 writes them all."""
    from ..metrics.adm import write_samples_npz
    from ..diffusion_weights import sample_to_latents, sampling_model
    from ..sampling import sample, sample_labels, sample_options

    dist, d, cfg = ctx.dist, ctx.folder, ctx.cfg
    tok = ctx.tokenizer()
    model, loaded = sampling_model(ctx.host, cfg, tok.latent_shape(cfg.data.resolution), ctx.num_classes,
                                   ctx.device, trained=ctx.stage_dir("diffusion") / "model.pt")
    sc = cfg.diffusion.sample
    gen = torch.Generator(ctx.device).manual_seed(cfg.run.seed + 2)
    labels = sample_labels(sc.num_images, ctx.num_classes, mode=sc.label_sampling, generator=gen).to(ctx.device)
    shape = tok.latent_shape(cfg.data.resolution)
    out = []
    mine = dist.shard_batches(sc.num_images, sc.batch_size)
    with torch.no_grad():
        for k, start, stop in tqdm(mine, desc="sample", unit="batch", leave=False, dynamic_ncols=True, disable=not dist.is_main() or None):
            y = labels[start:stop]
            g = torch.Generator(ctx.device).manual_seed(dist.derive_seed(cfg.run.seed, "sample", k))
            noise = torch.randn((y.shape[0], *shape), generator=g, device=ctx.device)
            z = sample(model, noise, y, **sample_options(sc), generator=g, precision=cfg.sample_precision)
            out.append(tok.decode_uint8(sample_to_latents(tok, z, cfg.diffusion)).cpu())
    parts = dist.gather_object(torch.cat(out) if out else None)
    if not dist.is_main():
        return {}
    images = torch.cat([x for x in parts if x is not None])
    write_samples_npz(d / "samples.npz", images)
    torch.save(labels.cpu(), d / "labels.pt")
    order = torch.argsort(labels.cpu(), stable=True)[:64]
    save_grid(images[order], d / "samples.png")
    return {"num_images": int(images.shape[0]), "weights": loaded}


SPEC = StageSpec(
    name="sample", description="sample the diffusion model and decode: sample/samples.npz",
    needs=("tokenizer", "latents", "diffusion"), produces=("samples",), parallel=True, order=60, run=run,
)


@hookimpl
def register_stages(register):
    register(SPEC)
