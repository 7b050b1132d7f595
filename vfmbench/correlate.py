"""``vfmbench leaderboard --correlate METRIC``: how well each latent metric predicts a target metric
(gFID by default in the docs, any metric name works) across the runs a user has.

Pairs: a predictor row (family ``latent``, and rFID as the baseline) and a target row of the same run (same ``run_id``), or, for
published numbers (label ``paper``, e.g. ``leaderboards/published-gfid-cross-family.yaml``), of the
same ``tokenizer``. Pairs are grouped by (latent metric, the latent row's protocol id, the target
row's protocol id): only values measured under one protocol are correlated. Per group: n, Pearson,
Spearman and Kendall coefficients (scipy.stats) with percentile bootstrap 95% intervals (runs
resampled with replacement, seeded), a markdown table and one scatter plot (PNG) per group.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .results import protocol_id

BOOTSTRAP = 1000
MIN_POINTS = 3
# reported beside the latent metrics: across families, reconstruction can dominate gFID (diffusability.md §8)
BASELINES = ("rfid",)
# target-protocol keys shown under each table's heading (the full protocols are in the leaderboard tables)
TARGET_KEYS = ("diffusion", "guidance", "cfg_scale", "sampler", "steps", "diffusion_images", "num_images", "epochs")


@dataclass
class Group:
    metric: str
    latent_pid: str
    target_pid: str
    higher_is_better: bool
    target_protocol: dict[str, Any] = field(default_factory=dict)
    labels: set[str] = field(default_factory=set)
    points: list[tuple[str, float, float]] = field(default_factory=list)  # (run or tokenizer, latent value, target value)

    @property
    def smoke(self) -> bool:
        return "smoke" in self.labels


def _coefficients(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, math.nan
    return (float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0]), float(stats.kendalltau(x, y)[0]))


def correlations(x: Any, y: Any, n_boot: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """n, Pearson r, Spearman rho, Kendall tau and their percentile bootstrap 95% intervals."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out: dict[str, Any] = {"n": int(x.size)}
    point = _coefficients(x, y)
    rng = np.random.default_rng(seed)
    boot = np.array([_coefficients(x[i], y[i]) for i in (rng.integers(0, x.size, x.size) for _ in range(n_boot))]) if n_boot else np.empty((0, 3))
    for j, name in enumerate(("pearson", "spearman", "kendall")):
        out[name] = point[j]
        col = boot[:, j][~np.isnan(boot[:, j])] if boot.size else boot
        out[f"{name}_ci"] = (float(np.percentile(col, 2.5)), float(np.percentile(col, 97.5))) if col.size else (math.nan, math.nan)
    return out


