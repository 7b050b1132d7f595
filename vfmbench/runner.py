"""The runner: one combination of tokenizer, VFM, decoder and diffusion model, as a plan of stages.

``Run.prepare`` validates the config, plans the requested stages against the run directory
(``vfmbench.planner``: run, skip when done, or blocked and why) and resolves everything that can
fail on bad input, before anything is written; ``Run.execute`` writes ``config.json`` and runs the
plan. The stages are plugins (``register_stages``; the built-ins live in ``vfmbench.stages``), each
receiving a ``vfmbench.context.RunContext``. Each stage writes into its own folder of the run
directory and marks itself done; re-running the same command skips finished stages and continues an
interrupted one from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__, preflight, transforms
from .build import BuildContext, build_tokenizer, decoder_name, resolve_device
from .checkpoint import write_json
from .config import RunConfig, config_hash
from .context import RunContext, git_hash, log  # noqa: F401 - log, git_hash: the runner's names before the stage split
from .errors import UserError
from .planner import Plan, check_plan, execute, make_plan, requested_stages
from .plugins import Host
from .zoo import is_release, release_path

# Config keys that do not change what a run computes (excluded from the run directory's hash).
NON_RESULT_KEYS = {
    ("run", "stages"), ("run", "out"), ("run", "num_threads"), ("run", "cache_dir"), ("metrics", "batch_size"),
    ("tokenizer", "train", "keep_checkpoints"), ("diffusion", "train", "keep_checkpoints"),
    # speed and memory switches: the same run directory, so e.g. checkpointing can rescue a run that ran out of memory
    ("run", "compile"), ("run", "compile_backend"), ("run", "grad_checkpointing"), ("run", "channels_last"),
    ("data", "num_workers"), ("data", "shuffle_buffer"), ("metrics", "cache_image_features"),
    ("run", "allow_divergence"), ("run", "max_skipped_fraction"), ("vfm", "trust_torchscript"),  # a diverged run resumes in place when allowed
}


def _result_dict(cfg: RunConfig, uses_vfm: bool = True) -> dict[str, Any]:
    d = cfg.to_dict()
    for *path, key in NON_RESULT_KEYS:
        node = d
        for part in path:
            node = node[part]
        node.pop(key, None)
    if not uses_vfm:  # the VFM axis of a sweep does not change a tokenizer that has no VFM
        d["vfm"].pop("name", None)
        d["vfm"].pop("weights", None)
        d["vfm"].pop("layers", None)
    return d


def run_name(host: Host, cfg: RunConfig) -> str:
    """Directory name derived from the config: readable components plus a hash of the rest."""
    tok = host.tokenizers.get(cfg.tokenizer.name)
    parts = [tok.name]
    if tok.uses_vfm:
        parts.append(host.vfms.canonical(cfg.vfm.name))
    dec = decoder_name(host, cfg)
    if dec and dec != tok.default_decoder:
        parts.append(dec)
    parts += [host.diffusion.canonical(cfg.diffusion.name), f"{host.datasets.canonical(cfg.data.dataset)}{cfg.data.resolution}"]
    return "-".join(parts) + "-" + config_hash(_result_dict(cfg, tok.uses_vfm), 8)


def validate(host: Host, cfg: RunConfig) -> None:
    """Resolve every name and argument section before anything is written."""
    from .build import component_args
    from .config import validate_args

    tok = host.tokenizers.get(cfg.tokenizer.name)
    validate_args(tok.config, component_args(cfg, tok.name, cfg.tokenizer.args), "tokenizer.args")
    if is_release(tok):
        release_path(tok, cfg)  # a released tokenizer's weights: found, or the release and its fetch command named
    if tok.uses_vfm:
        host.vfms.get(cfg.vfm.name)
    if cfg.vfm.size not in ("full", "tiny"):
        raise UserError(f"vfm.size must be 'full' or 'tiny', got {cfg.vfm.size!r}")
    if tok.uses_decoder:
        dec = host.decoders.get(cfg.decoder.name or tok.default_decoder)
        validate_args(dec.config, component_args(cfg, dec.name, cfg.decoder.args), "decoder.args")
    elif cfg.decoder.name:
        raise UserError(f"tokenizer {tok.name!r} has a fixed decoder; remove --decoder")
    diff = host.diffusion.get(cfg.diffusion.name)
    validate_args(diff.config, component_args(cfg, diff.name, cfg.diffusion.args), "diffusion.args")
    host.datasets.get(cfg.data.dataset)
    from .diffusion_weights import check_config
    from .metrics.preflight import check_metrics

    transforms.check_names(cfg.data)
    check_metrics(cfg)  # the ADM reference batch and the IS protocol, before any work (also --dry-run)
    check_config(cfg.diffusion)
    for m in cfg.metrics.names:
        host.metrics.get(m)
    from .latent_eval import validate as validate_latent

    validate_latent(cfg)
    s = cfg.diffusion.sample
    if s.label_sampling not in ("random", "balanced"):
        raise UserError(f"diffusion.sample.label_sampling must be 'random' or 'balanced', got {s.label_sampling!r}")
    if len(s.cfg_interval) != 2 or not 0.0 <= s.cfg_interval[0] <= s.cfg_interval[1] <= 1.0:
        raise UserError(f"diffusion.sample.cfg_interval must be [t_low, t_high] within [0, 1], got {s.cfg_interval}")
    for section, tc in (("tokenizer", cfg.tokenizer.train), ("diffusion", cfg.diffusion.train)):
        if tc.keep_checkpoints < 1:
            raise UserError(f"{section}.train.keep_checkpoints must be at least 1 (the newest checkpoint), got {tc.keep_checkpoints}")
        if tc.precision not in ("", "fp32", "bf16"):
            raise UserError(f"{section}.train.precision must be fp32, bf16 or '' (run.precision), got {tc.precision!r}")
    if cfg.vfm.cache_features not in ("auto", "always", "never"):
        raise UserError(f"vfm.cache_features must be auto, always or never, got {cfg.vfm.cache_features!r}")
    if cfg.run.precision not in ("fp32", "bf16"):
        raise UserError(f"run.precision must be 'fp32' or 'bf16', got {cfg.run.precision!r}")
    if cfg.data.resolution % tok_downsample(host, cfg) != 0:
        raise UserError(
            f"data.resolution={cfg.data.resolution} is not a multiple of the tokenizer's downsampling "
            f"factor {tok_downsample(host, cfg)}"
        )
    preflight.check_config(host, cfg)  # sizes, component arguments, user files, output folders, free space


def tok_downsample(host: Host, cfg: RunConfig) -> int:
    from .build import component_args

    tok = host.tokenizers.get(cfg.tokenizer.name)
    args = component_args(cfg, tok.name, cfg.tokenizer.args)
    return int(args.get("downsample", tok.downsample))



def resolve_stages(host: Host, cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``run.stages`` checked against the registered stages and expanded (empty = every
    registered stage) into plan order."""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, stages=requested_stages(host, list(cfg.run.stages))))


