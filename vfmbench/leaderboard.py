"""Leaderboards generated from result rows: one table per (family, protocol), never hand-edited.

Inputs are run directories (their ``results.jsonl``), folders of run directories, results
``.jsonl`` files, or a ``.yaml`` file of published numbers (each with its citation). Output is
deterministic: the same inputs give a byte-identical file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml
from tabulate import tabulate

from .errors import UserError
from .results import protocol_id, read_rows

FAMILY_TITLES = {"reconstruction": "Reconstruction", "generation": "Generation", "representation": "Representation (linear probe on latents)",
                 "latent": "Latent diffusability (no diffusion model)"}
FAMILY_ORDER = ["reconstruction", "representation", "latent", "generation"]
COMPONENT_COLUMNS = [("tokenizer", "tokenizer_version"), ("vfm", "vfm_version"), ("decoder", "decoder_version"), ("diffusion", "diffusion_version")]


class ResultRows(list):
    """Result rows, plus ``failed``: the run directories whose last attempt failed (see ``failed_runs``)."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), failed: list[dict[str, Any]] | None = None):
        super().__init__(rows)
        self.failed = failed or []


def failed_runs(folder: Path) -> list[dict[str, Any]]:
    """Run directories in ``folder`` (or ``folder`` itself) whose ``error.txt`` is newer than any
    finished ``results`` stage: {run, error, combination, job_id}, with the sweep's status row when
    ``folder`` holds a ``sweep-status.jsonl``."""
    status: dict[str, dict[str, Any]] = {}
    for base in (folder, folder.parent):
        f = base / "sweep-status.jsonl"
        if f.is_file():
            for line in f.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                status.setdefault(row.get("run", ""), {}).update(row)
    out = []
    for err in sorted([*folder.glob("error.txt"), *folder.glob("*/error.txt")]):
        done = err.parent / "results" / "done.json"
        if done.exists() and done.stat().st_mtime >= err.stat().st_mtime:
            continue  # succeeded after the error (e.g. re-run by hand)
        row = status.get(err.parent.name, {})
        out.append({"run": err.parent.name, "error": str(err), "combination": row.get("combination") or {}, "job_id": row.get("job_id") or ""})
    return out


def collect_rows(paths: Iterable[str | Path]) -> ResultRows:
    rows = ResultRows()
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(p.glob("results.jsonl")) or sorted(p.glob("*/results.jsonl"))
            failed = failed_runs(p)
            rows.failed.extend(failed)
            if not found and not failed:
                raise UserError(f"{p} holds no results.jsonl (nor do its sub-folders); run `vfmbench run` first or pass a run directory")
            for f in found:
                rows.extend(_with_source(_read(f), f.parent))
        elif p.suffix == ".jsonl" and p.is_file():
            rows.extend(_with_source(_read(p), p.parent))
        elif p.suffix in (".yaml", ".yml") and p.is_file():
            rows.extend(published_rows(p))
        else:
            raise UserError(f"{p} is not a run directory, a results .jsonl or a published-numbers .yaml file")
    return rows


