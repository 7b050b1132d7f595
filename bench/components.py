"""Per-component throughput, peak memory, FLOPs and MFU.

Every model is built through vfmbench's own build path (a preset resolved by ``vfmbench.config``,
components from the plugin registries via ``vfmbench.build``), with random-init weights
(``run.smoke=true``, ``vfm.pretrained=false``) and random uint8 images, so nothing is read from
disk or the network. Components:

=====================  =====================================================================
vfm-features           frozen VFM tokens of the tapped layers (bf16 autocast on CUDA)
vfm-vae-encode         VFM-VAE ``encode`` (VFM + latent head) and a posterior sample
vfm-vae-decode         VFM-VAE ``decode`` (decompression + decoder)
vfm-vae-train          one training step of the first recipe stage: generator phase (L1, LPIPS,
                       VF with adaptive weight, GAN, multi-scale L1, equivariance) and
                       discriminator phase, each with its AdamW step
kl-vae-train           one training step of the KL-VAE baseline
sd-vae-train           one training step of the SD-VAE baseline (random init)
diffusion-train        one training step of the preset's diffusion model on random latents
sampling-50            the preset's sampler, 50 steps (guidance as the preset), per image
sampling-250           the same with 250 steps
sampling-step          one guided velocity evaluation (conditional + unconditional batch)
inception-features     Inception-v3 pool/logits/spatial features (FID, IS, sFID)
fid                    FID from Inception features: Gaussian statistics + Frechet distance
fid-128                the same for 128 images (the smoke run's sample count: N < D, singular
                       covariances, so the distance takes its regularisation retries)
=====================  =====================================================================

On CPU each component runs in its own subprocess (``--isolate``, the default when several are
asked for) so that the peak RSS is that component's. The equivariance draw and the diffusion noise
are reseeded before every step, so timed steps and the FLOP-counted step do the same work.

    python bench/components.py --quick                       # CPU, smoke sizes
    python bench/components.py --device cuda                 # GPU, paper sizes (lightningdit-xl1-paper)
    python bench/components.py --only diffusion-train --set data.resolution=128
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAMES = ("vfm-features", "vfm-vae-encode", "vfm-vae-decode", "vfm-vae-train", "kl-vae-train", "sd-vae-train",
         "diffusion-train", "sampling-50", "sampling-250", "sampling-step", "inception-features", "fid", "fid-128")
DEFAULT_NAMES = tuple(n for n in NAMES if n != "sampling-step")
CPU_PRESET = "smoke"
GPU_PRESET = "lightningdit-xl1-paper"

# Images per step: (CPU smoke sizes, GPU paper sizes).
BATCH = {
    "vfm-features": (32, 64), "vfm-vae-encode": (32, 64), "vfm-vae-decode": (32, 32), "vfm-vae-train": (8, 16),
    "kl-vae-train": (8, 16), "sd-vae-train": (8, 16), "diffusion-train": (64, 128), "sampling-50": (16, 64),
    "sampling-250": (16, 64), "sampling-step": (64, 256), "inception-features": (16, 250), "fid": (4096, 50000),
    "fid-128": (128, 128),
}
# Components whose step is one long numpy computation: no warm-up, fewer repeats.
SINGLE_SHOT = ("fid", "fid-128")


# ---------------------------------------------------------------------------------------------
# Set-up through vfmbench's own build path


@dataclass
class Setup:
    host: Any
    cfg: Any
    device: torch.device
    precision: str  # fp32 | bf16 (autocast; CUDA only by default)
    sets: list[str] = field(default_factory=list)

    @property
    def resolution(self) -> int:
        return int(self.cfg.data.resolution)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def with_sets(self, extra: list[str]) -> "Setup":
        return make_setup(self.preset, self.sets + extra, self.device, self.precision, self.host)

    preset: str = CPU_PRESET


def make_setup(preset: str, sets: list[str], device: torch.device, precision: str, host=None) -> Setup:
    """A resolved ``RunConfig`` from ``preset`` + ``sets`` with random-init weights allowed."""
    from vfmbench.config import parse_set, resolve
    from vfmbench.plugins import get_plugin_manager

    host = host or get_plugin_manager()
    forced = ["run.smoke=true", "vfm.pretrained=false", f"run.device={device}"]
    layers = [dict(host.presets.get(preset).values), *[parse_set(s) for s in forced + list(sets)]]
    cfg = resolve(layers)
    return Setup(host=host, cfg=cfg, device=device, precision=precision, sets=list(sets), preset=preset)


def random_images(n: int, res: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g).to(device)


def build_tokenizer(s: Setup, name: str | None = None):
    from vfmbench.build import BuildContext, build_tokenizer as _build

    setup = s.with_sets([f"tokenizer.name={name}"]) if name else s
    torch.manual_seed(setup.cfg.run.seed)
    tok = _build(BuildContext(host=setup.host, config=setup.cfg, device=s.device))
    return tok.to(s.device)


def latent_shape(s: Setup) -> tuple[int, int, int]:
    """The preset tokenizer's latent shape, from an architecture built on the meta device."""
    from vfmbench.build import BuildContext, build_tokenizer as _build

    with torch.device("meta"):
        tok = _build(BuildContext(host=s.host, config=s.cfg, meta=True))
    return tuple(tok.latent_shape(s.resolution))


