"""The planner: stages as plugins ordered by the artifacts they need and produce, skipped when done,
blocked (before any work, exit 2, nothing written) when a need cannot be met; a third-party stage
reached through the hook runs with the run context and its rows reach results.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vfmbench.config import STAGES, parse_set, resolve
from vfmbench.errors import UserError
from vfmbench.hookspecs import hookimpl
from vfmbench.planner import check_plan, format_plan, make_plan, requested_stages, stage_order
from vfmbench.plugins import get_plugin_manager
from vfmbench.specs import StageSpec


def _spec(name, needs=(), produces=(), **kw):
    return StageSpec(name=name, description=name, needs=tuple(needs), produces=tuple(produces), run=lambda ctx: {}, **kw)


class _Stages:
    def __init__(self, *specs):
        self.specs = specs

    @hookimpl
    def register_stages(self, register):
        for s in self.specs:
            register(s)


def _host(*specs):
    return get_plugin_manager(extra_plugins=[("toy-stages", _Stages(*specs))])


def test_builtin_stages_are_plugins_in_pipeline_order(host):
    assert stage_order(host) == list(STAGES)
    for name in STAGES:
        assert host.stages.owner(name) == "stage-" + name and host.plugins["stage-" + name].builtin
    assert requested_stages(host, []) == list(STAGES)
    assert requested_stages(host, ["results", "tokenizer"]) == ["tokenizer", "results"]
    with pytest.raises(UserError, match="did you mean 'tokenizer'"):
        requested_stages(host, ["tokeniser"])


def test_third_party_stage_is_ordered_by_its_needs():
    host = _host(_spec("toy-eval", needs=["latents"], produces=["rows"], order=1))  # order 1 alone would put it first
    order = stage_order(host)
    assert order.index("latents") < order.index("toy-eval") < order.index("results")


def test_cycle_is_reported():
    host = _host(_spec("a-stage", needs=["b"], produces=["a"]), _spec("b-stage", needs=["a"], produces=["b"]))
    with pytest.raises(ValueError, match="cycle"):
        stage_order(host)


def _done(run_dir: Path, *stages: str) -> None:
    for s in stages:
        (run_dir / s).mkdir(parents=True, exist_ok=True)
        (run_dir / s / "done.json").write_text("{}")


def test_plan_skips_done_stages_and_blocks_unmet_needs(host, tmp_path):
    plan = make_plan(host, ["probe", "results"], tmp_path)
    assert [(s.stage, s.action) for s in plan.steps] == [("probe", "blocked"), ("results", "run")]
    assert "needs 'latents', made by stage 'latents'" in plan.steps[0].why and "--stages" in plan.steps[0].why
    with pytest.raises(UserError, match="stage 'probe' needs 'latents'"):
        check_plan(plan)
    # a blocked producer blocks its consumers, naming it
    plan = make_plan(host, ["latents", "diffusion"], tmp_path)
    assert [s.action for s in plan.steps] == ["blocked", "blocked"] and "stage 'latents' is blocked" in plan.steps[1].why
    # done stages are skipped and provide their artifacts; 'results' (rerun) runs again
    _done(tmp_path, "tokenizer", "latents", "results")
    plan = make_plan(host, list(STAGES), tmp_path)
    assert {s.stage: s.action for s in plan.steps} == {
        "tokenizer": "skip", "recon-eval": "run", "latents": "skip", "latent-eval": "run", "probe": "run", "diffusion": "run", "sample": "run",
        "gen-eval": "run", "results": "run"}
    assert "skip     tokenizer      done (tokenizer/done.json)" in format_plan(plan)
    check_plan(plan)


def test_config_provided_tokenizer_unblocks_evaluation(host, tmp_path):
    from vfmbench.config import RunConfig

    trained = resolve([parse_set("tokenizer.train.images=64")])
    assert make_plan(host, ["recon-eval", "results"], tmp_path, trained).steps[0].action == "blocked"
    for cfg in (resolve([parse_set("tokenizer.train.images=64"), parse_set("tokenizer.weights=/w/model.pt")]), RunConfig()):
        plan = make_plan(host, ["recon-eval", "latents", "probe", "results"], tmp_path, cfg)  # loaded or untrained: defined by the config
        assert [s.action for s in plan.steps] == ["run"] * 4


def test_need_without_producer_names_the_missing_plugin(tmp_path):
    host = _host(_spec("text-eval", needs=["ocr-model"], produces=["rows"]))
    plan = make_plan(host, ["text-eval"], tmp_path)
    assert plan.steps[0].action == "blocked" and "which no registered stage produces" in plan.steps[0].why


def test_resolve_accepts_registered_stage_names():
    host = _host(_spec("toy-eval", needs=["latents"], produces=["rows"]))
    with pytest.raises(UserError, match="unknown stage 'toy-eval'"):
        resolve([parse_set("run.stages=[toy-eval]")])  # the built-ins only
    assert resolve([parse_set("run.stages=[toy-eval]")], host.stages.names()).run.stages == ["toy-eval"]


def test_blocked_stage_exits_2_before_any_work(tmp_path):
    from vfmbench.cli import main

    out = tmp_path / "runs"
    assert main(["run", "--preset", "smoke", "--out", str(out), "--stages", "probe,results"]) == 2
    assert not out.exists()
    assert main(["run", "--preset", "smoke", "--out", str(out), "--stages", "probe", "--dry-run"]) == 2
    assert not out.exists()


# -- a third-party stage through the hook, in a real (tiny) run -------------------------------------


def _latent_norm(ctx) -> dict:
    """A stage of its own: the mean latent norm of the val split, as a representation row."""
    import torch

    from vfmbench.checkpoint import load_torch

    z = load_torch(ctx.stage_dir("latents") / "val.pt")["latents"]
    value = float(z.flatten(1).norm(dim=1).mean())
    ctx.write_rows([{"metric": "latent-norm", "metric_version": "1", "family": "representation", "value": value,
                     "higher_is_better": False, "protocol": {"num_images": int(z.shape[0])}}])
    assert ctx.folder == ctx.run_dir / "latent-norm" and isinstance(ctx.tokenizer(), torch.nn.Module)
    return {"value": value, "ranks": ctx.dist.world()}


def test_third_party_stage_runs_and_its_rows_reach_results(tmp_path, one_thread):
    from vfmbench.runner import Run

    host = _host(StageSpec(name="latent-norm", description="mean latent norm", needs=("latents",), produces=("rows",), run=_latent_norm))
    layers = [host.presets.get("smoke").values]
    for s in ("tokenizer.name=kl-vae", "tokenizer.train.images=0", "data.resolution=16", "data.train_images=8", "data.val_images=4",
              f"run.out={tmp_path}", "run.device=cpu", "metrics.batch_size=4", "run.stages=[tokenizer, latents, latent-norm, results]"):
        layers.append(parse_set(s))
    run = Run.prepare(host, resolve(layers, host.stages.names()))
    assert [s.action for s in run.plan.steps] == ["run"] * 4
    run.execute()
    rows = [json.loads(line) for line in (run.run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["metric"] for r in rows] == ["latent-norm"] and rows[0]["run_id"] == run.run_dir.name and rows[0]["tokenizer"] == "kl-vae"
    done = json.loads((run.run_dir / "latent-norm" / "done.json").read_text())
    assert done["value"] == rows[0]["value"] > 0 and done["ranks"] == 1
    # the same command again: everything done is skipped, results collects again
    again = Run.prepare(host, resolve(layers, host.stages.names()))
    assert [s.action for s in again.plan.steps] == ["skip", "skip", "skip", "run"]