@dataclass
class Run:
    """One combination's run directory, its context and its plan. Attributes of the context
    (``tokenizer()``, ``dataset()``, ``evaluator()``, ...) are reachable on the run too."""

    host: Host
    cfg: RunConfig
    run_dir: Path
    ctx: RunContext
    plan: Plan

    @classmethod
    def prepare(cls, host: Host, cfg: RunConfig) -> "Run":
        validate(host, cfg)
        cfg = resolve_stages(host, cfg)
        run_dir = Path(cfg.run.out) / run_name(host, cfg)
        ctx = RunContext(host=host, cfg=cfg, run_dir=run_dir, device=resolve_device(cfg.run.device))
        plan = make_plan(host, cfg.run.stages, run_dir, cfg)
        check_plan(plan)
        run = cls(host=host, cfg=cfg, run_dir=run_dir, ctx=ctx, plan=plan)
        run._preflight()
        return run

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "ctx":
            raise AttributeError(name)
        return getattr(self.ctx, name)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def _preflight(self) -> None:
        """Everything that can fail on bad input, before the run directory exists."""
        stages = {s.stage for s in self.plan.steps if s.action == "run"}
        transforms.check_dataset(self.cfg.data, self.ctx.dataset("val"))
        if stages & {"tokenizer", "diffusion", "latents", "probe"}:
            self.ctx.dataset("train")
        if self.cfg.tokenizer.weights and not Path(self.cfg.tokenizer.weights).exists():
            raise UserError(f"tokenizer.weights={self.cfg.tokenizer.weights!r} does not exist; pass a model.safetensors written by a previous run")
        if self.host.tokenizers.get(self.cfg.tokenizer.name).uses_vfm:
            self.ctx.vfm()  # resolves (and loads) the VFM weights, or fails with where it looked
        if any({"tokenizer"} & {*self.host.stages.get(s).needs, *self.host.stages.get(s).produces} for s in stages):
            self.ctx.tokenizer()  # the factory's errors (its arguments, the weights of its parts) before config.json
        if stages & {"recon-eval", "gen-eval", "latent-eval"}:
            self.ctx.evaluator().check_weights()
        with torch.device("meta"):  # the tokenizer's own argument checks, on the meta device (nothing read or written)
            build_tokenizer(BuildContext(host=self.host, config=self.cfg, meta=True, preflight=True))
        preflight.check_run(self)  # the tokenizer with tokenizer.weights, free space for the datasets' sizes

    def write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", {
            "config": self.cfg.to_dict(),
            "run_name": self.run_dir.name,
            "versions": {
                "vfmbench": __version__, "torch": torch.__version__, "python": platform.python_version(), "git": git_hash(),
                "plugins": self.host.versions(), "components": self.component_versions(),
            },
        })

    def component_versions(self) -> dict[str, Any]:
        h, c = self.host, self.cfg
        tok = h.tokenizers.get(c.tokenizer.name)
        diff, ds = h.diffusion.get(c.diffusion.name), h.datasets.get(c.data.dataset)
        out = {"tokenizer": [tok.name, tok.version], "diffusion": [diff.name, diff.version], "dataset": [ds.name, ds.version]}
        if tok.uses_vfm:
            v = h.vfms.get(c.vfm.name)
            out["vfm"] = [v.name, v.version]
        dec = decoder_name(h, c)
        if dec:
            out["decoder"] = [dec, h.decoders.get(dec).version]
        return out

    def execute(self) -> Path:
        """Run the plan holding the run directory's lock (``vfmbench.lock``)."""
        from .lock import lock_run_dir

        with lock_run_dir(self.run_dir, log):
            return self._execute()

    def _execute(self) -> Path:
        """Run the plan. Under torchrun the ranks first check that they share one config and follow
        rank 0's plan; only rank 0 writes files. Every rank reads the run directory (checkpoints,
        models, samples), so on several nodes it must be on a shared filesystem."""
        import time

        from . import dist

        dist.check_same_config(config_hash(self.cfg.to_dict(), 64))
        notes = self._global_batches()
        if dist.is_main():
            self.write_config()
        dist.barrier()
        t_all = time.time()
        execute(self.ctx, self.plan, notes)
        log(f"run finished in {time.time() - t_all:.1f} s: {self.run_dir}")
        return self.run_dir

    def _global_batches(self) -> dict[str, str]:
        """Check, before any work, that each training stage's global batch splits over the ranks
        (UserError otherwise); the split of each, for the log."""
        from . import dist

        out = {}
        for stage, tc in (("tokenizer", self.cfg.tokenizer.train), ("diffusion", self.cfg.diffusion.train)):
            if stage not in self.cfg.run.stages or tc.images <= 0 or (self.cfg.tokenizer.weights if stage == "tokenizer" else self.cfg.diffusion.weights):
                continue
            per = dist.per_device_batch(tc.batch_size, tc.grad_accum, f"{stage}.train")
            out[stage] = f"global batch {tc.batch_size} = {per} per device x {dist.world()} ranks x {tc.grad_accum} accumulation steps"
        return out