def num_classes(s: Setup) -> int:
    return int(s.host.datasets.get(s.cfg.data.dataset).num_classes or 1000)


def build_diffusion(s: Setup):
    from vfmbench.build import build_diffusion as _build

    torch.manual_seed(s.cfg.run.seed + 1)
    return _build(s.host, s.cfg, latent_shape(s), num_classes(s)).to(s.device)


def optimisers(phases) -> list[torch.optim.Optimizer]:
    """The optimisers ``train_loop`` builds (fused AdamW where supported)."""
    from vfmbench.train import make_optimiser

    return [make_optimiser(ph) for ph in phases]


def train_step_fn(s: Setup, module, phases, batch: Callable[[], tuple]) -> Callable[[], None]:
    """One step as ``vfmbench.train.train_loop`` takes it (see ``phase_step``), under the setup's autocast."""
    return phase_step(module, phases, batch, s.autocast)


def phase_step(module, phases, batch: Callable[[], tuple], autocast: Callable) -> Callable[[], None]:
    """One training step as ``train_loop`` takes it: every phase's forward (under ``autocast()``),
    backward, clipping and optimiser step. The global RNG is reseeded first (same work each step)."""
    opts = optimisers(phases)
    module.train()

    def step() -> None:
        torch.manual_seed(1234)
        inputs, labels = batch()
        for ph, opt in zip(phases, opts):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss, _ = module.phase_loss(ph.name, inputs, labels, 0)
            loss.backward()
            if ph.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(ph.params, ph.grad_clip)
            opt.step()

    return step


@dataclass
class Prepared:
    step: Callable[[], Any]
    images: int  # images per step
    compute_dtype: str  # the dtype the matmuls run in (selects the matmul peak for MFU)
    count_flops: bool = True
    info: dict[str, Any] = field(default_factory=dict)


def _dtype(s: Setup) -> str:
    return "bfloat16" if s.precision == "bf16" else "float32"


def prep_vfm_features(s: Setup, batch: int) -> Prepared:
    from vfmbench.build import BuildContext

    vfm = BuildContext(host=s.host, config=s.cfg, device=s.device).vfm()
    layers = list(s.cfg.vfm.layers or vfm.default_layers)
    images = random_images(batch, s.resolution, s.device)

    def step():
        with torch.no_grad():
            vfm(images, sorted(set(layers) | {-1}))

    # FrozenVfm runs under bf16 autocast on CUDA whatever run.precision says
    dtype = "bfloat16" if s.device.type == "cuda" else "float32"
    grid = vfm(images[:1], [-1]).grid
    return Prepared(step, batch, dtype, info={"vfm": vfm.spec.name, "vfm_size": vfm.size, "layers": sorted(set(layers) | {-1}),
                                              "token_grid": list(grid), "embed_dim": vfm.embed_dim, "blocks": vfm.num_blocks})


