"""``vfmbench eval``: metrics without training.

* ``vfmbench eval generation SAMPLES --reference REF``: generation metrics (gFID, sFID, IS, KID,
  precision/recall) of a folder of images or an ADM ``.npz`` of samples against a reference: an
  ADM reference batch ``.npz`` (its mu/sigma for FID, mu_s/sigma_s for sFID, its images for the
  rest) or a folder of images.
* ``vfmbench eval reconstruction --tokenizer NAME --weights PATH``: reconstruction metrics of a
  tokenizer loaded from weights on a dataset's val split (the run's ``tokenizer``, ``recon-eval``
  and ``results`` stages, with the weights loaded instead of trained).
* ``vfmbench eval latents --tokenizer NAME --weights PATH``: latent diffusability metrics (family
  ``latent``) of a tokenizer loaded from weights, without training a diffusion model (the run's
  ``tokenizer``, ``latents``, ``latent-eval`` and ``results`` stages).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

# The run stages of `vfmbench eval reconstruction|latents` (a run with the tokenizer's weights loaded).
EVAL_STAGES = {"reconstruction": ["tokenizer", "recon-eval", "results"], "latents": ["tokenizer", "latents", "latent-eval", "results"]}

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_images(path: str | Path) -> tuple[torch.Tensor, str]:
    """uint8 NCHW images from a folder (sorted by name) or an ADM ``.npz`` (``arr_0``), and a content id."""
    from PIL import Image

    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        from .metrics.adm import read_samples_npz
        from .metrics.cache import file_sha256

        return read_samples_npz(p), file_sha256(p)[:16]
    if not p.is_dir():
        raise UserError(f"{str(p)!r} is neither a folder of images nor an .npz file")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{str(p)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays, h = [], hashlib.sha256()
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise UserError(f"cannot read image {str(f)!r}: {e}") from None
        if arrays and arr.shape != arrays[0].shape:
            raise UserError(f"{str(f)!r} is {arr.shape[1]}x{arr.shape[0]}, the others {arrays[0].shape[1]}x{arrays[0].shape[0]}: images must share one size")
        arrays.append(arr)
        h.update(f.name.encode())
        h.update(arr.tobytes())
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()), h.hexdigest()[:16]


def evaluate_generation(host, cfg, samples: str, reference: str) -> list[dict[str, Any]]:
    """Rows of every generation metric of ``samples`` against ``reference``."""
    from . import __version__
    from .build import default_cache_dir, resolve_device
    from .evaluate import Evaluator
    from .results import SCHEMA_VERSION

    device = resolve_device(cfg.run.device)
    ev = Evaluator(host, cfg, device, default_cache_dir(cfg))
    images, sid = load_images(samples)
    ref_path = Path(reference)
    if ref_path.is_file() and ref_path.suffix == ".npz":
        ref = ev.adm_reference(ref_path)
    else:
        ref_images, rid = load_images(ref_path)
        ref = ev.images_reference(f"folder:{ref_path.name}:{rid}", ref_images, {"folder": rid, "num_images": int(ref_images.shape[0])})
    bs = cfg.metrics.batch_size
    for i in range(0, images.shape[0], bs):
        ev.add_samples(images[i : i + bs])
    rows = ev.finish("generation", ref, extra_protocol={"samples": f"{Path(samples).name}:{sid}"})
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = []
    for r in rows:
        out.append({
            "schema": SCHEMA_VERSION, "run_id": Path(samples).name, "label": "smoke" if r["smoke"] else "official",
            "tokenizer": "", "tokenizer_version": "", "vfm": "", "vfm_version": "", "vfm_weights": "", "decoder": "",
            "decoder_version": "", "diffusion": "", "diffusion_version": "", "dataset": ref.id, "dataset_version": "",
            "split": "", "resolution": int(images.shape[-1]), "metric": r["metric"], "metric_version": r["metric_version"],
            "family": r["family"], "value": r["value"], "higher_is_better": r["higher_is_better"], "protocol": r["protocol"],
            "seed": cfg.run.seed, "date": now, "device": str(device), "vfmbench_version": __version__, "git": "", "images": {},
        })
    return out


# ------------------------------------------------------------------------------------------------
# Representation alignment of a run: CKNNA / SE-CKNNA (vfm-vae-brief §4)

NOISE_SIGMAS = (0.05, 0.10, 0.15, 0.20)
ROTATIONS = (0, 1, 2, 3)  # multiples of 90 degrees
SCALES = (1.0, 0.75, 0.5, 0.25)


def _noise(images: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    x = images.float() + sigma * 255.0 * torch.randn(images.shape, generator=gen)
    return x.round().clamp(0, 255).to(torch.uint8)


def _rotate_scale(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image, a seeded (rotation, scale) pair: rotate by k*90 degrees, downscale (antialiased)
    and resize back up so every image keeps the tokenizer's input size."""
    import torch.nn.functional as F

    out = []
    h = images.shape[-1]
    for im in images:
        k = ROTATIONS[int(torch.randint(len(ROTATIONS), (1,), generator=gen))]
        s = SCALES[int(torch.randint(len(SCALES), (1,), generator=gen))]
        x = torch.rot90(im.float()[None], k, dims=(-2, -1))
        if s != 1.0:
            small = max(8, int(round(h * s)))
            x = F.interpolate(x, size=(small, small), mode="bilinear", antialias=True, align_corners=False)
            x = F.interpolate(x, size=(h, h), mode="bilinear", align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8)[0])
    return torch.stack(out)


