"""Stage ``probe``: the representation metrics of the cached latents (linear probe top-1/top-5)."""
from __future__ import annotations

from typing import Any

from ..checkpoint import load_torch
from ..context import RunContext
from ..hookspecs import hookimpl
from ..specs import StageSpec


def run(ctx: RunContext) -> dict[str, Any]:
    tr, va = (load_torch(ctx.stage_dir("latents") / f"{split}.pt") for split in ("train", "val"))
    rows = ctx.evaluator().probe(tr["latents"], tr["labels"], va["latents"], va["labels"], ctx.num_classes)
    ctx.write_rows(rows)
    return {"metrics": {r["metric"]: r["value"] for r in rows}}


SPEC = StageSpec(
    name="probe", description="linear probe on the cached latents (representation metrics)",
    needs=("latents",), produces=("rows",), order=40, run=run,
)


@hookimpl
def register_stages(register):
    register(SPEC)
