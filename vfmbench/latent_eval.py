"""The ``latent-eval`` stage: latent diffusability metrics of a run's tokenizer (family ``latent``).

After ``latents`` (stage module ``vfmbench.stages.latent_eval``): every rank encodes its block of the val split to posterior means (and, for the
first ``metrics.latent.equivariance_images``, the equivariance errors); rank 0 gathers them into
``latent-eval/val_means.pt`` (read back when the stage is re-run after an interruption). Rank 0
standardises the means per channel (mu and sigma written to ``standardisation.json``) and computes
the latent-only metrics; iFID then decodes each rank's block of interpolated latents and featurises
it with Inception (the sharded evaluator), against the val images' cached features.

``latent_rows`` is the pure part (latents, labels, settings -> rows), used by tests and ``bench/``.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .metrics.latent import NotApplicable, standardise
from .specs import MetricSpec

STAGE = "latent-eval"
NORMALISATION = "per-channel standardised over (N, H, W), Bessel sigma, from the val posterior means"
SLOW = ("uniformity-cv", "uniformity-gini", "uniformity-entropy")


def validate(cfg) -> None:
    """Bad ``metrics.latent`` settings, before any work."""
    lc = cfg.metrics.latent
    if lc.k < 1:
        raise UserError(f"metrics.latent.k must be >= 1 (nearest neighbours of LNC), got {lc.k}")
    if not 0.0 < lc.twonn_fraction <= 1.0:
        raise UserError(f"metrics.latent.twonn_fraction must be in (0, 1], got {lc.twonn_fraction}")
    if lc.viv_iterations < 1:
        raise UserError(f"metrics.latent.viv_iterations must be >= 1, got {lc.viv_iterations}")
    if not 0.0 <= lc.srss_min_fraction < 1.0:
        raise UserError(f"metrics.latent.srss_min_fraction must be in [0, 1), got {lc.srss_min_fraction}")
    if not 0.0 < lc.ifid_alpha < 1.0:
        raise UserError(f"metrics.latent.ifid_alpha must be in (0, 1), got {lc.ifid_alpha}")
    for name in ("images", "equivariance_images", "uniformity_points", "uniformity_repeats", "ifid_neighbours"):
        if getattr(lc, name) < 0:
            raise UserError(f"metrics.latent.{name} must be >= 0, got {getattr(lc, name)}")
    if lc.masks and not Path(lc.masks).is_dir():
        raise UserError(f"metrics.latent.masks={lc.masks!r} is not a folder; pass an ImageNet-S-layout folder <class>/<image>.png or ''")


def selected_specs(specs: list[MetricSpec], lc) -> list[MetricSpec]:
    """The run's latent metrics: uniformity only when ``metrics.latent.uniformity``."""
    return [s for s in specs if s.family == "latent" and (lc.uniformity or s.name not in SLOW)]


def settings(lc, seed: int) -> dict[str, Any]:
    return {"k": lc.k, "viv_iterations": lc.viv_iterations, "twonn_fraction": lc.twonn_fraction, "seed": seed,
            "uniformity_points": lc.uniformity_points, "uniformity_repeats": lc.uniformity_repeats,
            "srss_min_fg": 0, "srss_min_bg": 0}


