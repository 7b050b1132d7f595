"""``vfmbench run --dry-run``: the plan (each stage: run, skip or blocked and why), the resolved
config and every component's parameter counts, built on the meta device (no weights are read or
downloaded, nothing is trained or written)."""
from __future__ import annotations

from typing import Any

import torch

from .build import BuildContext, build_diffusion, build_tokenizer, decoder_name, param_counts
from .config import RunConfig
from .plugins import Host


def dry_run(host: Host, cfg: "RunConfig | ResolvedRun") -> dict[str, Any]:
    from .planner import make_plan
    from .resolution import ResolvedRun, resolve_run
    from .sampling import sampler_protocol

    resolved = cfg if isinstance(cfg, ResolvedRun) else resolve_run(host, cfg)
    cfg = resolved.cfg
    plan = make_plan(host, cfg.run.stages, resolved.run_dir, cfg)
    tok_spec = host.tokenizers.get(cfg.tokenizer.name)
    ctx = BuildContext(host=host, config=cfg, meta=True)
    with torch.device("meta"):
        tok = build_tokenizer(ctx)
        latent_shape = tok.latent_shape(cfg.data.resolution)
        ds = host.datasets.get(cfg.data.dataset)
        diff = build_diffusion(host, cfg, latent_shape, ds.num_classes or 1000)
    components: dict[str, Any] = {"tokenizer": {"name": tok_spec.name, "version": tok_spec.version, **param_counts(tok)}}
    vfm_params = 0
    if tok_spec.uses_vfm:
        vfm = ctx.vfm()
        vfm_params = sum(p.numel() for p in vfm.parameters())
        components["vfm"] = {"name": vfm.spec.name, "version": vfm.spec.version, "total": vfm_params, "trainable": 0}
    dec_name = decoder_name(host, cfg)
    decoder = getattr(tok, "decoder", None)
    if dec_name and decoder is not None:
        components["decoder"] = {"name": dec_name, "version": host.decoders.get(dec_name).version, **param_counts(decoder)}
    components["tokenizer"]["trainable_excluding_vfm"] = components["tokenizer"]["trainable"]
    components["diffusion"] = {"name": host.diffusion.get(cfg.diffusion.name).name, **param_counts(diff)}
    return {
        "run_name": resolved.run_name,
        "latent_shape": list(latent_shape),
        "components": components,
        "sampler_protocol": sampler_protocol(cfg.diffusion.sample),
        "plan": plan.to_dict(),
        "config": cfg.to_dict(),
    }


def format_report(report: dict[str, Any]) -> str:
    import yaml

    lines = [f"run directory: {report['run_name']}", f"latent shape: {report['latent_shape']}", "", "plan:"]
    lines += [f"  {s['action']:<8} {s['stage']:<14} {s['why']}".rstrip() for s in report["plan"]["steps"]]
    lines += ["", "parameters:"]
    for kind, c in report["components"].items():
        lines.append(f"  {kind:<10} {c['name']:<24} total {c['total']:>14,}   trainable {c['trainable']:>14,}")
    lines += ["", "resolved config:", yaml.safe_dump(report["config"], sort_keys=False).rstrip()]
    return "\n".join(lines)
