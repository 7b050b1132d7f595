"""Wall time of the latent-eval metrics (the pure part, ``vfmbench.latent_eval.latent_rows``) for
N posterior means, per metric and in total, at the smoke latent shapes and an ImageNet-like one.

Latents are synthetic class-conditional Gaussian fields (10 classes, spatially smoothed): the cost
of every metric depends on N, C, H and W, not on the values. The default metric set is every
registered latent metric that needs only latents (VIV, LNC, SEC, LDS, CDS, TwoNN; SRSS needs
masks); ``--uniformity`` adds the t-SNE uniformity (``--uniformity-points``, one repeat timed).

    python bench/latent_eval.py                       # N = 2048, shapes 8x4x4, 4x8x8, 32x16x16
    python bench/latent_eval.py --n 2048 --shape 32x16x16 --uniformity
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = ("8x4x4", "4x8x8", "32x16x16")  # vfm-vae / va-vae smoke (f16, 64 px), kl-vae smoke (f8), ImageNet f16d32


def latents(n: int, shape: tuple[int, int, int], classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    c, h, w = shape
    y = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, c, 1, 1))
    z = gaussian_filter(rng.standard_normal((n, c, h, w)), sigma=(0, 0, 1, 1), mode="wrap")
    return (z + centres[y]).astype(np.float32), y


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--shape", action="append", help="CxHxW (repeatable); default: " + ", ".join(SHAPES))
    p.add_argument("--uniformity", action="store_true")
    p.add_argument("--uniformity-points", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=0, help="torch/BLAS threads (0 = default)")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "latent_eval.json"))
    args = p.parse_args()
    common.set_threads(args.threads)
    from vfmbench.config import LatentMetricsConfig
    from vfmbench.latent_eval import latent_rows, selected_specs, settings
    from vfmbench.plugins import get_plugin_manager

    host = get_plugin_manager()
    lc = LatentMetricsConfig(uniformity=args.uniformity, uniformity_points=args.uniformity_points, uniformity_repeats=1)
    specs = [s for s in selected_specs(list(host.metrics), lc) if s.inputs == "latents"]
    results = []
    for text in args.shape or SHAPES:
        shape = tuple(int(v) for v in text.split("x"))
        z, y = latents(args.n, shape)
        t0 = time.perf_counter()
        rows, info = latent_rows(specs, z, y, settings(lc, 0))
        total = time.perf_counter() - t0
        entry = {"n": args.n, "shape": list(shape), "total_seconds": round(total, 3), "metric_seconds": info["metric_seconds"],
                 "skipped": sorted(info["skipped"]), "values": {r["metric"]: r["value"] for r in rows}}
        common.log(f"N={args.n} {text}: {total:.2f} s total; " + ", ".join(f"{k} {v:.2f}s" for k, v in info["metric_seconds"].items()))
        results.append(entry)
    common.write_json(args.out, {"environment": common.environment(torch.device("cpu")), "uniformity": args.uniformity, "results": results})
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
