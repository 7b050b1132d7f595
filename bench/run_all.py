"""Run every benchmark, then regenerate ``bench/RESULTS.md`` and ``bench/scaling.png``.

    python bench/run_all.py --quick          # CPU, about 10 minutes on 2 quiet cores
    python bench/run_all.py                  # more repeats, longer scans
    python bench/run_all.py --only e2e,mfu   # a subset (the report keeps the other JSON files)
    python bench/run_all.py --report-only    # regenerate the report from bench/results/*.json

Each script runs in its own process and writes ``bench/results/<name>.json``; the GPU check
(``bench/gpu_check.py``) runs only on a CUDA machine (``--gpu``), and its JSON, when present, is
reported too. Run on a quiet machine: every figure is a wall-clock measurement.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import report  # noqa: E402

SCRIPTS = {  # name -> (script, result file)
    "e2e": ("e2e.py", "e2e.json"),
    "components": ("components.py", "components.json"),
    "mfu": ("mfu_diffusion.py", "mfu_diffusion.json"),
    "scaling": ("scaling.py", "scaling.json"),
    "gpu": ("gpu_check.py", "gpu_check.json"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the CPU budget: fewer repeats, shorter scans")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(SCRIPTS)}")
    p.add_argument("--gpu", action="store_true", help="also run bench/gpu_check.py (CUDA)")
    p.add_argument("--threads", type=int, default=0, help="OMP/torch threads for every script (0 = all cores)")
    p.add_argument("--results", default=str(common.RESULTS_DIR))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)

    results = Path(args.results)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [n for n in SCRIPTS if n != "gpu" or args.gpu]
    bad = [n for n in names if n not in SCRIPTS]
    if bad:
        p.error(f"unknown benchmark(s) {bad}; choose from {', '.join(SCRIPTS)}")
    failed = []
    t_all = time.perf_counter()
    if not args.report_only:
        here = Path(__file__).resolve().parent
        for name in names:
            script, out = SCRIPTS[name]
            cmd = [sys.executable, str(here / script), "--out", str(results / out)]
            if name != "gpu":
                cmd += ["--quick"] if args.quick else []
                cmd += ["--threads", str(args.threads)] if args.threads else []
            common.log(f"{name}: {' '.join(cmd[1:])}")
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, env=common.bench_env(args.threads)).returncode
            common.log(f"{name}: exit {rc} after {time.perf_counter() - t0:.0f} s")
            if rc != 0:
                failed.append(name)
    path = report.write_report(results, common.BENCH_DIR / "RESULTS.md")
    common.log(f"wrote {path} ({time.perf_counter() - t_all:.0f} s in all)" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