def prep_vfm_vae_encode(s: Setup, batch: int) -> Prepared:
    tok = build_tokenizer(s).eval()
    images = random_images(batch, s.resolution, s.device)

    def step():
        with torch.no_grad(), s.autocast():
            tok.encode(images).sample()

    return Prepared(step, batch, _dtype(s), info={"latent_shape": list(tok.latent_shape(s.resolution))})


def prep_vfm_vae_decode(s: Setup, batch: int) -> Prepared:
    tok = build_tokenizer(s).eval()
    z = torch.randn(batch, *tok.latent_shape(s.resolution), device=s.device)

    def step():
        with torch.no_grad(), s.autocast():
            tok.decode(z)

    return Prepared(step, batch, _dtype(s), info={"decoder": type(tok.decoder).__name__})


def prep_tokenizer_train(name: str | None) -> Callable[[Setup, int], Prepared]:
    def prep(s: Setup, batch: int) -> Prepared:
        tok = build_tokenizer(s, name)
        lr = s.cfg.tokenizer.train.lr
        stages = tok.training_stages(10**12, lr)
        tok.begin_stage(stages[0])
        phases = tok.training_phases(stages[0].lr)
        images = random_images(batch, s.resolution, s.device)
        labels = torch.zeros(batch, dtype=torch.long, device=s.device)
        trainable = sum(p.numel() for ph in phases for p in ph.params)
        info = {"tokenizer": tok.spec.name, "stage": stages[0].name, "phases": [ph.name for ph in phases], "trainable_params": trainable}
        return Prepared(train_step_fn(s, tok, phases, lambda: (images, labels)), batch, _dtype(s), info=info)

    return prep


def prep_diffusion_train(s: Setup, batch: int) -> Prepared:
    model = build_diffusion(s)
    phases = model.training_phases(s.cfg.diffusion.train.lr)
    shape = latent_shape(s)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, *shape, generator=g).to(s.device)
    y = torch.randint(0, num_classes(s), (batch,), generator=g).to(s.device)
    info = {"diffusion": model.spec.name, "latent_shape": list(shape), "params": sum(p.numel() for p in model.parameters())}
    for k in ("width", "depth", "heads"):
        v = getattr(model, k, None) or getattr(getattr(model, "args", None), k, None)
        if v:
            info[k] = int(v)
    return Prepared(train_step_fn(s, model, phases, lambda: (z, y)), batch, _dtype(s), info=info)


def prep_sampling(steps: int) -> Callable[[Setup, int], Prepared]:
    def prep(s: Setup, batch: int) -> Prepared:
        from vfmbench.sampling import sample

        model = build_diffusion(s).eval()
        sc = s.cfg.diffusion.sample
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(batch, *latent_shape(s), generator=g).to(s.device)
        labels = torch.randint(0, num_classes(s), (batch,), generator=g).to(s.device)

        def step():
            gen = torch.Generator(s.device).manual_seed(0)
            sample(model, noise, labels, sampler=sc.sampler, steps=steps, cfg_scale=sc.cfg_scale, cfg_interval=tuple(sc.cfg_interval),
                   timestep_shift=sc.timestep_shift, generator=gen, precision=s.precision)

        info = {"diffusion": model.spec.name, "sampler": sc.sampler, "steps": steps, "cfg_scale": sc.cfg_scale, "cfg_interval": list(sc.cfg_interval)}
        return Prepared(step, batch, _dtype(s), info=info)

    return prep


def prep_sampling_step(s: Setup, batch: int) -> Prepared:
    """One velocity evaluation inside the guidance interval: the 2B batch of a guided sampler step."""
    from vfmbench.sampling import GuidedVelocity

    model = build_diffusion(s).eval()
    sc = s.cfg.diffusion.sample
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *latent_shape(s), generator=g).to(s.device)
    labels = torch.randint(0, num_classes(s), (batch,), generator=g).to(s.device)
    lo, hi = sc.cfg_interval
    t = 0.5 * (lo + hi)
    vel = GuidedVelocity(model, labels, model.num_classes, sc.cfg_scale, tuple(sc.cfg_interval), s.precision)

    def step():
        with torch.no_grad():
            vel(x, t)

    return Prepared(step, batch, _dtype(s), info={"diffusion": model.spec.name, "guided": vel.guided(t), "t": t, "cfg_scale": sc.cfg_scale})


