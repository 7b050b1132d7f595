"""GPU check of the paper-size path, random-init weights, in one script (about 8 minutes on one H200).

Builds through vfmbench's own config and plugin registries (preset ``lightningdit-xl1-paper``:
VFM-VAE on a SigLIP2-L/16-size backbone at 512 px input with the full decoder, projected
discriminator and PatchGAN; LightningDiT-XL/1 on 16x16x32 latents) with ``run.smoke=true`` and
``vfm.pretrained=false``, and measures under bf16 autocast:

  vfm-features, vfm-vae-encode, vfm-vae-decode, vfm-vae-train (generator + discriminator step),
  diffusion-train (LightningDiT-XL/1 step), sampling-step (one guided velocity evaluation),
  inception-features (FID/IS/sFID extractor, float32)

It prints images/s, peak memory and model FLOPs utilisation against the fp32 and bf16 matmul peaks
it measures itself, and writes ``bench/results/gpu_check.json`` (after every component, so a
time-out keeps what finished). ``--device cpu --tiny`` runs the identical code path at the smoke
sizes (preset ``lightningdit-smoke``), which is what the test suite checks.

    python bench/gpu_check.py                          # on the GPU machine
    python bench/gpu_check.py --device cpu --tiny      # CPU, seconds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import components  # noqa: E402

CHECKS = ("vfm-features", "vfm-vae-encode", "vfm-vae-decode", "vfm-vae-train", "diffusion-train", "sampling-step", "inception-features")
PAPER_PRESET = "lightningdit-xl1-paper"
TINY_PRESET = "lightningdit-smoke"
# Images per step at paper size (one H200) and at the tiny size.
PAPER_BATCH = {"vfm-features": 64, "vfm-vae-encode": 64, "vfm-vae-decode": 32, "vfm-vae-train": 16, "diffusion-train": 128,
               "sampling-step": 256, "inception-features": 250}
TINY_BATCH = {"vfm-features": 8, "vfm-vae-encode": 8, "vfm-vae-decode": 8, "vfm-vae-train": 4, "diffusion-train": 16,
              "sampling-step": 16, "inception-features": 4}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help=f"smoke sizes (preset {TINY_PRESET}) instead of the paper's")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(CHECKS)}")
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply every default batch (e.g. 0.5 if memory is short)")
    p.add_argument("--warmup", type=int, default=0, help="default 2 (1 with --tiny)")
    p.add_argument("--repeats", type=int, default=0, help="default 5 (2 with --tiny)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip the remaining checks once this many seconds have passed")
    p.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "gpu_check.json"))
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --device cpu --tiny for the CPU variant")
    precision = ("bf16" if device.type == "cuda" else "fp32") if args.precision == "auto" else args.precision
    preset = TINY_PRESET if args.tiny else PAPER_PRESET
    batches = TINY_BATCH if args.tiny else PAPER_BATCH
    warmup = args.warmup or (1 if args.tiny else 2)
    repeats = args.repeats or (2 if args.tiny else 5)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CHECKS)
    bad = [n for n in names if n not in CHECKS]
    if bad:
        p.error(f"unknown check(s) {bad}; choose from {', '.join(CHECKS)}")

    setup = components.make_setup(preset, args.set, device, precision)
    peaks = components.measure_peaks(device, quick=args.tiny)
    data = {
        "kind": "gpu_check",
        "environment": common.environment(device),
        "settings": {"preset": preset, "tiny": args.tiny, "precision": precision, "warmup": warmup, "repeats": repeats,
                     "sets": args.set, "resolution": setup.resolution, "vfm": setup.cfg.vfm.name, "vfm_size": setup.cfg.vfm.size,
                     "diffusion": setup.cfg.diffusion.name},
        "matmul_peaks": peaks,
        "checks": [],
    }
    for kind, pk in peaks.items():
        print(f"matmul peak {kind:>8}: {pk['tflops']:9.3f} TFLOP/s (n={pk['n']})", flush=True)
    failed = 0
    for name in names:
        if time.perf_counter() - t_start > args.budget_s:
            data["checks"].append({"component": name, "skipped": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        batch = max(1, int(round(batches[name] * args.batch_scale)))
        try:
            r = components.measure(name, setup, batch, warmup, repeats, peaks)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, the other checks still run
            import traceback

            traceback.print_exc()
            failed += 1
            r = {"component": name, "error": f"{type(e).__name__}: {str(e)[:500]}", "images_per_step": batch}
        components.release(device)
        data["checks"].append(r)
        data["elapsed_s"] = time.perf_counter() - t_start
        common.write_json(args.out, data)
        if "error" in r:
            print(f"{name:<20} FAILED: {r['error']}", flush=True)
        else:
            m = r["mfu"]
            print(f"{name:<20} batch {batch:>4}  {r['images_per_s']:10.2f} img/s  peak {r['memory']['peak_gib']:7.2f} GiB  "
                  f"{(r['flops_per_step'] or 0) / 1e9:10.1f} GFLOP/step  MFU {'n/a' if m is None else f'{m:.3f}'} ({r['compute_dtype']})", flush=True)
    data["elapsed_s"] = time.perf_counter() - t_start
    common.write_json(args.out, data)
    print(f"wrote {args.out} in {data['elapsed_s']:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