def pair_rows(rows: list[dict[str, Any]], target: str) -> list[Group]:
    """Latent rows paired with the target metric's rows, grouped by protocols (see the module docstring)."""
    targets = [r for r in rows if r.get("metric") == target]
    if not targets:
        known = sorted({r.get("metric", "") for r in rows})
        raise UserError(f"--correlate {target!r}: no result row has that metric (the rows have: {', '.join(known)})")
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for t in targets:
        if t.get("label") == "paper":
            if t.get("tokenizer"):
                by_key[("tokenizer", t["tokenizer"])].append(t)
        else:
            by_key[("run", t["run_id"])].append(t)
    groups: dict[tuple[str, str, str], Group] = {}
    for r in rows:
        if (r.get("family") != "latent" and r.get("metric") not in BASELINES) or r.get("metric") == target:
            continue
        keys = [("tokenizer", r.get("tokenizer", ""))] if r.get("label") == "paper" else [("run", r["run_id"]), ("tokenizer", r.get("tokenizer", ""))]
        lpid = protocol_id(r)
        for key in keys:
            for t in by_key.get(key, []):
                k = (r["metric"], lpid, protocol_id(t))
                g = groups.setdefault(k, Group(r["metric"], lpid, k[2], bool(r.get("higher_is_better")), dict(t.get("protocol") or {})))
                g.labels.update({r.get("label", ""), t.get("label", "")})
                g.points.append((str(r["run_id"]) if key[0] == "run" else str(r.get("tokenizer")), float(r["value"]), float(t["value"])))
    if not groups:
        raise UserError(f"--correlate {target!r}: no latent row shares a run (or, for published numbers, a tokenizer) with a {target} row; "
                        "run the latent-eval stage on runs that have the target metric")
    return [groups[k] for k in sorted(groups)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def scatter(group: Group, target: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p[1] for p in group.points]
    y = [p[2] for p in group.points]
    fig, ax = plt.subplots(figsize=(4.5, 3.6), dpi=120)
    ax.scatter(x, y, s=18)
    for name, a, b in group.points:
        ax.annotate(name[:24], (a, b), fontsize=6, alpha=0.7)
    ax.set_xlabel(f"{group.metric} ({'higher' if group.higher_is_better else 'lower'} is better)")
    ax.set_ylabel(target)
    ax.set_title(f"{group.metric} vs {target}" + (" · smoke" if group.smoke else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _ci(v: float, ci: tuple[float, float]) -> str:
    if math.isnan(v):
        return "–"
    return f"{v:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def report(rows: list[dict[str, Any]], target: str, plot_dir: Path, link_base: Path, n_boot: int = BOOTSTRAP, seed: int = 0) -> str:
    """The markdown section (one table per pair of protocols) and the scatter plots in ``plot_dir``."""
    from tabulate import tabulate

    groups = pair_rows(rows, target)
    out = [f"## Latent metrics as predictors of {target}", "",
           f"Correlation of each latent metric (and rFID, the baseline) with `{target}` over runs measured under one protocol (n = runs; "
           f"95% percentile bootstrap intervals over {n_boot} resamples, seed {seed}). Validity across tokenizer families "
           "(latent shape, scale) is not established: compare within a family first (docs/latent-metrics.md).", ""]
    by_pids: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in groups:
        by_pids[(g.latent_pid, g.target_pid)].append(g)
    for (lpid, tpid), gs in sorted(by_pids.items()):
        smoke = any(g.smoke for g in gs)
        paper = any("paper" in g.labels for g in gs)
        tag = "smoke" if smoke else ("paper" if paper else "official")
        shown = "; ".join(f"{k}={v}" for k, v in sorted(gs[0].target_protocol.items()) if k in TARGET_KEYS)
        out += [f"### predictor protocol `{lpid}` × {target} protocol `{tpid}` · `{tag}`", ""] + ([f"{target} protocol: {shown}", ""] if shown else [])
        if smoke:
            out += ["> **smoke**: random-init models on tiny data; these correlations test the pipeline only.", ""]
        table = []
        for g in gs:
            c = correlations([p[1] for p in g.points], [p[2] for p in g.points], n_boot if len(g.points) >= MIN_POINTS else 0, seed)
            png = scatter(g, target, plot_dir / f"{_safe(target)}-{_safe(g.metric)}-{g.latent_pid[:8]}-{g.target_pid[:8]}.png")
            link = Path(_rel(png, link_base)).as_posix()
            if c["n"] < MIN_POINTS:
                table.append([g.metric, "↑" if g.higher_is_better else "↓", c["n"], "–", "–", "–", f"[scatter]({link})"])
                continue
            table.append([g.metric, "↑" if g.higher_is_better else "↓", c["n"], _ci(c["pearson"], c["pearson_ci"]),
                          _ci(c["spearman"], c["spearman_ci"]), _ci(c["kendall"], c["kendall_ci"]), f"[scatter]({link})"])
        out.append(tabulate(table, headers=["predictor", "better", "n", "Pearson r [95% CI]", "Spearman ρ [95% CI]", "Kendall τ [95% CI]", "plot"],
                            tablefmt="github", disable_numparse=True))
        out.append("")
    return "\n".join(out)


def _rel(target: Path, base: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), base.resolve())
