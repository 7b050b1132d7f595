"""Divergence as an outcome: a training stage that skips too many steps (non-finite loss), or a stage
whose outputs (weights, latents, samples) are not finite, stops the run with a ``DivergenceError``
(exit 2) naming the stage, the step and the setting to look at.

With ``run.allow_divergence=true`` the run finishes instead: ``run_dir/diverged.json`` records each
diverged stage, every result row of the run then carries ``diverged: true`` (``mark_rows``) and
leaderboards mark those rows and rank them last.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import UserError

MARKER = "diverged.json"
ALLOW_HINT = "to finish anyway with its results marked diverged (ranked last), pass --set run.allow_divergence=true"


class DivergenceError(UserError):
    """A stage diverged and ``run.allow_divergence`` is false."""


@dataclass
class DivergencePolicy:
    """What one stage of one run does when it diverges."""

    stage: str  # e.g. "tokenizer", "diffusion", "latents"
    hint: str  # the settings to look at, e.g. "tokenizer.train.lr (now 1e6)"
    max_skipped_fraction: float = 0.1
    allow: bool = False
    run_dir: Path | None = None  # where diverged.json goes (None: nowhere)
    write: bool = True  # this process writes files (rank 0)

    def _diverged(self, what: str, detail: dict[str, Any]) -> None:
        if not self.allow:
            raise DivergenceError(f"{self.stage} stage diverged: {what}. Look at {self.hint}; {ALLOW_HINT}")
        if self.write:
            print(f"[vfmbench] WARNING: {self.stage} stage diverged ({what}); run.allow_divergence=true: the run goes on and "
                  "its results are marked diverged", file=sys.stderr, flush=True)
        record(self.run_dir, self.stage, {"reason": what, **detail}, self.write)

    def after_step(self, skipped: int, steps: int, planned_steps: int, nimg: int) -> None:
        """Stop as soon as the skipped steps exceed the allowed share of the stage's planned steps
        (the final share can then only be larger); with ``allow`` only ``at_end`` records it."""
        if self.allow or planned_steps <= 0:
            return
        if skipped > self.max_skipped_fraction * planned_steps:
            self._diverged(
                f"at step {steps} ({nimg} images) {skipped} of {steps} steps so far had a non-finite loss and were skipped, "
                f"more than run.max_skipped_fraction={self.max_skipped_fraction:g} of the stage's {planned_steps} steps",
                {"step": steps, "skipped_steps": skipped},
            )

    def at_end(self, module: torch.nn.Module, skipped: int, steps: int, nimg: int) -> None:
        """After training: the share of skipped steps, and whether every trained weight is finite."""
        bad = [n for n, p in module.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            self._diverged(f"after step {steps} ({nimg} images) {len(bad)} weight tensors are not finite (e.g. {bad[0]})",
                           {"step": steps, "nonfinite_weights": bad[:5], "skipped_steps": skipped})
        elif steps and skipped > self.max_skipped_fraction * steps:
            self._diverged(f"{skipped} of its {steps} steps had a non-finite loss and were skipped, more than "
                           f"run.max_skipped_fraction={self.max_skipped_fraction:g}", {"step": steps, "skipped_steps": skipped})

    def check_finite(self, what: str, tensors: Iterable[torch.Tensor]) -> None:
        """Outputs of a stage (latents, samples): every value must be finite."""
        for t in tensors:
            if t.numel() and not bool(torch.isfinite(t).all()):
                n = int((~torch.isfinite(t)).sum())
                self._diverged(f"{n} of {t.numel()} values of its {what} are not finite", {"nonfinite_values": n})
                return


def policy(run: Any, stage: str, hint: str) -> DivergencePolicy:
    """The policy of a stage of a ``Run`` (its ``run.allow_divergence`` and ``run.max_skipped_fraction``)."""
    from . import dist

    c = run.cfg.run
    return DivergencePolicy(stage=stage, hint=hint, max_skipped_fraction=c.max_skipped_fraction, allow=c.allow_divergence,
                            run_dir=run.run_dir, write=dist.is_main())


def check_settings(max_skipped_fraction: float) -> None:
    if not (0.0 <= max_skipped_fraction <= 1.0) or math.isnan(max_skipped_fraction):
        raise UserError(f"run.max_skipped_fraction must be within [0, 1] (0.1 = stop when more than 10% of a stage's steps "
                        f"are skipped), got {max_skipped_fraction}")


def record(run_dir: Path | None, stage: str, info: dict[str, Any], write: bool = True) -> None:
    """Add ``stage`` to ``run_dir/diverged.json`` (atomically)."""
    if run_dir is None or not write:
        return
    from .checkpoint import write_json

    data = read(run_dir)
    data[stage] = info
    write_json(Path(run_dir) / MARKER, data)


def read(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / MARKER
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def mark_rows(run_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a run, each with ``diverged: true`` and the diverged stages when the run diverged."""
    stages = read(run_dir)
    if not stages:
        return rows
    return [{**r, "diverged": True, "diverged_stages": sorted(stages)} for r in rows]


def is_diverged(row: dict[str, Any]) -> bool:
    return bool(row.get("diverged"))