def latent_rows(specs: list[MetricSpec], z: Any, labels: Any, st: dict[str, Any], masks: Any = None,
                equivariance: dict[str, np.ndarray] | None = None, protocol: dict[str, Any] | None = None,
                smoke: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the ``latents`` and ``encoder`` metrics of ``specs`` for posterior means ``z``
    [N, C, H, W]: standardised here; ``protocol`` is added to each row's. Returns (rows, info) with
    info holding mu, sigma, each metric's seconds and the skipped metrics with the reason."""
    zs, mu, sigma = standardise(z)
    y = np.asarray(labels).reshape(-1)
    g = zs.shape[-1]
    st = dict(st)
    if masks is not None:
        cells = zs.shape[-1] * zs.shape[-2]
        st["srss_min_fg"] = st["srss_min_bg"] = int(round(st.get("srss_min_fraction", 0.0) * cells))
    features = {"latents": zs, "labels": y, "masks": masks, "settings": st}
    base = {"num_images": int(zs.shape[0]), "classes": int(len(np.unique(y))), "latents": "posterior mean", "normalisation": NORMALISATION,
            "seed": st["seed"], "k": st["k"], "lnc_pooling": "foreground (masks)" if masks is not None else "global mean",
            "viv_iterations": st["viv_iterations"], "viv_convention": "per-dimension mean", "sec_distance": "manhattan u+v",
            "twonn_fraction": st["twonn_fraction"], **(protocol or {})}
    if masks is not None:
        base.update(srss_min_fg=st["srss_min_fg"], srss_min_bg=st["srss_min_bg"])
    if any(s.name in SLOW for s in specs):
        base.update(uniformity_points=st["uniformity_points"], uniformity_repeats=st["uniformity_repeats"],
                    tsne="sklearn TSNE 2-D, perplexity 30, 1000 iterations; scipy gaussian_kde")
    memo: dict[Any, Any] = {}
    rows, seconds, skipped = [], {}, {}
    for s in specs:
        if s.inputs not in ("latents", "encoder"):
            continue
        t0 = time.perf_counter()
        try:
            if s.inputs == "encoder":
                if not equivariance:
                    raise NotApplicable("needs the encoder (equivariance images)")
                stats = s.stats(equivariance)
                proto = {k: v for k, v in base.items() if k in ("latents", "seed")} | {"num_images": int(equivariance.get("images", 0))} | (equivariance.get("protocol") or {})
            else:
                if s.stats not in memo:
                    memo[s.stats] = s.stats(features)
                stats = memo[s.stats]
                proto = base
            value = s.value(stats, None)
        except NotApplicable as e:
            skipped[s.name] = str(e)
            continue
        seconds[s.name] = round(time.perf_counter() - t0, 3)
        rows.append({"metric": s.name, "metric_version": s.version, "family": s.family, "value": float(value),
                     "higher_is_better": s.higher_is_better, "protocol": dict(proto), "smoke": smoke})
    info = {"mu": [float(v) for v in mu], "sigma": [float(v) for v in sigma], "grid": list(zs.shape[1:]), "metric_seconds": seconds, "skipped": skipped}
    return rows, info


def run_stage(run) -> dict[str, Any]:
    """The ``latent-eval`` stage on a ``vfmbench.context.RunContext`` (every rank calls it)."""
    from . import dist
    from .checkpoint import load_torch, save_torch, write_json
    from .metrics.latent_model import equivariance_errors, transforms
    cfg, lc = run.cfg, run.cfg.metrics.latent
    d = run.stage_dir(STAGE)
    d.mkdir(parents=True, exist_ok=True)
    ev = run.evaluator()
    specs = selected_specs(ev.specs, lc)
    if not specs:  # metrics.names selects no latent metric
        if dist.is_main():
            run.write_rows([])
        return {"metrics": {}}
    tok = run.tokenizer()
    n_val = len(run.dataset("val"))
    n = min(lc.images, n_val) if lc.images else n_val
    transforms_ = transforms(cfg.data.resolution, tok.downsample)
    want_eq = lc.equivariance_images > 0 and any(s.inputs == "encoder" for s in specs)
    means_path = d / "val_means.pt"
    if dist.broadcast_object(means_path.exists() if dist.is_main() else None):
        saved = load_torch(means_path)
    else:
        zs, ys, eq, eq_skipped = [], [], {}, {}
        with torch.no_grad():
            for start, images, y, post, _ in run.posteriors("val", n, "latent-eval: encode val"):
                zs.append(post.mean.float().cpu())
                ys.append(y.cpu())
                m = max(0, min(images.shape[0], lc.equivariance_images - start)) if want_eq else 0
                if m:
                    for group, e in equivariance_errors(lambda x: tok.encode(x).mean, images[:m], transforms_, eq_skipped).items():
                        eq.setdefault(group, []).append(e)
        local = (torch.cat(zs), torch.cat(ys), {k: np.concatenate(v) for k, v in eq.items()}, eq_skipped) if zs else None
        parts = [p for p in dist.gather_object(local) or [] if p is not None]
        saved = None
        if dist.is_main():
            groups = sorted({g for p in parts for g in p[2]})
            saved = {"means": torch.cat([p[0] for p in parts]), "labels": torch.cat([p[1] for p in parts]),
                     "equivariance": {g: torch.from_numpy(np.concatenate([p[2][g] for p in parts if g in p[2]])) for g in groups},
                     "equivariance_skipped": {k: v for p in parts for k, v in p[3].items()}}
            save_torch(saved, means_path)
        dist.barrier()
        if not dist.is_main():
            saved = load_torch(means_path)
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    if dist.is_main():
        masks = None
        if lc.masks:
            from .metrics.latent_spatial import load_masks

            full, present = load_masks(run.dataset("val"), lc.masks, saved["means"].shape[-1])
            masks = full[:n]  # images without a mask file: no foreground (left out of SRSS, globally pooled for LNC)
        eq: dict[str, Any] = {g: e.numpy() for g, e in saved["equivariance"].items()}
        if eq:
            eq["images"] = min(lc.equivariance_images, n)
            left_out = saved.get("equivariance_skipped", {})
            eq["protocol"] = {"resolution": cfg.data.resolution, "transforms": [t[0] for t in transforms_ if t[0] not in left_out],
                              "interpolation": "bilinear, antialiased; uint8 images rounded"}
        st = settings(lc, cfg.run.seed) | {"srss_min_fraction": lc.srss_min_fraction}
        extra = {"masks": Path(lc.masks).name, "masked_images": int(present[:n].sum())} if lc.masks else {}
        rows, info = latent_rows(specs, saved["means"], saved["labels"], st, masks, eq or None, extra, cfg.run.smoke)
        info["skipped"].update({f"equivariance {k}": v for k, v in saved.get("equivariance_skipped", {}).items()})
        write_json(d / "standardisation.json", {"mu": info["mu"], "sigma": info["sigma"], "grid": info["grid"], "num_images": int(saved["means"].shape[0])})
    rows += _ifid_rows(run, specs, saved["means"], n)
    if not dist.is_main():
        return {}
    run.write_rows(rows)
    return {"metrics": {r["metric"]: r["value"] for r in rows}, **{k: info[k] for k in ("grid", "metric_seconds", "skipped")},
            "vfm_feature_cache": asdict(run.feature_stats)}


def _ifid_rows(run, specs: list[MetricSpec], means: torch.Tensor, n: int) -> list[dict[str, Any]]:
    """iFID (collective under torchrun): rank 0 picks each val latent's train partner, every rank
    decodes the slerps of its block, and the sharded evaluator compares them with the val images."""
    from . import dist
    from .checkpoint import load_torch
    from .metrics.latent_model import interpolation_partners, slerp

    lc = run.cfg.metrics.latent
    if not any(s.name == "ifid" for s in specs):
        return []
    train = load_torch(run.stage_dir("latents") / "train.pt")["latents"]  # the planner runs latent-eval after latents
    partners = interpolation_partners(means, train, lc.ifid_neighbours, run.cfg.run.seed, device=run.device) if dist.is_main() else None
    partners = torch.as_tensor(dist.broadcast_object(partners))
    tok, ev = run.tokenizer(), run.evaluator()
    ev.sharded = True
    bs = run.cfg.metrics.batch_size
    with torch.no_grad():
        for _, start, stop in dist.shard_batches(n, bs):
            z = slerp(means[start:stop], train[partners[start:stop]], lc.ifid_alpha)
            ev.add_samples(tok.decode_uint8(z.to(run.device)))
    n_val = len(run.dataset("val"))
    reference = ev.dataset_reference(run.val_reference_key(n_val), run.val_reference_shard(n_val), take=n)
    extra = {"ifid_neighbours": lc.ifid_neighbours, "ifid_alpha": lc.ifid_alpha, "latents": "val posterior means, train posterior samples (latents stage)",
             "seed": run.cfg.run.seed}
    return ev.finish("latent", reference, extra_protocol=extra)
