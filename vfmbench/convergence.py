"""Convergence evaluation of a diffusion model during training: gFID versus images seen.

When a diffusion model's ``convergence_eval()`` returns settings (``every_images``,
``num_images``, ``steps``, ``cfg_scale``), the runner trains in segments that end at
``every_images``, ``2 * every_images``, ... and ``diffusion.train.images``. After each segment the
EMA weights sample ``num_images`` images (0 = ``diffusion.sample.num_images``) with the run's
sampler settings but ``steps`` (0 = ``diffusion.sample.steps``) and ``cfg_scale``, the same labels
and noise at every point (seed ``run.seed + 3``), and an ``Evaluator`` with the run's settings
computes the curve's metrics (``CURVE_METRICS`` among the run's selected ones: gFID and IS, which
share one Inception pass; sFID, KID and precision/recall are left to the final gen-eval stage).
Each point's rows carry ``diffusion_images`` (images seen),
``diffusion_epochs`` (over the training split) and ``evaluation: convergence`` in their protocol.

Output in the diffusion stage's folder: ``convergence.jsonl`` (full result rows, rewritten after
every point), ``convergence.png`` (gFID against images, epochs on the top axis) and
``convergence/samples-<images>.png`` grids. Training resumes from its checkpoint as usual; segments
whose point is already in ``convergence.jsonl`` are skipped (training continues in the next one).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write
from .errors import UserError
from .images import save_grid
from .results import read_rows, write_rows

SEED_OFFSET = 3  # run.seed + 3: the convergence samples (stage_sample uses + 2)
CURVE_METRICS = ("gfid", "is")


def eval_points(total: int, every: int) -> list[int]:
    """Segment ends in images: multiples of ``every`` below ``total``, then ``total``."""
    if every <= 0 or total <= 0:
        return [total]
    return list(range(every, total, every)) + [total]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, *, num_images: int, num_classes: int, latent_shape: tuple[int, ...],
             sampler: str, steps: int, cfg_scale: float, cfg_interval, timestep_shift: float, label_sampling: str,
             precision: str, batch_size: int, seed: int, device: torch.device, guided_channels: int = 0,
             joint_cfg_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded uint8 samples [n, 3, H, W] on the CPU and their labels, drawn from ``seed``."""
    from .sampling import sample, sample_labels

    model.eval()
    gen = torch.Generator(device).manual_seed(seed)
    labels = sample_labels(num_images, num_classes, mode=label_sampling, generator=gen).to(device)
    out = []
    for start in range(0, num_images, batch_size):
        y = labels[start : start + batch_size]
        noise = torch.randn((y.shape[0], *latent_shape), generator=gen, device=device)
        z = sample(model, noise, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale, cfg_interval=tuple(cfg_interval),
                   timestep_shift=timestep_shift, guided_channels=guided_channels, joint_cfg_scale=joint_cfg_scale,
                   generator=gen, precision=precision)
        out.append(tokenizer.decode_uint8(tokenizer.denormalize(z)).cpu())
    return torch.cat(out), labels.cpu()


