"""Command line: ``vfmbench plugins | list | run | sweep | leaderboard``.

Bad input (unknown names, unknown config keys, wrong types, missing files or weights) prints
what is wrong and how to fix it, writes nothing, and exits with code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import UserError

LIST_KINDS = ("tokenizers", "vfms", "decoders", "diffusion", "datasets", "extractors", "metrics", "presets", "stages")
DEFAULT_PRESET = "smoke"


def _host(args, quiet: bool = False):
    """The plugin host; a plugin that failed to load is warned about (``vfmbench plugins`` shows why)."""
    from .plugins import get_plugin_manager, warn

    local = _plugins_dir_files(Path(args.plugins_dir)) if getattr(args, "plugins_dir", None) else []
    host = get_plugin_manager(local_plugins=local)
    if not quiet:
        for p in host.failed.values():
            warn(f"plugin {p.name!r} ({p.distribution}) is not loaded: {p.error.splitlines()[0]} (see `vfmbench plugins`)")
    return host


def _plugins_dir_files(folder: Path) -> list[tuple[str, Path]]:
    """``(plugin name, file)`` of every ``*.py`` in a ``--plugins-dir`` folder (the name: the file stem, '_' -> '-')."""
    if not folder.is_dir():
        raise UserError(f"--plugins-dir {str(folder)!r} is not a folder")
    return [(f.stem.replace("_", "-"), f) for f in sorted(folder.glob("*.py"))]


def _load_plugins_dir(folder: Path) -> list[tuple[str, Any]]:
    """The modules of a ``--plugins-dir`` folder, imported (for ``get_plugin_manager(extra_plugins=...)``)."""
    from .plugins import _import_file

    return [(name, _import_file(name, f)) for name, f in _plugins_dir_files(folder)]


# ------------------------------------------------------------------------------------------------
# plugins / list


def cmd_plugins(args) -> int:
    """Every plugin: loaded ones with their hooks and components, failed ones with the error,
    disabled ones with the reason (and the components they would register)."""
    host = _host(args, quiet=True)
    every = {**host.disabled, **host.failed, **host.plugins}
    items = [dataclasses.asdict(p) for _, p in sorted(every.items())]
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        from tabulate import tabulate

        rows = [[p["name"], p["status"] + (f": {p['error']}" if p["error"] else ""), p["version"], p["distribution"], ", ".join(p["hooks"]),
                 "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(p["components"].items()))] for p in items]
        print(tabulate(rows, headers=["plugin", "status", "version", "distribution", "hooks", "components"], tablefmt="github"))
    return 0


def cmd_list(args) -> int:
    from tabulate import tabulate

    host = _host(args)
    reg = host[args.kind]
    if args.kind == "vfms":
        from .vfm import vfm_param_count

        rows = []
        for s in reg:
            rows.append([s.name, ", ".join(s.aliases), s.library, s.patch_size, s.resolution, s.width, s.depth,
                         f"{vfm_param_count(s) / 1e6:.1f}M" if s.adapter is not None else  # a VFM without an adapter: its published figure
                         (f"{s.published_params / 1e6:.1f}M" if s.published_params else "–"), s.license, s.description])
        headers = ["name", "aliases", "library", "patch", "res", "width", "depth", "params", "licence", "description"]
    elif args.kind == "metrics":
        rows = [[s.name, s.family, "↑" if s.higher_is_better else "↓", s.inputs, f"{s.extractor}/{s.feature}".strip("/"),
                 ", ".join(s.protocol_fields), s.description] for s in reg]
        headers = ["name", "family", "better", "inputs", "features", "protocol fields", "description"]
    elif args.kind == "tokenizers":
        rows = [[s.name, f"f{s.downsample}d{s.latent_channels}", "yes" if s.uses_vfm else "no", s.default_decoder or "fixed",
                 s.release or "–", f"{s.encoder_params_m:g}/{s.decoder_params_m:g}" if s.release else "–", s.license if s.release else "–",
                 s.description] for s in reg]
        headers = ["name", "latent", "frozen VFM", "decoder", "release", "enc/dec M", "licence", "description"]
    elif args.kind == "extractors":
        rows = [[s.name, s.inputs, ", ".join(s.features), reg.owner(s.name), s.description] for s in reg]
        headers = ["name", "inputs", "features", "plugin", "description"]
    elif args.kind == "stages":
        from .planner import stage_order

        rows = [[s.name, ", ".join(s.needs), ", ".join(s.produces), "all ranks" if s.parallel else "rank 0", reg.owner(s.name), s.description]
                for s in (reg.get(n) for n in stage_order(host))]
        headers = ["name (plan order)", "needs", "produces", "runs on", "plugin", "description"]
    else:
        rows = [[s.name, ", ".join(s.aliases), s.version, s.description] for s in reg]
        headers = ["name", "aliases", "version", "description"]
    print(tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True))
    return 0


# ------------------------------------------------------------------------------------------------
# run / sweep


def resolve_run_config(host, preset: str | None, config_file: str | None, sets: list[str], flags: dict[str, str | None]):
    from .config import load_yaml, parse_set, resolve

    preset_spec = host.presets.get(preset or DEFAULT_PRESET)
    layers: list[dict] = [dict(preset_spec.values)]
    if config_file:
        layers.append(load_yaml(config_file))
    flag_keys = {"tokenizer": ("tokenizer", "name"), "vfm": ("vfm", "name"), "decoder": ("decoder", "name"),
                 "diffusion": ("diffusion", "name"), "dataset": ("data", "dataset"), "out": ("run", "out")}
    for flag, value in flags.items():
        if value is not None:
            section, key = flag_keys[flag]
            layers.append({section: {key: value}})
    for s in sets:
        layers.append(parse_set(s))
    return resolve(layers, host.stages.names())


def _stages(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [s.strip() for s in value.split(",") if s.strip()]


def cmd_run(args) -> int:
    host = _host(args)
    sets = list(args.set or [])
    if args.stages is not None:
        sets.append(f"run.stages={json.dumps(_stages(args.stages))}")
    from .resolution import resolve_run

    cfg = resolve_run(host, resolve_run_config(host, args.preset, args.config, sets, {
        "tokenizer": args.tokenizer, "vfm": args.vfm, "decoder": args.decoder, "diffusion": args.diffusion,
        "dataset": args.dataset, "out": args.out}))  # the one resolution step: validated, then only read
    if args.dry_run:
        from .dryrun import dry_run

        report = dry_run(host, cfg)
        if args.json:
            print(json.dumps(report, indent=2, sort_keys=True))
        else:
            from .dryrun import format_report

            print(format_report(report))
        blocked = [s for s in report["plan"]["steps"] if s["action"] == "blocked"]
        if blocked:
            raise UserError("the run cannot start: " + "; ".join(f"stage {s['stage']!r} {s['why']}" for s in blocked))
        return 0
    from . import dist
    from .runner import Run

    dist.init_from_env()
    if cfg.cfg.run.num_threads:
        import torch

        torch.set_num_threads(cfg.cfg.run.num_threads)
    run = Run.prepare(host, cfg)
    run.execute()
    if dist.is_main():
        print(run.run_dir)
    return 0


SLURM_FLAGS = {"slurm_partition": "partition", "nodes": "nodes", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
               "timeout_min": "timeout_min", "slurm_account": "account", "slurm_qos": "qos"}


def _slurm_options(args):
    """SlurmOptions from the sweep flags; Slurm flags without ``--launcher slurm`` are an error."""
    given = [f for f in [*SLURM_FLAGS, "slurm_arg"] if getattr(args, f) is not None]
    if args.launcher != "slurm":
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} is a Slurm option; add --launcher slurm (or drop it)")
        return None
    from .launch import SlurmOptions, parse_slurm_args

    values = {field: getattr(args, flag) for flag, field in SLURM_FLAGS.items() if getattr(args, flag) is not None}
    return SlurmOptions(**values, extra=parse_slurm_args(args.slurm_arg or []))


def cmd_sweep(args) -> int:
    from .sweep import run_sweep

    slurm = _slurm_options(args)
    host = _host(args)
    return run_sweep(host, Path(args.file), out=args.out, dry_run=args.dry_run, launcher=args.launcher, slurm=slurm,
                     plugins_dir=args.plugins_dir, sets=args.set)


def cmd_eval(args) -> int:
    host = _host(args)
    sets = list(args.set or [])
    if args.what == "generation":
        from .config import parse_set, resolve
        from .evalcmd import evaluate_generation

        if not args.samples or not args.reference:
            raise UserError("eval generation needs SAMPLES (a folder or .npz) and --reference (an ADM .npz or a folder)")
        layers = [parse_set(s) for s in sets]
        if args.smoke:
            layers.append({"run": {"smoke": True}})
        cfg = resolve(layers)
        from .preflight import check_npz, check_sizes

        check_sizes(cfg)
        check_npz(args.samples, "SAMPLES")
        check_npz(args.reference, "--reference")
        rows = evaluate_generation(host, cfg, args.samples, args.reference)
        _print_rows(rows)
        if args.out:
            from .results import write_rows

            write_rows(args.out, rows)
            print(args.out)
        return 0
    if args.what == "alignment":
        from .alignment_eval import evaluate_alignment

        if not args.samples:
            raise UserError("eval alignment needs RUN_DIR (a run directory with a trained tokenizer)")
        rows, png = evaluate_alignment(host, Path(args.samples), args.images, args.topk, args.reference_vfm or "", args.seed)
        from tabulate import tabulate

        print(tabulate([[r["layer"], f"{r['cknna']:.4f}", "" if r["se_cknna"] is None else f"{r['se_cknna']:.4f}"] for r in rows],
                       headers=["layer", "CKNNA", "SE-CKNNA"], tablefmt="simple", disable_numparse=True))
        print(png)
        return 0
    if not args.weights:
        raise UserError(f"eval {args.what} needs --weights PATH (a tokenizer model.safetensors written by a run, or the release folder of a zoo tokenizer)")
    from .evalcmd import EVAL_STAGES

    sets += [f"tokenizer.weights={args.weights}", f"run.stages={json.dumps(EVAL_STAGES[args.what])}"]
    if args.smoke:
        sets.append("run.smoke=true")
    cfg = resolve_run_config(host, args.preset, args.config, sets, {
        "tokenizer": args.tokenizer, "vfm": args.vfm, "decoder": args.decoder, "diffusion": None, "dataset": args.dataset, "out": args.out})
    from . import dist
    from .results import read_rows
    from .runner import Run

    dist.init_from_env()  # under torchrun: every rank runs the stages together
    run = Run.prepare(host, cfg)
    run.execute()
    if dist.is_main():
        _print_rows(read_rows(run.run_dir / "results.jsonl"))
        print(run.run_dir)
    return 0


def _print_rows(rows) -> None:
    from tabulate import tabulate

    print(tabulate([[r["metric"], f"{r['value']:.6g}", r["label"], r["protocol"].get("reference", "")] for r in rows],
                   headers=["metric", "value", "label", "reference"], tablefmt="simple", disable_numparse=True), file=sys.stderr)


def _copy_images(rows, out: Path) -> None:
    """Copy each row's grids to <out stem>-images/<run>/ so the markdown links survive without the runs."""
    import shutil

    folder = out.parent / f"{out.stem}-images"
    for r in rows:
        images, run_dir = r.get("images") or {}, r.get("_run_dir")
        if not images or not run_dir:
            continue
        new = {}
        for name, rel in images.items():
            src = Path(run_dir) / rel
            if src.is_file():
                dst = folder / r["run_id"] / f"{name}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists() or dst.read_bytes() != src.read_bytes():
                    shutil.copyfile(src, dst)
                new[name] = str(dst.relative_to(out.parent))
        r["images"], r["_run_dir"] = new, str(out.parent)


