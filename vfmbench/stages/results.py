"""Stage ``results``: every stage's ``rows.jsonl`` (in plan order) into the run's ``results.jsonl``;
then the ``results_written`` hook. Runs again on every invocation (it only collects)."""
from __future__ import annotations

from typing import Any

from ..context import RunContext
from ..hookspecs import hookimpl
from ..results import read_rows, write_rows
from ..specs import StageSpec


def run(ctx: RunContext) -> dict[str, Any]:
    from ..planner import stage_order

    rows = []
    for stage in stage_order(ctx.host):
        p = ctx.stage_dir(stage) / "rows.jsonl"
        if stage != ctx.stage and p.exists():
            rows.extend(read_rows(p))
    write_rows(ctx.run_dir / "results.jsonl", rows)
    ctx.host.pm.hook.results_written(run_dir=ctx.run_dir, rows=rows)
    return {"rows": len(rows)}


SPEC = StageSpec(
    name="results", description="collect every stage's rows into results.jsonl",
    uses=("rows",), produces=("results",), rerun=True, order=1000, run=run,
)


@hookimpl
def register_stages(register):
    register(SPEC)