def prep_inception(s: Setup, batch: int) -> Prepared:
    from vfmbench.build import default_cache_dir
    from vfmbench.metrics.inception import FEATURES, InceptionFeatures

    inc = InceptionFeatures.from_config(s.cfg.metrics.inception_weights, True, default_cache_dir(s.cfg), device=s.device,
                                        batch_size=batch, features=FEATURES)
    images = random_images(batch, s.resolution, s.device)
    # Inception runs outside autocast (float32) in vfmbench's evaluator
    return Prepared(lambda: inc(images), batch, "float32", info={"official_weights": inc.is_official, "features": list(FEATURES)})


def prep_fid(s: Setup, n: int) -> Prepared:
    import numpy as np

    spec = s.host.metrics.get("gfid")
    rng = np.random.default_rng(0)
    dim = 2048
    ref = spec.stats(rng.standard_normal((n, dim)))
    feats = rng.standard_normal((n, dim)) * 1.1 + 0.05
    last: dict[str, Any] = {}

    def step():
        last["value"] = spec.value(spec.stats(feats), ref)

    info = {"feature_dim": dim, "images": n, "flops_note": "numpy float64 (covariance ~2*N*D^2, then symmetric eigenproblems of D x D, or N x N when N <= D); not counted",
            "last": last}
    return Prepared(step, n, "float64", count_flops=False, info=info)


PREPARE: dict[str, Callable[[Setup, int], Prepared]] = {
    "vfm-features": prep_vfm_features,
    "vfm-vae-encode": prep_vfm_vae_encode,
    "vfm-vae-decode": prep_vfm_vae_decode,
    "vfm-vae-train": prep_tokenizer_train(None),
    "kl-vae-train": prep_tokenizer_train("kl-vae"),
    "sd-vae-train": prep_tokenizer_train("sd-vae"),
    "diffusion-train": prep_diffusion_train,
    "sampling-50": prep_sampling(50),
    "sampling-250": prep_sampling(250),
    "sampling-step": prep_sampling_step,
    "inception-features": prep_inception,
    "fid": prep_fid,
    "fid-128": prep_fid,
}


# ---------------------------------------------------------------------------------------------
# Measuring


def measure_peaks(device: torch.device, quick: bool) -> dict[str, dict[str, Any]]:
    """The matmul peaks MFU is computed against: fp32 always, bf16 on CUDA."""
    peaks = {"float32": common.matmul_peak(device, torch.float32, repeats=3 if quick else 5)}
    if device.type == "cuda":
        peaks["bfloat16"] = common.matmul_peak(device, torch.bfloat16, repeats=3 if quick else 5)
    return peaks


