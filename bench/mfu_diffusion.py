"""Model FLOPs utilisation of a mid-size diffusion training step, against a plain transformer.

Three training steps of the same size (default width 384, depth 12, 6 heads, 256 tokens: a
32x16x16 latent at patch 1, LightningDiT-S/1 on an f16d32 tokenizer at 256 px):

* ``lightningdit``: vfmbench's LightningDiT (RMSNorm, SwiGLU, RoPE, QK-norm, adaLN-Zero, cosine
  loss), built through the plugin registry, one ``phase_loss`` + backward + clip + AdamW step;
* ``flow-dit``: vfmbench's DiT (LayerNorm, GELU MLP, adaLN-Zero), the same way;
* ``plain``: ``torch.nn.TransformerEncoder`` (pre-norm, GELU, MLP ratio 4) on random tokens, mean
  square loss, AdamW step: the reference for what matmul-bound code of this size reaches.

FLOPs: torch's FLOP counter on one step, and an analytic count of the LightningDiT step (token
matmuls, attention and adaLN, times 3 for forward + backward) to check it. MFU = FLOPs / (median
step time x the fp32 (or bf16) matmul peak measured here). With ``--profile`` one step of each
model is profiled with ``torch.profiler``; the top operators by self time are stored.

    python bench/mfu_diffusion.py --quick
    python bench/mfu_diffusion.py --width 1152 --depth 28 --heads 16 --device cuda --precision bf16
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import components  # noqa: E402

MODELS = ("lightningdit", "flow-dit", "plain")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")
ATTN_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
            "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_backward",
            "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_efficient_attention_backward",
            "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_cudnn_attention_backward")


def lightningdit_flops(width: int, depth: int, tokens: int, batch: int, channels: int, mlp_ratio: float = 4.0) -> dict[str, float]:
    """Analytic matmul FLOPs of one LightningDiT training step (forward x 3)."""
    hidden = int(2 * mlp_ratio * width / 3)
    per_token_block = 2 * (3 * width * width + width * width + width * 2 * hidden + hidden * width)
    attention_block = 2 * 2 * tokens * width  # QK^T and AV per token
    ada_per_sample = depth * 2 * width * 6 * width + 2 * width * 2 * width
    embed = 2 * channels * width + 2 * width * channels  # patch embed and final linear (patch 1)
    t_embed = 2 * (256 * width + width * width)
    fwd = batch * (tokens * (depth * (per_token_block + attention_block) + embed) + ada_per_sample + t_embed)
    return {"forward": float(fwd), "train_step": float(3 * fwd),
            "parts_forward": {"block_matmuls": float(batch * tokens * depth * per_token_block), "attention": float(batch * tokens * depth * attention_block),
                              "adaln": float(batch * ada_per_sample), "embed_final": float(batch * tokens * embed)}}


# LightningDiT ablations (--ablate): one switch off at a time, to see what each costs per step.
ABLATIONS = {
    "no-rope": ["diffusion.args.rope=false"],
    "no-qk-norm": ["diffusion.args.qk_norm=false"],
    "gelu-mlp": ["diffusion.args.swiglu=false"],
    "layernorm": ["diffusion.args.rmsnorm=false"],
    "no-cos-loss": ["diffusion.args.cos_loss_weight=0"],
}


def build_flow_model(name: str, width: int, depth: int, heads: int, grid: int, channels: int, device: torch.device, extra: list[str] | None = None):
    from vfmbench.build import build_diffusion

    preset = "lightningdit-smoke" if name == "lightningdit" else "smoke"
    sets = [f"diffusion.name={name}", f"diffusion.args.width={width}", f"diffusion.args.depth={depth}", f"diffusion.args.heads={heads}",
            "diffusion.args.patch_size=1", *(extra or [])]
    s = components.make_setup(preset, sets, device, "fp32")
    torch.manual_seed(0)
    model = build_diffusion(s.host, s.cfg, (channels, grid, grid), 1000).to(device)
    return model, s.cfg.diffusion.train.lr


def flow_step(model, lr: float, batch: int, grid: int, channels: int, device: torch.device, autocast) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, channels, grid, grid, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return components.phase_step(model, model.training_phases(lr), lambda: (z, y), autocast)


def plain_step(width: int, depth: int, heads: int, tokens: int, batch: int, device: torch.device, autocast) -> tuple[Callable[[], None], int]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
    enc = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False).to(device).train()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type in ("cpu", "cuda"))  # as train_loop's
    x = torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = enc(x).float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
        opt.step()

    return step, sum(p.numel() for p in enc.parameters())


def profile_step(step: Callable[[], None], device: torch.device, top: int = 25) -> dict[str, Any]:
    """One profiled step: top operators by self time, and the shares of GEMMs and attention kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        common.synchronize(device)
    rows = []
    cuda = device.type == "cuda"
    for e in prof.key_averages():
        self_us = (getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total)
        rows.append({"op": e.key, "count": int(e.count), "self_ms": self_us / 1000.0})
    total = sum(r["self_ms"] for r in rows) or 1.0
    rows.sort(key=lambda r: -r["self_ms"])
    for r in rows:
        r["share"] = r["self_ms"] / total
    gemm = sum(r["self_ms"] for r in rows if r["op"] in GEMM_OPS)
    attn = sum(r["self_ms"] for r in rows if r["op"] in ATTN_OPS)
    return {"clock": "device self time" if cuda else "CPU self time", "total_self_ms": total, "gemm_share": gemm / total,
            "attention_share": attn / total, "other_share": 1 - (gemm + attn) / total, "top_ops": rows[:top]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--tokens", type=int, default=256, help="a square number: the latent grid is sqrt(tokens) at patch 1")
    p.add_argument("--channels", type=int, default=32, help="latent channels")
    p.add_argument("--batch", type=int, default=0, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 (autocast)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=0, help="default 3 with --quick, else 6")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ablate", action="store_true", help=f"also time LightningDiT with one feature off at a time: {', '.join(ABLATIONS)}")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "mfu_diffusion.json"))
    args = p.parse_args(argv)

    common.set_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    grid = int(round(math.sqrt(args.tokens)))
    if grid * grid != args.tokens:
        p.error("--tokens must be a square number")
    batch = args.batch or (64 if device.type == "cuda" else 8)
    repeats = args.repeats or (3 if args.quick else 6)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def autocast():
        import contextlib

        return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    peak = common.matmul_peak(device, dtype, repeats=3 if args.quick else 5)
    common.log(f"matmul peak ({peak['dtype']}, n={peak['n']}): {peak['tflops']:.3f} TFLOP/s")
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        common.log(f"{name}: width {args.width}, depth {args.depth}, heads {args.heads}, {args.tokens} tokens, batch {batch}")
        if name == "plain":
            step, params = plain_step(args.width, args.depth, args.heads, args.tokens, batch, device, autocast)
        elif name in ("lightningdit", "flow-dit"):
            model, lr = build_flow_model(name, args.width, args.depth, args.heads, grid, args.channels, device)
            params = sum(p.numel() for p in model.parameters())
            step = flow_step(model, lr, batch, grid, args.channels, device, autocast)
        else:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        with common.PeakMemory(device) as mem:
            timing = common.time_fn(step, device, warmup=args.warmup, repeats=repeats)
        flops = common.count_flops(step)
        sec = timing["median_s"]
        r = {"model": name, "params": params, "batch": batch, "tokens": args.tokens, "width": args.width, "depth": args.depth,
             "heads": args.heads, "seconds_per_step": sec, "images_per_s": batch / sec, "timing": timing, "memory": mem.result,
             "flops_per_step": flops["flops"], "flops_by_op": flops["by_op"], "tflops_achieved": flops["flops"] / sec / 1e12,
             "mfu": common.mfu(flops["flops"], sec, peak["tflops"]),
             "mfu_best_step": common.mfu(flops["flops"], timing["min_s"], peak["tflops"])}
        if name == "lightningdit":
            r["analytic_flops"] = lightningdit_flops(args.width, args.depth, args.tokens, batch, args.channels)
        if args.profile:
            r["profile"] = profile_step(step, device)
        common.log(f"{name}: {sec:.3f} s/step, {r['tflops_achieved']:.3f} TFLOP/s, MFU {r['mfu']:.3f}"
                   + (f", GEMM share {r['profile']['gemm_share']:.2f}" if args.profile else ""))
        results.append(r)
    ablations = []
    if args.ablate:
        base = next((r for r in results if r["model"] == "lightningdit"), None)
        for name, extra in ABLATIONS.items():
            model, lr = build_flow_model("lightningdit", args.width, args.depth, args.heads, grid, args.channels, device, extra)
            step = flow_step(model, lr, batch, grid, args.channels, device, autocast)
            timing = common.time_fn(step, device, warmup=args.warmup, repeats=repeats)
            a = {"variant": name, "sets": extra, "timing": timing, "seconds_per_step": timing["median_s"]}
            if base:
                a["min_s_vs_lightningdit"] = timing["min_s"] / base["timing"]["min_s"]
            common.log(f"ablation {name}: {timing['median_s']:.3f} s/step (min {timing['min_s']:.3f})")
            ablations.append(a)
    by = {r["model"]: r for r in results}
    data = {
        "kind": "mfu_diffusion",
        "environment": common.environment(device),
        "settings": {"width": args.width, "depth": args.depth, "heads": args.heads, "tokens": args.tokens, "channels": args.channels,
                     "batch": batch, "precision": args.precision, "warmup": args.warmup, "repeats": repeats, "quick": args.quick},
        "matmul_peak": peak,
        "models": results,
        "ablations": ablations,
        "ratio_to_plain": {m: by[m]["mfu"] / by["plain"]["mfu"] for m in by if "plain" in by and m != "plain"},
        "targets": {"diffusion_mfu_at_least": 0.60, "plain_reference_mfu": 0.80},
    }
    common.write_json(args.out, data)
    common.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