def _read(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file; a line that is not a JSON row is a ``UserError`` naming the file and line."""
    try:
        rows = read_rows(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); it is not a results file written by vfmbench") from None
    except ValueError as e:
        raise UserError(f"{e}: the file is damaged; restore it, delete the line, or re-run the run's results stage "
                        "(`vfmbench run ... --stages results`) to write it again") from None
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not {"metric", "value", "family"} <= set(r):
            raise UserError(f"{path}: row {i} is not a result row (it lacks metric, value or family); pass results.jsonl files written by vfmbench")
    return rows


def _with_source(rows: list[dict[str, Any]], run_dir: Path) -> list[dict[str, Any]]:
    for r in rows:
        r.setdefault("_run_dir", str(run_dir))
    return rows


def published_rows(path: Path) -> list[dict[str, Any]]:
    """Rows from a published-numbers file: entries of system, components, protocol and metrics, each cited."""
    data = yaml.safe_load(path.read_text()) or {}
    rows = []
    for i, e in enumerate(data.get("entries", [])):
        where = f"{path}: entry {i + 1}"
        for key in ("system", "family", "dataset", "resolution", "protocol", "metrics", "citation"):
            if key not in e:
                raise UserError(f"{where} lacks {key!r}")
        for metric, value in e["metrics"].items():
            rows.append({
                "run_id": e["system"], "label": "paper", "family": e["family"], "dataset": e["dataset"], "split": e.get("split", ""),
                "resolution": e["resolution"], "metric": metric, "value": value,
                "higher_is_better": metric in data.get("higher_is_better", []), "protocol": e["protocol"],
                "tokenizer": e.get("tokenizer", ""), "tokenizer_version": "", "vfm": e.get("vfm", ""), "vfm_version": "",
                "decoder": "", "decoder_version": "", "diffusion": e.get("diffusion", ""), "diffusion_version": "",
                "citation": e["citation"], "epochs": e.get("epochs", ""),
            })
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return f"{v} ⚠"  # nan / inf / -inf: not a result (ranked last)
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _unrankable(value: Any) -> bool:
    return not isinstance(value, float) or not math.isfinite(value)


def _text(v: Any) -> str:
    """A cell's text: '' for a missing value (None or NaN, e.g. a column some rows lack)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _component(name: str, version: str, weights: str = "") -> str:
    """A component's cell: name, version and, where given, its weights id (a random-init VFM and the
    same VFM with real weights are different rows)."""
    if not name:
        return "–"
    text = f"{name} v{version}" if version else name
    return f"{text} ({weights})" if weights else text


def _protocol_text(row: dict[str, Any]) -> str:
    proto = row.get("protocol", {})
    items = [f"{k}={json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v}" for k, v in sorted(proto.items())]
    return "; ".join(items)


def render(rows: list[dict[str, Any]], title: str = "vfmbench leaderboard", link_base: Path | None = None) -> str:
    """Markdown with one table per (label, family, protocol), then the failed runs (if any)."""
    failed = getattr(rows, "failed", [])
    if not rows and not failed:
        raise UserError("no result rows to render")
    out = [f"# {title}", "", "Generated by `vfmbench leaderboard` from result rows; do not edit by hand.", ""]
    if rows:
        out += _tables(rows, link_base)
    if failed:
        out += _failed_section(failed, link_base)
    return "\n".join(out).rstrip() + "\n"


def _failed_section(failed: list[dict[str, Any]], link_base: Path | None) -> list[str]:
    lines = ["## Failed runs", "", "The last attempt of these runs raised; they are not ranked above. Re-running the sweep retries them.", ""]
    table = []
    for f in sorted(failed, key=lambda f: f["run"]):
        target = Path(_relpath(Path(f["error"]), link_base)) if link_base is not None else Path(f["error"])
        combo = ", ".join(f"{k}={v}" for k, v in sorted(f["combination"].items()))
        table.append([f["run"], combo or "–", f["job_id"] or "–", f"[error.txt]({target.as_posix()})"])
    lines.append(tabulate(table, headers=["run", "combination", "job", "error"], tablefmt="github", disable_numparse=True))
    lines.append("")
    return lines


def _tables(rows: list[dict[str, Any]], link_base: Path | None) -> list[str]:
    df = pd.DataFrame(rows)
    df["_pid"] = [protocol_id(r) for r in rows]
    out: list[str] = []
    labels = sorted(df["label"].unique(), key=lambda s: {"official": 0, "paper": 1, "smoke": 2}.get(s, 3))
    for label in labels:
        if label == "smoke":
            out += ["> **smoke**: random-init models and a random-init Inception network on tiny data. These numbers test",
                    "> the pipeline; they say nothing about the methods and are never comparable with paper-protocol numbers.", ""]
        sub_l = df[df["label"] == label]
        for family in sorted(sub_l["family"].unique(), key=lambda f: (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else 9, f)):
            sub_f = sub_l[sub_l["family"] == family]
            for pid in sorted(sub_f["_pid"].unique()):
                out += _table(sub_f[sub_f["_pid"] == pid], label, family, pid, link_base)
    return out


def _table(sub: pd.DataFrame, label: str, family: str, pid: str, link_base: Path | None) -> list[str]:
    first = sub.iloc[0].to_dict()
    heading = f"## {FAMILY_TITLES.get(family, family.title())} · {first['dataset']} {first.get('split') or ''} {first['resolution']} px · `{label}` · protocol `{pid}`"
    lines = [heading.replace("  ", " "), "", f"Protocol: {_protocol_text(first)}", ""]
    metrics = sorted(sub["metric"].unique())
    hib = {m: bool(sub[sub["metric"] == m]["higher_is_better"].iloc[0]) for m in metrics}
    keys = ["run_id"] + [c for pair in COMPONENT_COLUMNS for c in pair] + ["vfm_weights"]
    extra_cols = [c for c in ("epochs", "citation") if c in sub.columns and sub[c].fillna("").astype(str).str.len().gt(0).any()]
    records: dict[tuple, dict[str, Any]] = {}
    for _, r in sub.iterrows():
        k = tuple(str(r.get(c, "")) for c in keys)
        rec = records.setdefault(k, {c: r.get(c, "") for c in keys + extra_cols} | {"_images": r.get("images"), "_run_dir": r.get("_run_dir"), "_diverged": False})
        rec[r["metric"]] = float(r["value"]) if r["value"] is not None else math.nan
        rec["_diverged"] = rec["_diverged"] or r.get("diverged") is True
    present = [m for m in metrics]
    primary = present[0]
    for pref in ("viv", "rfid", "gfid", "probe-top1"):
        if pref in present:
            primary = pref
    sign = -1.0 if hib[primary] else 1.0
    # diverged runs and non-finite values are not results: ranked after every finite value of a run that converged
    ordered = sorted(records.values(), key=lambda r: (r["_diverged"], _unrankable(r.get(primary)),
                                                     sign * r[primary] if not _unrankable(r.get(primary)) else 0.0, str(r["run_id"])))
    show_components = [(n, v) for n, v in COMPONENT_COLUMNS if any(str(r.get(n, "") or "") for r in ordered)]
    headers = ["#", "run"] + [n for n, _ in show_components] + [f"{m} {'↑' if hib[m] else '↓'}" for m in present] + extra_cols
    has_images = any(isinstance(r["_images"], dict) and r["_images"] for r in ordered)
    if has_images:
        headers.append("grids")
    table = []
    for i, r in enumerate(ordered, 1):
        line = [i, f"{r['run_id']} ⚠ diverged" if r["_diverged"] else r["run_id"]]
        line += [_component(str(r.get(n, "") or ""), str(r.get(v, "") or ""), _text(r.get(f"{n}_weights")) if n == "vfm" else "")
                 for n, v in show_components]
        line += [_fmt(r[m]) if m in r else "–" for m in present]
        line += [str(r.get(c, "") or "") for c in extra_cols]
        if has_images:
            imgs = r["_images"] if isinstance(r["_images"], dict) else {}
            base = Path(r["_run_dir"]) if r.get("_run_dir") else None
            links = []
            for name, rel in sorted(imgs.items()):
                target = (base / rel) if base is not None else Path(rel)
                if link_base is not None:
                    target = Path(_relpath(target, link_base))
                links.append(f"[{name}]({target.as_posix()})")
            line.append(" ".join(links))
        table.append(line)
    lines.append(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True))
    lines.append("")
    if any(r["_diverged"] for r in ordered) or any(_unrankable(r.get(m)) for r in ordered for m in present if m in r):
        lines += ["⚠ diverged: the run's training diverged (finished under `run.allow_divergence`); ⚠ after a value: not finite. "
                  "Both are ranked last and are not results.", ""]
    return lines


def _relpath(target: Path, base: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), base.resolve())