def measure(name: str, s: Setup, batch: int, warmup: int, repeats: int, peaks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Build, time, count and report one component."""
    import time

    t0 = time.perf_counter()
    prep = PREPARE[name](s, batch)
    build_s = time.perf_counter() - t0
    if name in SINGLE_SHOT:
        warmup, repeats = 0, 1
    with common.PeakMemory(s.device) as mem:
        timing = common.time_fn(prep.step, s.device, warmup=warmup, repeats=repeats)
    flops = common.count_flops(prep.step) if prep.count_flops else None
    peak = peaks.get(prep.compute_dtype)
    sec = timing["median_s"]
    out = {
        "component": name,
        "images_per_step": prep.images,
        "seconds_per_step": sec,
        "images_per_s": prep.images / sec,
        "seconds_per_image": sec / prep.images,
        "timing": timing,
        "build_s": build_s,
        "memory": mem.result,
        "compute_dtype": prep.compute_dtype,
        "flops_per_step": flops["flops"] if flops else None,
        "flops_by_op": flops["by_op"] if flops else None,
        "tflops_achieved": (flops["flops"] / sec / 1e12) if flops else None,
        "peak_tflops": peak["tflops"] if peak else None,
        "mfu": common.mfu(flops["flops"] if flops else None, sec, peak["tflops"]) if peak else None,
        "resolution": s.resolution,
        "preset": s.preset,
        "sets": s.sets,
        **prep.info,
    }
    return out


def release(device: torch.device) -> None:
    """Free what the last component left (its models die with its step closure)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_batch(name: str, device: torch.device) -> int:
    return BATCH[name][1 if device.type == "cuda" else 0]


def run_in_process(names: list[str], args, device: torch.device, precision: str) -> list[dict[str, Any]]:
    s = make_setup(args.preset, args.set, device, precision)
    peaks = measure_peaks(device, args.quick)
    out = []
    for name in names:
        batch = args.batch or default_batch(name, device)
        common.log(f"{name}: batch {batch} at {s.resolution} px ({args.preset})")
        try:
            r = measure(name, s, batch, args.warmup, args.repeats, peaks)
            r["matmul_peak"] = peaks.get(r["compute_dtype"])
        except Exception as e:  # noqa: BLE001 - one failing component is recorded, the others still run
            import traceback

            traceback.print_exc()
            r = {"component": name, "error": f"{type(e).__name__}: {e}", "resolution": s.resolution, "preset": args.preset}
        release(device)
        if "error" not in r:
            common.log(f"{name}: {r['images_per_s']:.3g} img/s, {r['seconds_per_step']:.3g} s/step, "
                       f"MFU {r['mfu'] if r['mfu'] is None else round(r['mfu'], 3)}, peak {r['memory']['peak_gib']:.2f} GiB")
        out.append(r)
    return out


def run_isolated(names: list[str], args) -> list[dict[str, Any]]:
    """One subprocess per component (per-component peak RSS on CPU)."""
    out = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "r.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--no-isolate", "--out", str(path),
                   "--preset", args.preset, "--device", args.device, "--precision", args.precision,
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--batch", str(args.batch)] if args.batch else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            for s in args.set:
                cmd += ["--set", s]
            proc = subprocess.run(cmd, env=common.bench_env(args.threads))
            if proc.returncode != 0 or not path.exists():
                out.append({"component": name, "error": f"subprocess exited with {proc.returncode}"})
                continue
            out.extend(common.read_json(path)["components"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated components (default: all but sampling-step, and fid-128 with --quick): {', '.join(NAMES)}")
    p.add_argument("--preset", default="", help=f"default: {CPU_PRESET} on CPU, {GPU_PRESET} on CUDA")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. data.resolution=128 (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
    p.add_argument("--batch", type=int, default=0, help="images per step for every component (0 = per-component defaults)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps (default 1, 2 on CUDA)")
    p.add_argument("--repeats", type=int, default=0, help="timed steps (default 2 with --quick, else 5)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (CPU budget of run_all --quick)")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None, help="one subprocess per component (CPU default)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "components.json"))
    args = p.parse_args(argv)

    common.set_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    args.device = str(device)
    args.precision = ("bf16" if device.type == "cuda" else "fp32") if args.precision == "auto" else args.precision
    args.preset = args.preset or (GPU_PRESET if device.type == "cuda" else CPU_PRESET)
    args.warmup = args.warmup or (2 if device.type == "cuda" else 1)
    args.repeats = args.repeats or (2 if args.quick else 5)
    # fid-128 (one slow matrix square root) only in the full run
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [n for n in DEFAULT_NAMES if not (args.quick and n == "fid-128")]
    bad = [n for n in names if n not in PREPARE]
    if bad:
        p.error(f"unknown component(s) {bad}; choose from {', '.join(NAMES)}")
    isolate = args.isolate if args.isolate is not None else (device.type == "cpu" and len(names) > 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = run_isolated(names, args) if isolate else run_in_process(names, args, device, args.precision)
    data = {
        "kind": "components",
        "environment": common.environment(device),
        "settings": {"preset": args.preset, "sets": args.set, "precision": args.precision, "quick": args.quick,
                     "warmup": args.warmup, "repeats": args.repeats, "isolated": isolate},
        "components": results,
    }
    common.write_json(args.out, data)
    common.log(f"wrote {args.out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
