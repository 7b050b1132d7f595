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
from .planner import Plan, check_plan, execute, make_plan
from .plugins import Host
from .resolution import NON_RESULT_KEYS, ResolvedRun, resolve_run, resolve_stages, run_name, tok_downsample, validate  # noqa: F401 - the runner's names


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
    def prepare(cls, host: Host, cfg: RunConfig | ResolvedRun) -> "Run":
        """From a ``ResolvedRun`` (or a config, resolved here): plan, preflight; nothing written."""
        resolved = cfg if isinstance(cfg, ResolvedRun) else resolve_run(host, cfg)
        cfg, run_dir = resolved.cfg, resolved.run_dir
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