def evaluate_alignment(host, run_dir: Path, num_images: int, topk: int, reference_vfm: str = "") -> tuple[list[dict[str, Any]], Path]:
    """CKNNA between a reference VFM's final-layer features and (a) the run's tokenizer latents and
    (b) each diffusion block's hidden states on clean latents at t = 0.5 with the null label, plus
    SE-CKNNA over noise and rotation/scale transforms for the tokenizer. Mean-pooled features,
    preprocessed as the paper (95th-percentile clamp, L2 rows). Writes alignment.json and alignment.png."""
    import json

    from .build import BuildContext
    from .checkpoint import load_torch, write_json
    from .config import build_dataclass, RunConfig
    from .metrics.cknna import layer_table, plot_layer_table
    from .runner import Run

    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.json); pass a folder written by `vfmbench run`")
    if not (run_dir / "tokenizer" / "model.pt").is_file():
        raise UserError(f"{run_dir} has no trained tokenizer (tokenizer/model.pt); run its tokenizer stage first")
    cfg = build_dataclass(RunConfig, json.loads(cfg_path.read_text())["config"])
    run = Run(host=host, cfg=cfg, run_dir=run_dir)
    tok = run.tokenizer()
    ref_cfg = cfg.vfm
    if reference_vfm:
        ref_cfg = dataclasses.replace(cfg.vfm, name=reference_vfm, layers=[])
    elif not host.tokenizers.get(cfg.tokenizer.name).uses_vfm and not cfg.vfm.name:
        raise UserError("this run's tokenizer has no VFM; name the reference with --reference-vfm")
    from .vfm import build_vfm

    ref = build_vfm(host.vfms.get(ref_cfg.name), ref_cfg, cache_dir=BuildContext(host=host, config=cfg).cache_dir).to(run.device)
    ds = run.dataset("val")
    n = min(num_images, len(ds))
    images, _ = run._image_batch("val", torch.arange(n))
    gen = torch.Generator().manual_seed(cfg.run.seed)

    def vfm_feats(x):
        return torch.cat([ref(x[i : i + 64].to(run.device), [-1]).layers[-1].mean(1).cpu() for i in range(0, n, 64)]).double()

    def tok_feats(x):
        return torch.cat([tok.encode(x[i : i + 64].to(run.device)).mean.mean(dim=(2, 3)).cpu() for i in range(0, n, 64)]).double()

    with torch.no_grad():
        ref_clean = vfm_feats(images)
        clean = {"tokenizer": (ref_clean, tok_feats(images))}
        transformed = {"tokenizer": []}
        for variant in [_noise(images, s, gen) for s in NOISE_SIGMAS] + [_rotate_scale(images, gen)]:
            transformed["tokenizer"].append((vfm_feats(variant), tok_feats(variant)))
        model_path = run_dir / "diffusion" / "model.pt"
        if model_path.is_file() and hasattr(run.diffusion_model(), "blocks"):
            model = run.diffusion_model()
            model.load_state_dict(load_torch(model_path, run.device))
            model.eval()
            feats: dict[int, list[torch.Tensor]] = {}
            hooks = [blk.register_forward_hook(lambda m, i, o, k=k: feats.setdefault(k, []).append((o[0] if isinstance(o, tuple) else o).mean(1).cpu()))
                     for k, blk in enumerate(model.blocks, 1)]
            for i in range(0, n, 64):
                z = tok.normalize(tok.encode(images[i : i + 64].to(run.device)).mean)
                eps = torch.randn(z.shape, generator=gen).to(run.device)
                t = torch.full((z.shape[0],), 0.5, device=run.device)
                model((1 - 0.5) * eps + 0.5 * z, t, torch.full((z.shape[0],), model.num_classes, device=run.device, dtype=torch.long))
            for h in hooks:
                h.remove()
            for k in sorted(feats):
                clean[f"block {k}"] = (ref_clean, torch.cat(feats[k]).double())
    rows = layer_table(clean, transformed, topk=topk)
    out = run_dir / "alignment"
    write_json(out / "alignment.json", {"reference_vfm": ref.spec.name, "reference_weights": ref.weights_id, "num_images": n,
                                         "topk": topk, "label": "smoke" if cfg.run.smoke else "official", "rows": rows})
    png = plot_layer_table(rows, out / "alignment.png", title=f"CKNNA to {ref.spec.name} ({run_dir.name})")
    return rows, png
