"""``vfmbench eval alignment RUN_DIR``: CKNNA / SE-CKNNA between a reference VFM and a run's
tokenizer latents and diffusion blocks, as VFM-VAE's ``tools/evaluate_alignment`` (vfm-vae-brief §4).

Protocol (every row of ``alignment/alignment.json`` carries it):

* **images**: a seeded random sample of the val split (10 000 by default, ``torch.randperm`` with
  the sample seed, in index order), not the first n of a class-sorted split;
* **transforms** (the reference ``preprocess.py``; position i of the sample seeds image i with
  ``seed + i`` through ``np.random.RandomState``): Gaussian noise sigma in {0.05, 0.10, 0.15, 0.20}
  (``clip(x + 255 * N(0, sigma), 0, 255)`` then truncated to uint8, the noise drawn in H x W x C
  order), and one (rotation in {0, 90, 180, 270}, scale in {1, 0.75, 0.5, 0.25}) pair per image:
  rotated, then downscaled (antialiased bilinear) and fed to both encoders **at the reduced size**
  (256 px -> 192 / 128 / 64 px; sizes are rounded to a multiple of the tokenizer's downsampling);
* **features**: one vector per image, the mean over patch tokens: the reference VFM's final layer,
  the tokenizer's posterior mean (the reference script pools a posterior sample), each diffusion
  block's hidden states on clean latents at t = 0.5 (linear path, seeded noise) with the null
  label; a REG model gets the class token it models (the alignment VFM's class token of the
  image, noised at t = 0.5 like the latent) and only its patch tokens are pooled;
* **metric**: ``vfmbench.metrics.cknna`` (remove_outliers q = 0.95 exact + L2 rows, topk 10);
  SE-CKNNA is the mean over the five transformed sets, VFM(T(x)) paired with model(T(x)).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

NUM_IMAGES = 10_000
SEED = 42  # the reference preprocess.py's default
NOISE_SIGMAS = (0.05, 0.10, 0.15, 0.20)
ROTATIONS = (0, 90, 180, 270)
SCALES = (1.0, 0.75, 0.5, 0.25)
DIFFUSION_T = 0.5
BATCH = 64


def sample_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct indices of ``range(total)``, a seeded random sample, in increasing order."""
    if n < 1:
        raise UserError(f"eval alignment needs at least one image, got --images {n}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[: min(n, total)].sort().values


def noisy(images: torch.Tensor, sigma: float, positions: torch.Tensor, seed: int) -> torch.Tensor:
    """uint8 NCHW + 255 * N(0, sigma) per image, seeded with ``seed + position`` (H x W x C draws), clipped, truncated."""
    out = []
    for im, pos in zip(images.cpu(), positions.tolist()):
        hwc = im.permute(1, 2, 0).numpy().astype(np.float32)
        eps = np.random.RandomState(seed + int(pos)).normal(0, sigma, hwc.shape).astype(np.float32)
        out.append(torch.from_numpy(np.clip(hwc + eps * 255.0, 0, 255).astype(np.uint8)).permute(2, 0, 1))
    return torch.stack(out).to(images.device)


def equivariance_params(position: int, seed: int) -> tuple[int, float]:
    """(rotation in degrees, scale) of the image at ``position``, seeded with ``seed + position``."""
    rs = np.random.RandomState(seed + int(position))
    rotation = int(rs.choice(list(ROTATIONS)))
    return rotation, float(rs.choice(list(SCALES)))


def reduced_size(size: int, scale: float, multiple: int) -> int:
    """``size * scale`` rounded to a multiple of ``multiple`` (at least one)."""
    return max(multiple, int(round(size * scale / multiple)) * multiple)


def rotate_downscale(images: torch.Tensor, rotation: int, size: int) -> torch.Tensor:
    """uint8 NCHW rotated by ``rotation`` degrees (counter-clockwise, as np.rot90) and resized to
    ``size`` px (antialiased bilinear), uint8."""
    x = torch.rot90(images, rotation // 90, dims=(-2, -1))
    if x.shape[-1] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def transformed_sets(images: torch.Tensor, positions: torch.Tensor, seed: int, multiple: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The five transformed versions of a batch, each a list of (rows of the batch, images) groups
    of one image size: four noise levels (one group each), then rotation+scale (one group per size)."""
    sets = [[(torch.arange(len(images)), noisy(images, s, positions, seed))] for s in NOISE_SIGMAS]
    params = [equivariance_params(int(p), seed) for p in positions]
    size = images.shape[-1]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (rot, sc) in enumerate(params):
        groups.setdefault((reduced_size(size, sc, multiple), rot), []).append(i)
    eq = []
    for (s, rot), rows in sorted(groups.items()):
        r = torch.tensor(rows)
        eq.append((r, rotate_downscale(images[r.to(images.device)], rot, s)))
    return sets + [eq]


def _ordered(groups: list[tuple[torch.Tensor, torch.Tensor]], fn: Callable[[torch.Tensor], torch.Tensor], n: int) -> torch.Tensor:
    """fn over each group of images, rows put back in batch order."""
    out: torch.Tensor | None = None
    for rows, x in groups:
        f = fn(x).float().cpu()
        if out is None:
            out = torch.empty((n, f.shape[1]), dtype=torch.float32)
        out[rows] = f
    assert out is not None
    return out


class BlockFeatures:
    """Mean-pooled patch tokens of every block of a diffusion model at t = 0.5 (null label); a model
    with a class token (REG, ``joint_dim``) gets the noisy class token and its token 0 is left out."""

    def __init__(self, model: torch.nn.Module, class_token: Callable[[torch.Tensor], torch.Tensor] | None):
        self.model, self.class_token = model, class_token
        self.prefix = 1 if getattr(model, "joint_dim", 0) else 0
        if self.prefix and class_token is None:
            raise ValueError("a diffusion model with a class token needs class_token(images)")

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, images: torch.Tensor, gen: torch.Generator) -> dict[int, torch.Tensor]:
        feats: dict[int, torch.Tensor] = {}
        p = self.prefix

        def hook(k):
            def fn(module, inputs, output):
                tokens = output[0] if isinstance(output, tuple) else output
                feats[k] = tokens[:, p:].mean(1).float().cpu()
            return fn

        handles = [blk.register_forward_hook(hook(k)) for k, blk in enumerate(self.model.blocks, 1)]
        try:
            t = torch.full((z.shape[0],), DIFFUSION_T, device=z.device)
            eps = torch.randn(z.shape, generator=gen).to(z.device)
            x_t = DIFFUSION_T * eps + (1 - DIFFUSION_T) * z  # t = 0.5: the same in either time convention
            null = torch.full((z.shape[0],), self.model.num_classes, device=z.device, dtype=torch.long)
            if p:
                cls = self.class_token(images).to(z.device, torch.float32)
                cls_t = DIFFUSION_T * torch.randn(cls.shape, generator=gen).to(z.device) + (1 - DIFFUSION_T) * cls
                self.model(x_t, t, null, joint=cls_t)
            else:
                self.model(x_t, t, null)
        finally:
            for h in handles:
                h.remove()
        return feats


def protocol(n: int, seed: int, topk: int, ref_name: str, ref_weights: str, sizes: dict[float, int]) -> dict[str, Any]:
    return {
        "num_images": n, "sample": "seeded random sample of the val split (torch.randperm), index order", "sample_seed": seed,
        "topk": topk, "reference_vfm": ref_name, "reference_weights": ref_weights, "reference_layer": -1,
        "pooling": "mean over patch tokens", "preprocess": "remove_outliers(q=0.95, exact) + L2 rows",
        "noise_sigmas": list(NOISE_SIGMAS), "rotations": list(ROTATIONS), "scales": list(SCALES),
        "scaled_sizes": {str(k): v for k, v in sizes.items()}, "transform_seeding": "np.random.RandomState(seed + position)",
        "tokenizer_features": "posterior mean", "diffusion_t": DIFFUSION_T, "diffusion_label": "null",
    }


def evaluate_alignment(host, run_dir: Path, num_images: int = NUM_IMAGES, topk: int = 10, reference_vfm: str = "",
                       seed: int = SEED) -> tuple[list[dict[str, Any]], Path]:
    """CKNNA of the reference VFM vs the run's tokenizer (plus SE-CKNNA) and vs each diffusion block.
    Writes ``alignment/alignment.json`` (rows with their protocol) and ``alignment/alignment.png``."""
    from .build import BuildContext
    from .checkpoint import load_torch, write_json
    from .config import RunConfig, build_dataclass
    from .metrics.cknna import layer_table, plot_layer_table
    from .context import RunContext
    from .vfm import build_vfm

    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.json); pass a folder written by `vfmbench run`")
    if not (run_dir / "tokenizer" / "model.pt").is_file():
        raise UserError(f"{run_dir} has no trained tokenizer (tokenizer/model.pt); run its tokenizer stage first")
    if topk < 2:
        raise UserError(f"--topk must be at least 2 (CKNNA's neighbours), got {topk}")
    cfg = build_dataclass(RunConfig, json.loads(cfg_path.read_text())["config"])
    run = RunContext(host=host, cfg=cfg, run_dir=run_dir)
    tok = run.tokenizer()
    ref_cfg = cfg.vfm
    if reference_vfm:
        ref_cfg = dataclasses.replace(cfg.vfm, name=reference_vfm, layers=[])
    elif not host.tokenizers.get(cfg.tokenizer.name).uses_vfm and not cfg.vfm.name:
        raise UserError("this run's tokenizer has no VFM; name the reference with --reference-vfm")
    cache_dir = BuildContext(host=host, config=cfg).cache_dir
    ref = build_vfm(host.vfms.get(ref_cfg.name), ref_cfg, cache_dir=cache_dir).to(run.device)
    idx = sample_indices(len(run.dataset("val")), num_images, seed)
    n = len(idx)
    if n <= topk:
        raise UserError(f"eval alignment needs more images than --topk {topk}; the val split gives {n}")
    res = cfg.data.resolution
    multiple = max(1, res // tok.latent_shape(res)[-1])
    blocks = None
    model_path = run_dir / "diffusion" / "model.pt"
    if model_path.is_file():
        model = run.diffusion_model()
        if hasattr(model, "blocks"):
            model.load_state_dict(load_torch(model_path, run.device))
            model.eval()
            class_token = None
            if getattr(model, "joint_dim", 0):
                from .alignment import AlignmentRequest, build_alignment_vfm

                req = AlignmentRequest.parse(model.alignment_request())
                align_vfm = build_alignment_vfm(host, cfg, req, run.device, cache_dir)
                class_token = lambda x: align_vfm(x, [req.layer]).prefix[req.layer][:, 0]  # noqa: E731
            blocks = BlockFeatures(model, class_token)

    def vfm_feats(x):
        return ref(x.to(run.device), [-1]).layers[-1].mean(1)

    def tok_feats(x):
        return tok.encode(x.to(run.device)).mean.mean(dim=(2, 3))

    clean_ref, clean_tok = [], []
    trans: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in range(len(NOISE_SIGMAS) + 1)]
    block_feats: dict[int, list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, n, BATCH):
            positions = torch.arange(start, min(start + BATCH, n))
            images, _ = run.image_batch("val", idx[positions])
            whole = [(torch.arange(len(positions)), images)]
            clean_ref.append(_ordered(whole, vfm_feats, len(positions)))
            clean_tok.append(_ordered(whole, tok_feats, len(positions)))
            for k, groups in enumerate(transformed_sets(images, positions, seed, multiple)):
                trans[k][0].append(_ordered(groups, vfm_feats, len(positions)))
                trans[k][1].append(_ordered(groups, tok_feats, len(positions)))
            if blocks is not None:
                z = tok.normalize(tok.encode(images).mean)
                for k, f in blocks(z, images, gen).items():
                    block_feats.setdefault(k, []).append(f)
    ref_clean = torch.cat(clean_ref)
    clean = {"tokenizer": (ref_clean, torch.cat(clean_tok))}
    transformed = {"tokenizer": [(torch.cat(a), torch.cat(b)) for a, b in trans]}
    for k in sorted(block_feats):
        clean[f"block {k}"] = (ref_clean, torch.cat(block_feats[k]))
    rows = layer_table(clean, transformed, topk=topk)
    proto = protocol(n, seed, topk, ref.spec.name, ref.weights_id, {s: reduced_size(res, s, multiple) for s in SCALES})
    for r in rows:
        r["protocol"] = proto
    out = run_dir / "alignment"
    write_json(out / "alignment.json", {"reference_vfm": ref.spec.name, "reference_weights": ref.weights_id, "num_images": n,
                                         "topk": topk, "label": "smoke" if cfg.run.smoke else "official", "protocol": proto,
                                         "rows": rows})
    png = plot_layer_table(rows, out / "alignment.png", title=f"CKNNA to {ref.spec.name} ({run_dir.name})")
    return rows, png