def plot_curve(rows: list[dict[str, Any]], out_path: str | Path, images_per_epoch: int, metric: str = "gfid", title: str = "") -> Path | None:
    """``metric`` against ``diffusion_images`` of convergence rows, with epochs on the top axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["protocol"]["diffusion_images"], r["value"]) for r in rows if r["metric"] == metric)
    if not pts:
        return None
    x, y = zip(*pts)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(x, y, marker="o")
    ax.set_xlabel("training images seen")
    ax.set_ylabel(metric)
    if images_per_epoch > 0:
        top = ax.secondary_xaxis("top", functions=(lambda v: v / images_per_epoch, lambda e: e * images_per_epoch))
        top.set_xlabel("epochs")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = atomic_write(out_path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out


class ConvergenceCurve:
    """The convergence evaluation of one run's diffusion stage (``run`` is the stage's ``vfmbench.context.RunContext``)."""

    def __init__(self, run, model: nn.Module, settings: dict[str, Any], out_dir: Path):
        self.run, self.model, self.out_dir = run, model, Path(out_dir)
        sc = run.cfg.diffusion.sample
        self.every = int(settings["every_images"])
        self.num_images = int(settings.get("num_images") or sc.num_images)
        self.steps = int(settings.get("steps") or sc.steps)
        self.cfg_scale = float(settings.get("cfg_scale", 1.0))
        self.rows_path = self.out_dir / "convergence.jsonl"
        self.png_path = self.out_dir / "convergence.png"
        self.rows: list[dict[str, Any]] = read_rows(self.rows_path) if self.rows_path.exists() else []
        selected = run.cfg.metrics.names or run.host.metrics.names()
        canonical = [run.host.metrics.get(n).name for n in selected]
        self.metrics = [m for m in CURVE_METRICS if m in canonical]
        if "gfid" not in self.metrics:
            raise UserError("the convergence evaluation (diffusion.args.eval_every_images > 0) needs the gfid metric; "
                            "add it to metrics.names or set diffusion.args.eval_every_images=0")
        self._evaluator = None

    def evaluator(self):
        """An ``Evaluator`` with the run's settings restricted to the curve's metrics."""
        if self._evaluator is None:
            from .build import default_cache_dir
            from .evaluate import Evaluator

            cfg = dataclasses.replace(self.run.cfg, metrics=dataclasses.replace(self.run.cfg.metrics, names=list(self.metrics)))
            self._evaluator = Evaluator(self.run.host, cfg, self.run.device, default_cache_dir(cfg))
        return self._evaluator

    def points(self, total: int) -> list[int]:
        return eval_points(total, self.every)

    def done(self) -> set[int]:
        """``diffusion_images`` of the points evaluated so far."""
        return {int(r["protocol"]["diffusion_images"]) for r in self.rows}

    def is_done(self, point: int, batch_size: int) -> bool:
        """Whether the segment ending at ``point`` was evaluated (training stops at the first whole batch at or past it)."""
        return -(-point // batch_size) * batch_size in self.done()

    def evaluate(self, nimg: int) -> list[dict[str, Any]]:
        """Sample with the model's current (EMA) weights, compute the generation metrics, store and plot; skipped when done."""
        if nimg in self.done():
            return []
        run, sc = self.run, self.run.cfg.diffusion.sample
        tok = run.tokenizer()
        images, labels = generate(
            self.model, tok, num_images=self.num_images, num_classes=run.num_classes,
            latent_shape=tok.latent_shape(run.cfg.data.resolution), sampler=sc.sampler, steps=self.steps,
            cfg_scale=self.cfg_scale, cfg_interval=sc.cfg_interval, timestep_shift=sc.timestep_shift,
            label_sampling=sc.label_sampling, precision=run.cfg.sample_precision, batch_size=sc.batch_size,
            seed=run.cfg.run.seed + SEED_OFFSET, device=run.device, guided_channels=sc.guided_channels, joint_cfg_scale=sc.joint_cfg_scale,
        )
        grid = f"convergence/samples-{nimg:012d}.png"
        save_grid(images[torch.argsort(labels, stable=True)[:64]], self.out_dir / grid)
        ev = self.evaluator()
        bs = run.cfg.metrics.batch_size
        for start in range(0, images.shape[0], bs):
            ev.add_samples(images[start : start + bs].to(run.device))
        if run.cfg.metrics.reference:  # as the gen-eval stage: an ADM reference batch, else the val split
            reference = ev.adm_reference(run.cfg.metrics.reference)
        else:
            n_val = len(run.dataset("val"))
            reference = ev.dataset_reference(run.val_reference_key(n_val), run.val_reference_batches(n_val))
        from .sampling import sampler_protocol

        extra = {
            **sampler_protocol(dataclasses.replace(sc, steps=self.steps, cfg_scale=self.cfg_scale)),
            "label_sampling": sc.label_sampling, "sample_precision": run.cfg.sample_precision, "diffusion_images": int(nimg),
            "diffusion_epochs": round(nimg / len(run.dataset("train")), 4), "weights": "ema", "evaluation": "convergence",
        }
        rows = ev.finish("generation", reference, extra_protocol=extra)
        rel = f"{self.out_dir.name}/{grid}"
        new = [run.row(r, images={"samples": rel}) for r in rows]
        self.rows += new
        write_rows(self.rows_path, self.rows)
        name = getattr(getattr(self.model, "spec", None), "name", "diffusion")
        plot_curve(self.rows, self.png_path, len(run.dataset("train")), title=f"{name}: gFID ({self.num_images} samples, {sc.sampler} {self.steps} steps, cfg {self.cfg_scale:g})")
        return new

    def summary(self) -> dict[str, Any]:
        return {str(int(r["protocol"]["diffusion_images"])): r["value"] for r in self.rows if r["metric"] == "gfid"}