def cmd_leaderboard(args) -> int:
    from .checkpoint import write_text
    from .leaderboard import collect_rows, render

    paths = args.paths or ["runs"]
    rows = collect_rows(paths)
    out = Path(args.out) if args.out else None
    if args.copy_images:
        if out is None:
            raise UserError("--copy-images needs --out (the pictures are copied next to the markdown file)")
        _copy_images(rows, out)
    if args.correlate and out is None:
        raise UserError("--correlate writes scatter plots next to the markdown: pass --out FILE.md")
    if args.zoo:
        from .zoo_board import render_zoo

        title = "Released tokenizer zoo" if args.title == "vfmbench leaderboard" else args.title
        text = render_zoo(rows, _host(args), Path(args.published) if args.published else None, title=title)
    else:
        text = render(rows, title=args.title, link_base=out.parent if out else Path.cwd())
    if args.correlate:
        from .correlate import report

        text = text.rstrip() + "\n\n" + report(rows, args.correlate, out.parent / f"{out.stem}-correlate", out.parent)
    if out:
        write_text(out, text)
        print(out)
    else:
        sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vfmbench", description="Benchmark visual tokenizers of latent diffusion models.")
    p.add_argument("--plugins-dir", help="load every *.py in this folder as a plugin (one-off plugins)")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("plugins", help="list loaded plugins, their hooks and components")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_plugins)

    sp = sub.add_parser("list", help="list registered components of one kind")
    sp.add_argument("kind", choices=LIST_KINDS)
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("run", help="train and evaluate one combination")
    sp.add_argument("--preset", help=f"named configuration (default: {DEFAULT_PRESET})")
    sp.add_argument("--tokenizer")
    sp.add_argument("--vfm")
    sp.add_argument("--decoder")
    sp.add_argument("--diffusion")
    sp.add_argument("--dataset")
    sp.add_argument("--config", help="YAML file composed over the preset")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable), e.g. data.resolution=128")
    sp.add_argument("--out", help="parent folder of run directories (default: runs)")
    sp.add_argument("--stages", help="comma-separated stages to run (default: every registered stage; `vfmbench list stages`), "
                    "e.g. tokenizer,recon-eval,latents,latent-eval,probe,diffusion,sample,gen-eval,results")
    sp.add_argument("--dry-run", action="store_true", help="print the plan (run, skip, blocked and why), the resolved config and parameter counts; build no weights, train nothing")
    sp.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("sweep", help="run a matrix of combinations from a YAML file, one after another or as Slurm jobs")
    sp.add_argument("file")
    sp.add_argument("--out", help="parent folder of run directories (overrides the file)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every combination, after the file's (repeatable)")
    sp.add_argument("--dry-run", action="store_true", help="print each combination, its run directory and whether it is finished")
    sp.add_argument("--launcher", choices=("local", "slurm"), default="local",
                    help="local: one after another in this process (default); slurm: one submitit job per combination, each a torchrun")
    sp.add_argument("--slurm-partition", help="slurm: partition")
    sp.add_argument("--nodes", type=int, help="slurm: nodes per job (default 1)")
    sp.add_argument("--gpus-per-node", type=int, help="slurm: GPUs per node = torchrun processes per node (default 1)")
    sp.add_argument("--cpus-per-task", type=int, help="slurm: CPUs per node's task (default: Slurm's)")
    sp.add_argument("--timeout-min", type=int, help="slurm: time limit per job in minutes (default 1440); jobs requeue on timeout")
    sp.add_argument("--slurm-account", help="slurm: account")
    sp.add_argument("--slurm-qos", help="slurm: quality of service")
    sp.add_argument("--slurm-arg", action="append", metavar="KEY=VALUE", help="slurm: any other sbatch option (repeatable), e.g. mem=200G")
    sp.set_defaults(func=cmd_sweep)

    sp = sub.add_parser("eval", help="metrics without training: generated samples vs a reference, or a tokenizer from weights")
    sp.add_argument("what", choices=("generation", "reconstruction", "latents", "alignment"))
    sp.add_argument("samples", nargs="?", help="generation: a folder of images or an ADM .npz of samples; alignment: a run directory")
    sp.add_argument("--images", type=int, default=10_000, help="alignment: val images, a seeded random sample (VFM-VAE: 10k)")
    sp.add_argument("--seed", type=int, default=42, help="alignment: seed of the image sample and the transforms")
    sp.add_argument("--topk", type=int, default=10, help="alignment: CKNNA neighbours")
    sp.add_argument("--reference-vfm", help="alignment: the reference VFM (default: the run's VFM)")
    sp.add_argument("--reference", help="generation: an ADM reference batch .npz or a folder of images")
    sp.add_argument("--weights", help="reconstruction, latents: tokenizer weights (model.safetensors of a run, a .pt state dict, or a zoo release folder: docs/zoo.md)")
    sp.add_argument("--preset")
    sp.add_argument("--tokenizer")
    sp.add_argument("--vfm")
    sp.add_argument("--decoder")
    sp.add_argument("--dataset")
    sp.add_argument("--config")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE")
    sp.add_argument("--smoke", action="store_true", help="allow random-init extractors (numbers labelled smoke)")
    sp.add_argument("--out", help="generation: write rows to this .jsonl; reconstruction, latents: parent folder of run directories")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("leaderboard", help="render markdown leaderboards from run directories or result files")
    sp.add_argument("paths", nargs="*", help="run directories, folders of runs, results .jsonl or published .yaml (default: runs)")
    sp.add_argument("--out", help="write to this file instead of stdout")
    sp.add_argument("--title", default="vfmbench leaderboard")
    sp.add_argument("--copy-images", action="store_true", help="copy the linked PNG grids next to --out (for publishing)")
    sp.add_argument("--zoo", action="store_true", help="the zoo leaderboard: one line per released tokenizer run, metadata columns (docs/zoo.md)")
    sp.add_argument("--published", help="--zoo: YAML of the authors' own numbers, shown in a separate table (leaderboards/zoo-published.yaml)")
    sp.add_argument("--correlate", metavar="METRIC", help="add how well each latent metric predicts METRIC (e.g. gfid) across the runs: "
                    "Pearson/Spearman/Kendall with bootstrap CIs, and scatter plots in <out>-correlate/")
    sp.set_defaults(func=cmd_leaderboard)
    return p


def main(argv: list[str] | None = None) -> int:
    from .failures import report

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("vfmbench: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # one paragraph (file, what is wrong, how to fix); VFMBENCH_DEBUG=1 adds the traceback
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
