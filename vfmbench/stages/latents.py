"""Stage ``latents``: posterior samples of the train split (and of its flips) and of the val split,
and their per-channel statistics, which the tokenizer then normalises with. Cached across runs by
the tokenizer's weights and the images (``latent_cache_key``); a hit hard-links the files."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_torch, save_torch, write_json
from ..config import config_hash
from ..context import RunContext
from ..hookspecs import hookimpl
from ..specs import StageSpec

LATENT_FILES = ("train.pt", "val.pt", "stats.pt")


def link_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    """Hard-link (else copy) ``names`` from ``src`` into ``dst``, each atomically (temporary name, rename)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        tmp = dst / f".{name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src / name, tmp)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)


def latent_cache_key(ctx: RunContext) -> str:
    """What the latents depend on: the tokenizer's weights (hashed), its identity and the frozen
    VFM's weights, the images (dataset id, split sizes, resolution, corrupt-image policy), the
    posterior-sampling seed and the precision of encoding."""
    tok = ctx.tokenizer()
    h = hashlib.sha256()
    for name, t in sorted(tok.weights_state().items()):
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    cfg = ctx.cfg
    spec = ctx.host.tokenizers.get(cfg.tokenizer.name)
    ds_tr, ds_va = ctx.dataset("train"), ctx.dataset("val")
    key = {
        "weights_sha256": h.hexdigest(), "tokenizer": [spec.name, spec.version],
        "vfm": ctx.vfm().weights_id if spec.uses_vfm else "",
        "dataset": getattr(ds_tr, "cache_id", cfg.data.dataset), "val_dataset": getattr(ds_va, "cache_id", cfg.data.dataset),
        "train_images": len(ds_tr), "val_images": len(ds_va), "resolution": cfg.data.resolution,
        "skip_corrupt": cfg.data.skip_corrupt, "seed": cfg.run.seed, "precision": cfg.run.precision, "version": 1,
    }
    return config_hash(key, 16)


def run(ctx: RunContext) -> dict[str, Any]:
    """Every rank encodes its block of each split; rank 0 writes the gathered latents (identical
    to a one-process run) and their statistics, which every rank then uses."""
    dist, d = ctx.dist, ctx.folder
    cache = ctx.cache_dir / "latents" / latent_cache_key(ctx)
    hit = dist.broadcast_object((cache / "done.json").exists() if dist.is_main() else None)
    stats = None
    if hit:  # the same tokenizer weights on the same images: the latents of an earlier run
        if dist.is_main():
            link_files(cache, d, LATENT_FILES)
            s = load_torch(d / "stats.pt")
            stats = (s["mean"], s["std"])
    else:
        train = ctx.encode_split("train", flip=True)
        val = ctx.encode_split("val", flip=False)
        if dist.is_main():
            (z, zf, y), (zv, _, yv) = train, val
            save_torch({"latents": z, "flipped": zf, "labels": y}, d / "train.pt")
            save_torch({"latents": zv, "labels": yv}, d / "val.pt")
            both = torch.cat([z, zf]).double()
            mean = both.mean(dim=(0, 2, 3)).float()
            std = both.std(dim=(0, 2, 3)).float()
            save_torch({"mean": mean, "std": std, "num_latents": int(both.shape[0])}, d / "stats.pt")
            stats = (mean, std)
            link_files(d, cache, LATENT_FILES)
            write_json(cache / "done.json", {"run": ctx.run_dir.name})
    mean, std = dist.broadcast_object(stats)
    ctx.tokenizer().set_latent_stats(mean.to(ctx.device), std.to(ctx.device))
    if not dist.is_main():
        return {}
    z, zv = load_torch(d / "train.pt")["latents"], load_torch(d / "val.pt")["latents"]
    return {"train_latents": list(z.shape), "val_latents": list(zv.shape), "mean_abs_mean": float(mean.abs().mean()),
            "mean_std": float(std.mean()), "latent_cache": "hit" if hit else "miss", "latent_cache_dir": str(cache),
            "vfm_feature_cache": dataclasses.asdict(ctx.feature_stats)}


SPEC = StageSpec(
    name="latents", description="cache posterior latents of train (+ flips) and val, and their per-channel statistics",
    needs=("tokenizer",), produces=("latents",), parallel=True, order=30, run=run,
)


@hookimpl
def register_stages(register):
    register(SPEC)
