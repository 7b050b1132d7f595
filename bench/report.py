"""``bench/RESULTS.md`` and ``bench/scaling.png`` from the JSON files in ``bench/results/``.

Never edit RESULTS.md by hand: ``python bench/report.py`` (or ``python bench/run_all.py``, which
measures first) regenerates it. Every figure carries the environment it was measured in.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FILES = ("components", "e2e", "scaling", "mfu_diffusion", "gpu_check")


def load(results_dir: Path) -> dict[str, Any]:
    out = {}
    for name in FILES:
        p = results_dir / f"{name}.json"
        if p.exists():
            out[name] = common.read_json(p)
    return out


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _gflop(x: Any) -> str:
    return "n/a" if not x else f"{x / 1e9:,.2f}"


def _env_line(env: dict[str, Any]) -> str:
    load = env.get("load_average_1m")
    return (f"{env.get('date', '?')} · {env.get('device', '?')} · torch {env.get('torch')} · Python {env.get('python')} · "
            f"vfmbench {env.get('vfmbench')} ({env.get('git') or 'no git'}) · load average {load if load is not None else '?'}")


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def components_section(data: dict[str, Any], title: str) -> list[str]:
    env = data["environment"]
    st = data["settings"]
    label = "CPU smoke sizes" if env.get("device_type") == "cpu" else "paper sizes"
    lines = [f"## {title} ({label})", "", f"Measured: {_env_line(env)}.", "",
             f"Preset `{st['preset']}`{' with ' + ', '.join('`' + s + '`' for s in st['sets']) if st.get('sets') else ''}, "
             f"precision {st['precision']}, median of {st['repeats']} steps after {st['warmup']} warm-up"
             f"{', each component in its own process' if st.get('isolated') else ''}. Peak memory: "
             f"{'CUDA max_memory_allocated' if env.get('device_type') == 'cuda' else 'peak RSS of the process (start RSS after building in brackets)'}.", ""]
    rows = []
    for r in data["components"]:
        if "error" in r:
            rows.append([r["component"], "", "", "", "", "", "", f"error: {r['error']}"])
            continue
        mem = r["memory"]
        mem_s = f"{mem['peak_gib']:.2f}" + (f" ({mem['start_gib']:.2f})" if env.get("device_type") == "cpu" else "")
        note = ""
        if r["component"].startswith("sampling-") and "steps" in r:
            note = f"{r['sampler']}, {r['steps']} steps, CFG {r['cfg_scale']}"
        elif r["component"] in ("fid", "fid-128"):
            note = f"N={r['images']}, D={r['feature_dim']}" + (" (N x N eigenproblem)" if r["images"] <= r["feature_dim"] else "")
        elif "diffusion" in r:
            note = r["diffusion"]
        elif "tokenizer" in r:
            note = f"{r['tokenizer']} ({r.get('stage', '')}; phases {'+'.join(r.get('phases', []))})"
        elif "vfm" in r:
            note = f"{r['vfm']} ({r.get('vfm_size')}), grid {r.get('token_grid')}"
        rows.append([r["component"], str(r["images_per_step"]), _f(r["images_per_s"]), _f(r["seconds_per_image"]),
                     mem_s, _gflop(r["flops_per_step"]), _pct(r["mfu"]), note])
    lines += _table(["component", "images/step", "images/s", "s/image", "peak GiB", "GFLOP/step", "MFU", "notes"], rows)
    peaks = {r["compute_dtype"]: r.get("peak_tflops") for r in data["components"] if r.get("peak_tflops")}
    if peaks:
        lines += ["", "MFU is against the matmul peak measured in the same process: "
                  + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in peaks.items()) + "."]
    return lines + [""]


def e2e_section(data: dict[str, Any]) -> list[str]:
    first, second = data["first"], data["second"]
    lines = ["## End to end: `" + data["command"] + "` (CPU smoke)", "", f"Measured: {_env_line(data['environment'])}.", "",
             f"- First run (empty cache folder): **{first['wall_s']:.1f} s** wall (target < {data['targets']['first_wall_s_below']:.0f} s).",
             f"- Second run, same combination, new output folder, same `run.cache_dir`: **{second['wall_s']:.1f} s** wall.",
             f"- Evaluation stages ({', '.join(data['eval_stages'])}): {data['eval_stages_s']['first']:.1f} s → "
             f"{data['eval_stages_s']['second']:.1f} s, **×{_f(data['eval_speedup'])}** (target ≥ ×{data['targets']['eval_speedup_at_least']:.0f}).", ""]
    rows = []
    for st, s1 in first["stages_s"].items():
        s2 = second["stages_s"].get(st)
        rows.append([st, f"{s1:.1f}", "n/a" if s2 is None else f"{s2:.1f}", _f(data["speedup_by_stage"].get(st))])
    lines += _table(["stage", "run 1 s", "run 2 s", "speed-up"], rows)
    return lines + [""]


def scaling_section(data: dict[str, Any], png: str | None) -> list[str]:
    lines = ["## Scaling (CPU smoke models)", "", f"Measured: {_env_line(data['environment'])}.", ""]
    res = [r for r in data.get("resolution", []) if "error" not in r]
    if res:
        comps = list(dict.fromkeys(r["component"] for r in res))
        resolutions = sorted({r["resolution"] for r in res})
        lines += [f"Seconds per image by `data.resolution` (batch {data['settings']['batch']}; GFLOP per image in brackets):", ""]
        rows = []
        for c in comps:
            row = [c]
            for rr in resolutions:
                m = next((r for r in res if r["component"] == c and r["resolution"] == rr), None)
                row.append("n/a" if m is None else f"{_f(m['seconds_per_image'])} ({_gflop((m['flops_per_step'] or 0) / m['images_per_step'])})")
            rows.append(row)
        lines += _table(["component"] + [f"{r} px" for r in resolutions], rows) + [""]
    sw = data.get("sweep")
    if sw and sw.get("cumulative"):
        one = sw["cumulative"][0]["wall_s"]
        lines += [f"Sweep wall time by number of combinations (matrix {sw['matrix']}, shortened smoke settings, one process, shared cache):", ""]
        rows = [[str(c["combinations"]), f"{c['wall_s']:.1f}", f"{c['wall_s'] / one:.2f}", f"{c['wall_s'] / (one * c['combinations']):.2f}"]
                for c in sw["cumulative"]]
        lines += _table(["combinations", "wall s", "× one combination", "vs linear"], rows) + [""]
        lines += ["Per combination: " + "; ".join(f"`{r['run']}` {r['stages_total_s']:.1f} s" for r in sw["runs"]) + ".", ""]
    if png:
        lines += [f"![scaling curves]({png})", ""]
    return lines


def mfu_section(data: dict[str, Any]) -> list[str]:
    st, pk = data["settings"], data["matmul_peak"]
    lines = [f"## Diffusion training step MFU (width {st['width']}, depth {st['depth']}, {st['heads']} heads, {st['tokens']} tokens, batch {st['batch']}, {st['precision']})", "",
             f"Measured: {_env_line(data['environment'])}.", "",
             f"Matmul peak ({pk['dtype']}, {pk['n']}×{pk['n']}, best of runs): **{pk['tflops']:.3g} TFLOP/s**. "
             f"Target: diffusion step ≥ {data['targets']['diffusion_mfu_at_least']:.0%} of it "
             f"(a plain PyTorch stack of this size reaches about {data['targets']['plain_reference_mfu']:.0%} on a quiet machine).", ""]
    rows = []
    for m in data["models"]:
        prof = m.get("profile") or {}
        rows.append([m["model"], f"{m['params'] / 1e6:.1f}M", f"{m['flops_per_step'] / 1e9:,.1f}", f"{m['seconds_per_step']:.3f}",
                     f"{m['tflops_achieved']:.3g}", f"**{_pct(m['mfu'])}**", _pct(m.get("mfu_best_step")), _pct(prof.get("gemm_share")), _pct(prof.get("attention_share"))])
    lines += _table(["model", "params", "GFLOP/step (counted)", "s/step (median)", "TFLOP/s", "MFU (median)", "MFU (best step)", "GEMM time", "attention time"], rows)
    ld = next((m for m in data["models"] if m["model"] == "lightningdit"), None)
    if ld and ld.get("analytic_flops"):
        a = ld["analytic_flops"]
        lines += ["", f"FLOP count of the LightningDiT step: {ld['flops_per_step'] / 1e9:,.1f} GFLOP from torch's FLOP counter "
                  f"(matmuls, attention; element-wise work not counted), {a['train_step'] / 1e9:,.1f} GFLOP analytic "
                  f"(3 × forward; forward = " + ", ".join(f"{k} {v / 1e9:,.1f}" for k, v in a["parts_forward"].items()) + " GFLOP)."]
    if data.get("ratio_to_plain"):
        lines += ["", "MFU relative to the plain stack: " + ", ".join(f"{k} {v:.2f}" for k, v in data["ratio_to_plain"].items()) + "."]
    if data.get("ablations"):
        lines += ["", "LightningDiT with one feature off (min step time relative to the full model):", ""]
        lines += _table(["variant", "s/step (median)", "min relative"],
                        [[a["variant"], f"{a['seconds_per_step']:.3f}", _f(a.get("min_s_vs_lightningdit"))] for a in data["ablations"]])
    if ld and ld.get("profile"):
        lines += ["", f"Top operators of one LightningDiT step ({ld['profile']['clock']}):", ""]
        lines += _table(["operator", "calls", "self ms", "share"],
                        [[f"`{r['op']}`", str(r["count"]), f"{r['self_ms']:.0f}", _pct(r["share"])] for r in ld["profile"]["top_ops"][:12]])
    return lines + [""]


def gpu_section(data: dict[str, Any]) -> list[str]:
    st = data["settings"]
    lines = [f"## GPU check (`bench/gpu_check.py`{' --tiny' if st['tiny'] else ''}: preset `{st['preset']}`, {st['precision']})", "",
             f"Measured: {_env_line(data['environment'])}. Elapsed {data.get('elapsed_s', 0):.0f} s.", "",
             "Matmul peaks: " + ", ".join(f"{k} {v['tflops']:.4g} TFLOP/s" for k, v in data["matmul_peaks"].items()) + ".", ""]
    rows = []
    for r in data["checks"]:
        if "error" in r or "skipped" in r:
            rows.append([r["component"], str(r.get("images_per_step", "")), "", "", "", "", r.get("error") or r.get("skipped")])
            continue
        rows.append([r["component"], str(r["images_per_step"]), _f(r["images_per_s"]), f"{r['memory']['peak_gib']:.2f}",
                     _gflop(r["flops_per_step"]), _pct(r["mfu"]), r["compute_dtype"]])
    lines += _table(["check", "images/step", "images/s", "peak GiB", "GFLOP/step", "MFU", "matmul dtype"], rows)
    return lines + [""]


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Seconds per image against resolution (log-log) and sweep wall time against combinations."""
    sc = results.get("scaling")
    if not sc:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    res = [r for r in sc.get("resolution", []) if "error" not in r]
    ax = axes[0]
    for c in dict.fromkeys(r["component"] for r in res):
        pts = sorted((r["resolution"], r["seconds_per_image"]) for r in res if r["component"] == c)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("data.resolution (px)")
    ax.set_ylabel("seconds per image")
    ax.set_title("cost vs resolution (CPU, smoke models)")
    if res:
        ax.legend(fontsize=8)
    ax = axes[1]
    sw = (sc.get("sweep") or {}).get("cumulative") or []
    if sw:
        ks = [c["combinations"] for c in sw]
        ax.plot(ks, [c["wall_s"] for c in sw], marker="o", label="measured")
        ax.plot(ks, [sw[0]["wall_s"] * k for k in ks], linestyle="--", label="linear from one combination")
        ax.legend(fontsize=8)
    ax.set_xlabel("combinations in the sweep")
    ax.set_ylabel("wall seconds")
    ax.set_title("cost vs sweep size (CPU, shortened smoke)")
    env = sc.get("environment", {})
    fig.suptitle(f"vfmbench scaling · {env.get('date', '')} · {env.get('device', '')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(results: dict[str, Any], png_name: str | None = "scaling.png") -> str:
    lines = ["# vfmbench benchmarks", "",
             "Generated by `python bench/run_all.py` (measure + report) or `python bench/report.py` (report only) from "
             "`bench/results/*.json`; do not edit by hand. CPU figures are for the **smoke** sizes (tiny random-init "
             "models at 64 px unless stated) and measure the pipeline's cost, not the paper's; paper-size figures come from "
             "`bench/gpu_check.py` / `bench/components.py --device cuda`. Timings taken while other work shares the machine "
             "are inflated: check the load average recorded with each section.", ""]
    if not results:
        lines += ["No results yet: run `python bench/run_all.py --quick`.", ""]
    if "e2e" in results:
        lines += e2e_section(results["e2e"])
    if "components" in results:
        lines += components_section(results["components"], "Components")
    if "mfu_diffusion" in results:
        lines += mfu_section(results["mfu_diffusion"])
    if "scaling" in results:
        lines += scaling_section(results["scaling"], png_name)
    if "gpu_check" in results:
        lines += gpu_section(results["gpu_check"])
    return "\n".join(lines).rstrip() + "\n"


def write_report(results_dir: Path = common.RESULTS_DIR, out: Path = common.BENCH_DIR / "RESULTS.md") -> Path:
    results = load(results_dir)
    png = plot(results, out.parent / "scaling.png")
    out.write_text(render(results, png.name if png else None))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(common.RESULTS_DIR))
    p.add_argument("--out", default=str(common.BENCH_DIR / "RESULTS.md"))
    args = p.parse_args(argv)
    path = write_report(Path(args.results), Path(args.out))
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
