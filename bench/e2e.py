"""End-to-end wall time of ``vfmbench run --preset smoke`` and the speed-up of a second run that
reuses the caches.

Run 1 starts from an empty cache folder (``run.cache_dir``): it trains, evaluates, and fills the
VFM-feature cache, the reference-statistics cache and the smoke Inception/LPIPS weights. Run 2 is
the same combination in a new output folder with the same ``run.cache_dir``, so every stage runs
again but the caches hit. Stage seconds come from each stage's ``done.json``; wall times are
measured around the ``vfmbench`` process (interpreter start-up included).

    python bench/e2e.py                   # the smoke preset as shipped
    python bench/e2e.py --set data.val_images=128
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Stages whose work the caches can save (VFM tokens, reference Inception features).
EVAL_STAGES = ("recon-eval", "latents", "gen-eval")


def stage_seconds(run_dir: Path) -> dict[str, float]:
    out = {}
    for done in sorted(run_dir.glob("*/done.json")):
        info = json.loads(done.read_text())
        out[info.get("stage", done.parent.name)] = float(info.get("seconds", 0.0))
    return out


def cache_info(run_dir: Path) -> dict[str, Any]:
    """Cache counters the stages record (VFM-feature cache stats, reference-statistics hits)."""
    out = {}
    for done in sorted(run_dir.glob("*/done.json")):
        info = json.loads(done.read_text())
        picked = {k: v for k, v in info.items() if "cache" in k}
        if picked:
            out[done.parent.name] = picked
    return out


def one_run(label: str, out_dir: Path, cache_dir: Path, preset: str, sets: list[str], threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "vfmbench.cli", "run", "--preset", preset, "--out", str(out_dir), "--set", f"run.cache_dir={cache_dir}"]
    for s in sets:
        cmd += ["--set", s]
    common.log(f"{label}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=common.bench_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{label} failed with exit code {proc.returncode}")
    run_dirs = [p for p in out_dir.iterdir() if p.is_dir()]
    if len(run_dirs) != 1:
        raise RuntimeError(f"{label}: expected one run directory in {out_dir}, found {len(run_dirs)}")
    stages = stage_seconds(run_dirs[0])
    common.log(f"{label}: {wall:.1f} s wall; stages {json.dumps({k: round(v, 1) for k, v in stages.items()})}")
    return {"wall_s": wall, "stages_s": stages, "stages_total_s": sum(stages.values()), "run_name": run_dirs[0].name,
            "caches": cache_info(run_dirs[0])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smoke")
    p.add_argument("--set", action="append", default=[], help="config override for both runs (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="OMP/torch threads of the runs (0 = all cores)")
    p.add_argument("--workdir", default="", help="where the runs and the cache go (default: a temporary folder, removed)")
    p.add_argument("--quick", action="store_true", help="accepted for run_all; the smoke preset is run as shipped either way")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "e2e.json"))
    args = p.parse_args(argv)

    import torch

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vfmbench-e2e-"))
    try:
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--workdir {work} is not empty; the first run must start from an empty cache")
        cache = work / "cache"
        first = one_run("run 1 (cold caches)", work / "run1", cache, args.preset, args.set, args.threads)
        second = one_run("run 2 (warm caches)", work / "run2", cache, args.preset, args.set, args.threads)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    speedup = {st: (first["stages_s"][st] / second["stages_s"][st]) if second["stages_s"].get(st) else None
               for st in first["stages_s"] if st in second["stages_s"]}
    ev1 = sum(first["stages_s"].get(st, 0.0) for st in EVAL_STAGES)
    ev2 = sum(second["stages_s"].get(st, 0.0) for st in EVAL_STAGES)
    data = {
        "kind": "e2e",
        "environment": common.environment(torch.device("cpu")),
        "settings": {"preset": args.preset, "sets": args.set, "threads": args.threads or None},
        "command": f"vfmbench run --preset {args.preset}" + "".join(f" --set {s}" for s in args.set),
        "first": first,
        "second": second,
        "speedup_by_stage": speedup,
        "eval_stages": list(EVAL_STAGES),
        "eval_stages_s": {"first": ev1, "second": ev2},
        "eval_speedup": ev1 / ev2 if ev2 > 0 else None,
        "targets": {"first_wall_s_below": 120.0, "eval_speedup_at_least": 3.0},
    }
    common.write_json(args.out, data)
    common.log(f"first run {first['wall_s']:.1f} s, second {second['wall_s']:.1f} s; evaluation stages x{data['eval_speedup'] or 0:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
