"""Stage ``latent-eval``: latent diffusability metrics (family ``latent``: VIV, LNC, SEC, LDS/CDS,
SRSS, TwoNN, uniformity, equivariance error, iFID) of the val posterior means, without a diffusion
model. The computation is ``vfmbench.latent_eval.run_stage`` (docs/latent-metrics.md)."""
from __future__ import annotations

from ..hookspecs import hookimpl
from ..latent_eval import run_stage
from ..specs import StageSpec

SPEC = StageSpec(
    name="latent-eval", description="latent diffusability metrics of the val posterior means (no diffusion model)",
    needs=("latents",), produces=("rows",), parallel=True, order=35, run=run_stage,
)


@hookimpl
def register_stages(register):
    register(SPEC)
