"""``vfmbench sweep FILE.yaml``: a matrix of combinations, run one after another.

The file holds ``preset`` (optional), ``config`` (a mapping composed over the preset), ``set``
(a list of key=value overrides), ``out`` and ``matrix``: a mapping from a config key (dotted,
e.g. ``tokenizer.name``) or a flag name (tokenizer, vfm, decoder, diffusion, dataset) to a list
of values; the sweep runs their Cartesian product. ``include`` adds explicit combinations and
``exclude`` removes matching ones. A combination whose tokenizer does not use a VFM is run once
whatever the VFM axis says. A re-run skips finished combinations (their stages are done).
"""
from __future__ import annotations

import itertools
import json
import traceback
from pathlib import Path
from typing import Any

import yaml

from .config import parse_set
from .errors import UserError
from .plugins import Host

FLAG_KEYS = {"tokenizer": "tokenizer.name", "vfm": "vfm.name", "decoder": "decoder.name", "diffusion": "diffusion.name", "dataset": "data.dataset"}


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The combinations of a sweep file as lists of {dotted key: value}."""
    matrix = spec.get("matrix") or {}
    if not isinstance(matrix, dict):
        raise UserError("sweep 'matrix' must map config keys to lists of values")
    keys = [FLAG_KEYS.get(k, k) for k in matrix]
    values = [v if isinstance(v, list) else [v] for v in matrix.values()]
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*values)] if keys else [{}]
    for extra in spec.get("include", []) or []:
        combos.append({FLAG_KEYS.get(k, k): v for k, v in extra.items()})
    excludes = [{FLAG_KEYS.get(k, k): v for k, v in e.items()} for e in spec.get("exclude", []) or []]
    combos = [c for c in combos if not any(all(c.get(k) == v for k, v in e.items()) for e in excludes)]
    return combos


def run_sweep(host: Host, path: Path, out: str | None = None, dry_run: bool = False) -> int:
    from .config import resolve
    from .runner import Run, log, run_name

    if not path.is_file():
        raise UserError(f"sweep file {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - {"preset", "config", "set", "out", "matrix", "include", "exclude"}
    if unknown:
        raise UserError(f"sweep file {path}: unknown keys {sorted(unknown)} (valid: preset, config, set, out, matrix, include, exclude)")
    configs, seen = [], set()
    for combo in expand(spec):
        sets = list(spec.get("set", []) or [])
        overrides = [_nest(k, v) for k, v in combo.items()]
        base = spec.get("config") or {}
        preset = host.presets.get(spec.get("preset") or "smoke")
        layers = [dict(preset.values), base, *overrides, *[parse_set(s) for s in sets]]
        if out or spec.get("out"):
            layers.append({"run": {"out": out or spec.get("out")}})
        cfg = resolve(layers)
        name = run_name(host, cfg)  # validates names
        if name in seen:
            continue  # e.g. a tokenizer without a VFM on the VFM axis
        seen.add(name)
        configs.append((combo, cfg))
    if dry_run:
        for combo, cfg in configs:
            print(json.dumps({"combination": combo, "run": run_name(host, cfg)}))
        return 0
    failed = 0
    for i, (combo, cfg) in enumerate(configs, 1):
        log(f"sweep {i}/{len(configs)}: {json.dumps(combo, sort_keys=True)}")
        run = Run.prepare(host, cfg)
        if (run.run_dir / "results" / "done.json").exists():
            log(f"sweep {i}/{len(configs)}: finished earlier, skipped ({run.run_dir})")
            continue
        try:
            run.execute()
        except Exception:  # noqa: BLE001 - a failing combination is recorded, the sweep goes on
            failed += 1
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / "error.txt").write_text(traceback.format_exc())
            log(f"sweep {i}/{len(configs)}: FAILED, traceback in {run.run_dir / 'error.txt'}")
    log(f"sweep finished: {len(configs) - failed} ok, {failed} failed")
    return 1 if failed else 0
