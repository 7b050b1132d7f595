"""The planner: which registered stages a run executes, in which order, and which it skips.

Stages (``vfmbench.specs.StageSpec``) declare the artifacts they need and produce. The requested
stages (``run.stages``; empty = every registered stage) are put in an order where every stage comes
after the stages producing what it needs or uses (ties: ``order``, then name). Walking that order,
a stage is

- ``skip``     when its done marker is in the run directory (except ``rerun`` stages);
- ``blocked``  when an artifact it needs is neither made by a stage planned before it nor by a stage
               already done in the run directory (the reason names the missing artifact and the fix);
- ``run``      otherwise.

A plan with a blocked stage stops the run before any work (``UserError``, exit 2). Under torchrun
rank 0's plan is broadcast, so every rank follows the same one.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import write_json
from .errors import UserError, did_you_mean
from .plugins import Host
from .specs import StageSpec


@dataclass(frozen=True)
class Step:
    stage: str
    action: str  # run | skip | blocked
    why: str = ""


@dataclass(frozen=True)
class Plan:
    run_dir: str
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def blocked(self) -> list[Step]:
        return [s for s in self.steps if s.action == "blocked"]

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "steps": [dataclasses.asdict(s) for s in self.steps]}


def stage_order(host: Host, names: list[str] | None = None) -> list[str]:
    """Registered stages (or ``names``) ordered so that each comes after every producer of what it
    needs or uses; ties broken by ``order`` then name. A cycle is a plugin bug (``ValueError``)."""
    specs: dict[str, StageSpec] = {s.name: s for s in host.stages if names is None or s.name in names}
    producers: dict[str, set[str]] = {}
    for s in specs.values():
        for a in s.produces:
            producers.setdefault(a, set()).add(s.name)
    after = {n: {p for a in (*s.needs, *s.uses) for p in producers.get(a, ()) if p != n} for n, s in specs.items()}
    out: list[str] = []
    while len(out) < len(specs):
        ready = [n for n in specs if n not in out and after[n] <= set(out)]
        if not ready:
            rest = sorted(set(specs) - set(out))
            raise ValueError(f"stages {rest} need each other's artifacts (a cycle): check their needs/produces")
        out.append(min(ready, key=lambda n: (specs[n].order, n)))
    return out


def requested_stages(host: Host, stages: list[str]) -> list[str]:
    """``run.stages`` checked against the registered stages (empty = all), in plan order."""
    for s in stages:
        if s not in host.stages:
            raise UserError(f"unknown stage {s!r} in run.stages / --stages: {did_you_mean(s, host.stages.names())} "
                            "(see `vfmbench list stages`)")
    return stage_order(host, [host.stages.canonical(s) for s in stages] if stages else None)


def make_plan(host: Host, stages: list[str], run_dir: Path, cfg: Any = None) -> Plan:
    """The plan of ``stages`` (already requested/ordered) against what ``run_dir`` holds; with
    ``cfg``, artifacts the config provides (``StageSpec.provided``) count as available."""
    reg = host.stages
    done = {s.name for s in reg if (run_dir / s.name / s.done_marker).exists()}
    available = {a for s in reg if s.name in done for a in s.produces}
    if cfg is not None:
        available |= {a for s in reg if s.name not in stages and s.provided is not None and s.provided(cfg) for a in s.produces}
    steps = []
    for name in stages:
        spec = reg.get(name)
        if name in done and not spec.rerun:
            steps.append(Step(name, "skip", f"done ({name}/{spec.done_marker})"))
            available |= set(spec.produces)
            continue
        missing = [a for a in spec.needs if a not in available]
        if missing:
            steps.append(Step(name, "blocked", "; ".join(_missing_reason(reg, a, stages, steps) for a in missing)))
            continue
        steps.append(Step(name, "run", "rerun (collects)" if name in done else ""))
        available |= set(spec.produces)
    return Plan(run_dir=str(run_dir), steps=tuple(steps))


def _missing_reason(reg, artifact: str, stages: list[str], steps: list[Step]) -> str:
    producers = sorted(s.name for s in reg if artifact in s.produces)
    if not producers:
        return f"needs {artifact!r}, which no registered stage produces (is the plugin that provides it installed and enabled?)"
    blocked = [s.stage for s in steps if s.stage in producers and s.action == "blocked"]
    if blocked:
        return f"needs {artifact!r}, whose stage {blocked[0]!r} is blocked"
    names = " or ".join(repr(p) for p in producers)
    return f"needs {artifact!r}, made by stage {names}, which is neither done in the run directory nor requested: add it to --stages"


def check_plan(plan: Plan) -> None:
    """``UserError`` naming every blocked stage and why (before any work, nothing written)."""
    if plan.blocked:
        why = "; ".join(f"stage {s.stage!r} {s.why}" for s in plan.blocked)
        raise UserError(f"the run cannot start: {why}")


def format_plan(plan: Plan) -> str:
    lines = [f"plan ({plan.run_dir}):"]
    for s in plan.steps:
        lines.append(f"  {s.action:<8} {s.stage:<14} {s.why}".rstrip())
    return "\n".join(lines)


def mark_done(ctx, spec: StageSpec, info: dict[str, Any]) -> None:
    """A stage's done marker: ``info`` plus the date and this process's peak memory (``vfmbench.perf.peak_memory``)."""
    from .perf import peak_memory

    write_json(ctx.stage_dir(spec.name) / spec.done_marker,
               {"stage": spec.name, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **peak_memory(ctx.device), **info})


def execute(ctx, plan: Plan, notes: dict[str, str] | None = None) -> None:
    """Run a plan's stages. Parallel stages run on every rank (training data-parallel, the others
    sharded and gathered on rank 0); the rest on rank 0 while the others wait; only rank 0 writes
    done markers. Every rank follows rank 0's plan."""
    from .perf import begin_stage

    dist, log = ctx.dist, ctx.log
    plan = dist.broadcast_object(plan)  # rank 0 decides for all ranks
    for step in plan.steps:
        if step.action == "skip":
            log(f"{step.stage}: done, skipped")
            continue
        spec = ctx.host.stages.get(step.stage)
        note = (notes or {}).get(step.stage)
        log(f"{step.stage}: running" + (f" ({note})" if note else ""))
        begin_stage(ctx.cfg.run, ctx.device)  # process-wide numerics (run.tf32) and a fresh peak-memory window
        t0 = time.time()
        if spec.parallel or dist.is_main():
            ctx.stage = spec.name
            info = spec.run(ctx) or {}
            if dist.is_main():
                if ctx.cfg.data.skip_corrupt:
                    info["data_skipped_images"] = ctx.skipped_images()  # per split, e.g. {"train": 1}
                mark_done(ctx, spec, {"seconds": round(time.time() - t0, 2), "world_size": dist.world(), **info})
        dist.barrier()  # rank-0 stages: the other ranks wait for rank 0 here
        log(f"{step.stage}: finished in {time.time() - t0:.1f} s")
