"""How cost grows with image resolution and with the number of combinations in a sweep.

Resolution: the per-component measurements of ``components.py`` (same models, the preset's
sizes) at ``data.resolution`` 128, 256 and 512, one process per resolution.

Sweep size: one ``vfmbench sweep`` of four combinations (tokenizer {vfm-vae, kl-vae} x diffusion
{flow-dit, lightningdit}) on a shortened smoke configuration, from an empty cache folder. The
sweep runs its combinations one after another in one process, so the wall time of a sweep of the
first k combinations is the time from the start of the process to the end of combination k (the
mtime of its ``results/done.json``): 1, 2 and 4 combinations come from one measurement. Caches
shared between combinations (reference statistics, smoke weights) make it sub-linear.

    python bench/scaling.py --quick
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

RESOLUTIONS = (128, 256, 512)
RES_COMPONENTS_QUICK = ("vfm-features", "vfm-vae-train", "diffusion-train", "inception-features")
RES_COMPONENTS_FULL = ("vfm-features", "vfm-vae-encode", "vfm-vae-decode", "vfm-vae-train", "kl-vae-train", "diffusion-train",
                       "sampling-50", "inception-features")
SWEEP_MATRIX = {"tokenizer": ["vfm-vae", "kl-vae"], "diffusion": ["flow-dit", "lightningdit"]}
# A shortened smoke run: every stage, a few steps each (quick) or the smoke sweep's lengths (full).
SWEEP_SETS_QUICK = [
    "data.train_images=128", "data.val_images=32", "tokenizer.train.images=64", "diffusion.train.images=256",
    "diffusion.sample.num_images=16", "diffusion.sample.steps=8", "metrics.recon_images=16", "metrics.isc_splits=2",
    "metrics.probe.epochs=20", "metrics.names=[psnr, probe-top1, is]",
    "component_args.lightningdit.eval_every_images=0",
]
SWEEP_SETS_FULL = [
    "data.train_images=512", "data.val_images=128", "tokenizer.train.images=512", "diffusion.train.images=2048",
    "diffusion.sample.num_images=64", "diffusion.sample.steps=8", "metrics.recon_images=64", "metrics.isc_splits=2",
    "metrics.names=[rfid, psnr, ssim, lpips, probe-top1, probe-top5, gfid, is, kid, precision, recall]",
    "component_args.lightningdit.eval_every_images=0",
]


def resolution_scan(resolutions: list[int], names: tuple[str, ...], quick: bool, batch: int, threads: int) -> list[dict[str, Any]]:
    out = []
    here = Path(__file__).resolve().parent
    for res in resolutions:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "r.json"
            cmd = [sys.executable, str(here / "components.py"), "--no-isolate", "--only", ",".join(names), "--set", f"data.resolution={res}",
                   "--out", str(path), "--device", "cpu"]
            cmd += ["--quick", "--repeats", "1"] if quick else ["--repeats", "3"]
            cmd += ["--batch", str(batch)] if batch else []
            cmd += ["--threads", str(threads)] if threads else []
            common.log(f"resolution {res}: {', '.join(names)}")
            subprocess.run(cmd, env=common.bench_env(threads))
            if path.exists():
                for r in common.read_json(path)["components"]:
                    out.append({**r, "resolution": res})
            else:
                out.append({"component": "*", "resolution": res, "error": "components.py wrote nothing"})
    return out


def sweep_scan(quick: bool, threads: int) -> dict[str, Any]:
    import yaml

    work = Path(tempfile.mkdtemp(prefix="vfmbench-sweep-"))
    try:
        spec = {"preset": "smoke", "out": str(work / "runs"), "set": (SWEEP_SETS_QUICK if quick else SWEEP_SETS_FULL) + [f"run.cache_dir={work / 'cache'}"],
                "matrix": SWEEP_MATRIX}
        sweep_file = work / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        cmd = [sys.executable, "-m", "vfmbench.cli", "sweep", str(sweep_file)]
        common.log(f"sweep of {len(SWEEP_MATRIX['tokenizer']) * len(SWEEP_MATRIX['diffusion'])} combinations")
        start_wall = time.time()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=common.bench_env(threads), capture_output=True, text=True)
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
        runs = []
        for run_dir in (work / "runs").iterdir() if (work / "runs").exists() else []:
            done = run_dir / "results" / "done.json"
            if not done.exists():
                continue
            stages = {}
            for d in run_dir.glob("*/done.json"):
                info = json.loads(d.read_text())
                stages[info.get("stage", d.parent.name)] = float(info.get("seconds", 0.0))
            runs.append({"run": run_dir.name, "end_s": done.stat().st_mtime - start_wall, "stages_s": stages, "stages_total_s": sum(stages.values())})
        runs.sort(key=lambda r: r["end_s"])
        cumulative = [{"combinations": k, "wall_s": runs[k - 1]["end_s"]} for k in (1, 2, 4) if k <= len(runs)]
        return {"matrix": SWEEP_MATRIX, "sets": spec["set"][:-1], "process_wall_s": total, "exit_code": proc.returncode,
                "runs": runs, "cumulative": cumulative}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)))
    p.add_argument("--only", default="", help="components of the resolution scan (default: a quick or a full list)")
    p.add_argument("--batch", type=int, default=0, help="images per step in the resolution scan (default 1 with --quick, else 2)")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-resolution", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "scaling.json"))
    args = p.parse_args(argv)

    import torch

    names = tuple(n.strip() for n in args.only.split(",") if n.strip()) or (RES_COMPONENTS_QUICK if args.quick else RES_COMPONENTS_FULL)
    batch = args.batch or (1 if args.quick else 2)
    data: dict[str, Any] = {"kind": "scaling", "environment": common.environment(torch.device("cpu")),
                            "settings": {"quick": args.quick, "batch": batch or "per component", "components": list(names)}}
    if not args.no_resolution:
        data["resolution"] = resolution_scan([int(r) for r in args.resolutions.split(",")], names, args.quick, batch, args.threads)
    if not args.no_sweep:
        data["sweep"] = sweep_scan(args.quick, args.threads)
    common.write_json(args.out, data)
    common.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
