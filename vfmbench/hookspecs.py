"""Every hook of the ``vfmbench`` pluggy project. Registration hooks receive a ``register``
callable and return nothing; the host validates each registered spec."""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("vfmbench")
hookimpl = pluggy.HookimplMarker("vfmbench")


@hookspec
def register_tokenizers(register):
    """Register tokenizers: call ``register(TokenizerSpec(...))`` once per tokenizer."""


@hookspec
def register_vfms(register):
    """Register frozen vision foundation models: call ``register(VfmSpec(...))`` once per variant."""


@hookspec
def register_decoders(register):
    """Register decoders: call ``register(DecoderSpec(...))`` once per decoder."""


@hookspec
def register_diffusion_models(register):
    """Register latent diffusion models: call ``register(DiffusionSpec(...))`` once per model."""


@hookspec
def register_datasets(register):
    """Register datasets: call ``register(DatasetSpec(...))`` once per dataset."""


@hookspec
def register_extractors(register):
    """Register feature extractors: call ``register(ExtractorSpec(...))`` once per extractor."""


@hookspec
def register_metrics(register):
    """Register metrics: call ``register(MetricSpec(...))`` once per metric."""


@hookspec
def register_presets(register):
    """Register run presets: call ``register(PresetSpec(...))`` once per preset."""


@hookspec
def register_stages(register):
    """Register run stages: call ``register(StageSpec(...))`` once per stage (see ``vfmbench.specs.StageSpec``)."""


@hookspec
def results_written(run_dir, rows):
    """Called after a run wrote ``results.jsonl``: ``run_dir`` is a ``pathlib.Path``, ``rows`` a list of dicts."""
