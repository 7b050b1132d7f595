"""The zoo leaderboard (``leaderboards/zoo.md``): released tokenizers measured under one protocol.

One table per protocol: a run's rows of every family (reconstruction, latent metrics, probe) form
one line, and runs whose rows carry the same protocols (and label, dataset, split, resolution)
share a table. Each line also shows the release's spec metadata (f/C, encoder/decoder parameters,
native resolution, licence, shipped normalisation). Numbers published by the authors come from a
separate YAML file (``leaderboards/zoo-published.yaml``, each with its source) and are shown in
their own, clearly labelled table: never mixed with, or ranked against, measured rows.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import yaml
from tabulate import tabulate

from .errors import UserError
from .results import protocol_id
from .zoo import is_release

METRIC_ORDER = ["rfid", "psnr", "ssim", "lpips", "probe-top1", "probe-top5"]  # then any others (latent metrics), sorted
PUBLISHED_METRICS = ("rfid", "psnr", "ssim", "lpips")
SMOKE_NOTE = ("> **smoke**: random-init releases, a random-init Inception network and tiny data. These numbers test the "
              "pipeline; they say nothing about the tokenizers.")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "–" if v in (None, "") else str(v)


def _runs(rows: Iterable[dict[str, Any]], host) -> dict[str, dict[str, Any]]:
    """Rows of zoo tokenizers grouped by run: {run_id: {spec, key, metrics, hib}}."""
    runs: dict[str, dict[str, Any]] = {}
    for r in rows:
        name = r.get("tokenizer", "")
        if name not in host.tokenizers or not is_release(host.tokenizers.get(name)):
            continue
        run = runs.setdefault(r["run_id"], {"spec": host.tokenizers.get(name), "row": r, "pids": {}, "metrics": {}, "hib": {}, "protocols": {}})
        run["pids"][r["family"]] = protocol_id(r)
        run["protocols"][r["family"]] = r.get("protocol", {})
        run["metrics"][r["metric"]] = float(r["value"])
        run["hib"][r["metric"]] = bool(r["higher_is_better"])
    return runs


def _protocol_lines(protocols: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for family in sorted(protocols):
        items = "; ".join(f"{k}={v}" for k, v in sorted(protocols[family].items()))
        out.append(f"- {family}: {items}")
    return out


def measured_tables(rows: Iterable[dict[str, Any]], host) -> list[str]:
    runs = _runs(rows, host)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run_id, run in runs.items():
        r = run["row"]
        key = (r.get("label", ""), r.get("dataset", ""), r.get("split", ""), r.get("resolution", ""), tuple(sorted(run["pids"].items())))
        groups.setdefault(key, []).append({"run_id": run_id, **run})
    order = {"official": 0, "paper": 1, "smoke": 2}
    out: list[str] = []
    for key in sorted(groups, key=lambda k: (order.get(k[0], 3), str(k))):
        label, dataset, split, res, pids = key
        members = groups[key]
        metrics = [m for m in METRIC_ORDER if any(m in g["metrics"] for g in members)]
        metrics += sorted({m for g in members for m in g["metrics"]} - set(metrics))
        hib = {m: next(g["hib"][m] for g in members if m in g["hib"]) for m in metrics}
        primary = metrics[0] if metrics else ""
        sign = -1.0 if hib.get(primary) else 1.0
        members.sort(key=lambda g: (sign * g["metrics"].get(primary, math.inf * sign), g["spec"].name))
        pid = "-".join(p for _, p in pids)
        out += [f"## Measured · {dataset} {split} {res} px · `{label}` · protocol `{pid}`", ""]
        if label == "smoke":
            out += [SMOKE_NOTE, ""]
        out += ["Protocol of every row of this table:", *_protocol_lines(members[0]["protocols"]), ""]
        headers = ["#", "tokenizer", "release", "f/C", "enc/dec params (M)", "native px", "licence", "shipped normalisation"]
        headers += [f"{m} {'↑' if hib[m] else '↓'}" for m in metrics]
        table = []
        for i, g in enumerate(members, 1):
            s = g["spec"]
            native = f"{s.native_resolution}" + (" (run at protocol px)" if s.native_resolution and s.native_resolution != res else "")
            table.append([i, s.name, s.release, f"f{s.downsample}c{s.latent_channels}", f"{s.encoder_params_m:g} / {s.decoder_params_m:g}",
                          native, s.license, s.shipped_normalisation] + [_fmt(g["metrics"].get(m)) for m in metrics])
        out += [tabulate(table, headers=headers, tablefmt="github", disable_numparse=True), ""]
    return out


def published_table(path: Path) -> list[str]:
    """The authors' own numbers (``zoo-published.yaml``): one row per entry, with its source."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read published zoo numbers {str(path)!r}: {e}") from None
    rows = []
    for i, e in enumerate(data.get("entries", [])):
        missing = [k for k in ("tokenizer", "source", "metrics") if k not in e]
        if missing:
            raise UserError(f"{path}: entry {i + 1} lacks {missing[0]!r}")
        m = e["metrics"]
        rows.append([e["tokenizer"], e.get("resolution", 256)] + [_fmt(m.get(k)) for k in PUBLISHED_METRICS] + [e["source"]])
    headers = ["tokenizer", "px", "rFID ↓", "PSNR ↑", "SSIM ↑", "LPIPS ↓", "source"]
    return ["## Reported by the authors (not measured here)", "",
            "Copied from papers, READMEs and third-party tables (shared/reference/tokenizer-zoo.md §B). Each uses its own crop,",
            "sample count and FID code, so these numbers are **not comparable** with the measured tables above or with each other.", "",
            tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), ""]


def render_zoo(rows: Iterable[dict[str, Any]], host, published: Path | None = None, title: str = "Released tokenizer zoo") -> str:
    rows = list(rows)
    measured = measured_tables(rows, host)
    if not measured and published is None:
        raise UserError("no result rows of zoo tokenizers to render (zoo entries are the tokenizers with a release; `vfmbench list tokenizers`)")
    out = [f"# {title}", "", "Generated by `vfmbench leaderboard --zoo` (or `vfmbench sweep sweeps/zoo.yaml`); do not edit by hand.",
           "Protocol and folder convention: docs/zoo.md.", ""]
    out += measured or ["_No measured rows yet._", ""]
    if published is not None:
        out += published_table(published)
    return "\n".join(out).rstrip() + "\n"


def check_board(board: Any) -> None:
    """A sweep file's ``leaderboard`` section: {out (required), title, published}; checked before any run."""
    if not isinstance(board, dict) or set(board) - {"out", "title", "published"} or "out" not in board:
        raise UserError(f"sweep 'leaderboard' takes out (required), title, published; got {board!r}")
    if board.get("published") and not Path(board["published"]).is_file():
        raise UserError(f"sweep 'leaderboard': published={board['published']!r} does not exist (relative to the working directory)")


def write_sweep_board(host, board: dict[str, Any], folder: Path) -> Path:
    """The ``leaderboard:`` section of a sweep file: render the sweep's runs to ``board['out']``."""
    from .checkpoint import write_text
    from .leaderboard import collect_rows

    check_board(board)
    published = Path(board["published"]) if board.get("published") else None  # relative to the working directory, as out
    text = render_zoo(collect_rows([folder]), host, published, board.get("title", "Released tokenizer zoo"))
    return write_text(Path(board["out"]), text)
