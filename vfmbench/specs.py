"""Frozen spec records: every registered component is described by data, never by its name.

A spec carries the common metadata (description, version, source, paper, licence) and per-kind
fields. ``factory`` builds the component; ``config`` is the dataclass of the component's own
arguments (``tokenizer.args`` in a run config), validated like every other config section.
Bump ``version`` whenever a component's outputs change: it is written into every result row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*(\.[a-z0-9]+(-[a-z0-9]+)*)?$")


@dataclass(frozen=True)
class Spec:
    """Metadata common to every kind of component."""

    name: str
    description: str
    factory: Callable[..., Any]
    version: str = "1"
    source: str = ""
    paper: str = ""
    license: str = ""
    aliases: tuple[str, ...] = ()
    config: type | None = None  # dataclass of the component's own arguments

    kind = "component"


@dataclass(frozen=True)
class VfmSpec(Spec):
    """A frozen vision foundation model. ``factory(spec, vfm_config, cache_dir) -> Vfm`` (``build_vfm``
    calls it; the built-in ``vfmbench.vfm.frozen_vfm`` builds through ``adapter``; docs/vfms.md).

    Preprocessing is data: images are resized by ``input_scale`` (the paper feeds 256 px to
    SigLIP2-L/16 upsampled x2 to 512) with ``interpolation`` and normalised by ``mean``/``std``.
    ``tiny`` holds architecture overrides for the CPU smoke size of the same library model.
    """

    family: str = ""
    library: str = ""  # timm | transformers | open_clip | torchvision | ...: named in missing-weights messages
    model_id: str = ""  # hub id / architecture name in that library
    patch_size: int = 16
    resolution: int = 224  # native input resolution (px); build_vfm's one-width check feeds one image of this size
    input_scale: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    width: int = 0
    depth: int = 0
    num_prefix_tokens: int = 1
    default_layers: tuple[int, ...] = (-1,)
    published_params: int = 0
    tiny: Mapping[str, Any] = field(default_factory=dict)
    arch: Mapping[str, Any] = field(default_factory=dict)  # library config kwargs of the full-size model; ``tiny`` overrides them
    weights_tag: str = ""  # the library's pretrained tag where it is not part of model_id (open_clip: 'openai')
    adapter: Any = None  # a vfmbench.vfm.Adapter: builds, loads and taps the library model

    kind = "vfm"


@dataclass(frozen=True)
class TokenizerSpec(Spec):
    """A tokenizer. ``factory(args, ctx) -> Tokenizer`` (see ``vfmbench.interfaces``).

    ``downsample`` and ``latent_channels`` give the latent shape; ``normalisation`` names how the
    tokenizer maps its latents to the diffusion model's input (it owns the statistics).
    """

    latent_channels: int = 4
    downsample: int = 8
    uses_vfm: bool = False
    uses_decoder: bool = True
    default_decoder: str = ""
    normalisation: str = "per-channel"
    # Released weights (the zoo, docs/zoo.md): a non-empty ``release`` marks a tokenizer evaluated as
    # released: it is loaded from ``tokenizer.weights`` (or ``zoo.root``/NAME) and never trained.
    release: str = ""  # release id (hub repo / file) of the weights
    fetch: str = ""  # the command that fetches the release into a local folder
    encoder_params_m: float = 0.0  # published encoder / decoder parameter counts, in millions
    decoder_params_m: float = 0.0
    native_resolution: int = 0  # the resolution the release was trained at (0 = not stated)
    input_range: str = "[-1, 1]"  # pixel range the release's encoder takes and its decoder returns
    shipped_normalisation: str = ""  # the release's own latent normalisation, in words (e.g. 'scale 0.18215')
    deterministic: bool = False  # the encoder gives a point latent (no posterior variance)

    kind = "tokenizer"

    def latent_shape(self, resolution: int, channels: int | None = None) -> tuple[int, int, int]:
        g = resolution // self.downsample
        return (channels or self.latent_channels, g, g)


@dataclass(frozen=True)
class DecoderSpec(Spec):
    """A decoder from a latent feature map to pixels. ``factory(args, latent_channels, downsample) -> nn.Module``
    whose forward maps [B, C, h, w] float to [B, 3, h*downsample, w*downsample] float in about [-1, 1]."""

    kind = "decoder"


@dataclass(frozen=True)
class DiffusionSpec(Spec):
    """A latent diffusion model. ``factory(args, latent_shape, num_classes) -> DiffusionModel``."""

    kind = "diffusion"


@dataclass(frozen=True)
class DatasetSpec(Spec):
    """A labelled image dataset. ``factory(data_config, split) -> torch Dataset`` of (uint8 CHW, int)."""

    num_classes: int = 0
    splits: tuple[str, ...] = ("train", "val")
    needs_root: bool = False

    kind = "dataset"


@dataclass(frozen=True)
class ExtractorSpec(Spec):
    """A feature extractor. ``factory(cfg, features, device, cache_dir) -> extractor`` builds it for the
    ``features`` (a subset of ``features`` here) the selected metrics read.

    ``inputs``: ``images`` (a candidate or reference set: ``extractor(images)`` of uint8 NCHW ->
    ``{feature: float array [N, ...]}``) or ``pairs`` (``extractor(images, recon)`` -> ``{feature:
    per-image scores [N]}``). ``features`` names every output it can give; a metric names one of
    them (``MetricSpec.extractor``/``feature``), checked when plugins load.

    The built extractor carries ``weights_id`` (str, written into the protocol and cache keys),
    ``is_official`` (False labels every value that uses it ``smoke``), ``protocol`` (dict added to
    the rows' protocol) and optionally ``cache_name`` (the on-disk feature caches' key; default the
    spec name).
    """

    inputs: str = "images"
    features: tuple[str, ...] = ()

    kind = "extractor"


@dataclass(frozen=True)
class MetricSpec(Spec):
    """A metric as pure stages: features -> ``stats`` -> ``value``.

    ``family``: reconstruction | generation | representation | latent.
    ``inputs``: what the features are computed from --
      ``pairs``        per-image scores of (input, reconstruction) pairs; ``stats`` reduces them;
      ``distribution`` features of a candidate set compared with a reference set's statistics;
      ``single``       features of the candidate set alone (e.g. IS);
      ``latents``      tokenizer latents (the linear probe: train and val splits; family ``latent``: val posterior means);
      ``encoder``      per-image outputs of the tokenizer's encoder on transformed images (equivariance error).
    ``extractor``/``feature`` name the feature extractor and its output (``inception``/``pool``).
    ``stats(features) -> statistics`` and ``value(stats, reference_stats_or_None) -> float`` are
    pure: no model, device or global state. ``protocol_fields`` lists the protocol keys that make
    two values comparable; the leaderboard never ranks rows that differ in any of them.
    """

    family: str = ""
    higher_is_better: bool = False
    inputs: str = ""
    extractor: str = ""
    feature: str = ""
    stats: Callable[..., Any] | None = None
    value: Callable[..., Any] | None = None
    protocol_fields: tuple[str, ...] = ()
    # 'gaussian' when ``stats`` returns {'mu', 'sigma'}: precomputed reference statistics (an ADM
    # reference batch's mu/sigma) can then stand in for reference features.
    stats_kind: str = ""
    factory: Callable[..., Any] = lambda: None

    kind = "metric"


@dataclass(frozen=True)
class PresetSpec(Spec):
    """A named run configuration: a nested mapping composed under YAML files and ``--set`` overrides."""

    values: Mapping[str, Any] = field(default_factory=dict)
    factory: Callable[..., Any] = lambda: None

    kind = "preset"


@dataclass(frozen=True)
class StageSpec(Spec):
    """A stage of a run: ``run(ctx) -> info`` (``vfmbench.context.RunContext``; ``info`` is a JSON-able
    dict written into the stage's ``done.json``). The planner orders stages by artifacts:

    ``needs``     artifacts that must exist before the stage runs: produced by a stage planned
                  earlier in this invocation, or by a stage already done in the run directory;
                  otherwise the stage is *blocked* and the run stops before any work (exit 2).
    ``produces``  artifacts the stage makes (``tokenizer``, ``latents``, ``diffusion``, ``samples``,
                  ``rows``: a ``rows.jsonl`` in the stage folder). Several stages may produce ``rows``.
    ``uses``      artifacts read when present: ordering only (after every planned producer), never blocking.
    ``parallel``  True: every rank runs it under torchrun (data-parallel or sharded, gathered on
                  rank 0); False: rank 0 runs it while the other ranks wait.
    ``rerun``     True: runs again even when done (e.g. ``results``, which only collects).
    ``order``     tie-break among stages ready at the same time (lower first; built-ins 10..80, results 1000).
    ``done_marker`` the file in the stage folder that marks it finished (written by the runner).
    ``provided``  ``provided(cfg) -> reason``: non-empty when the config itself supplies this stage's
                  artifacts (``tokenizer.weights``, an untrained tokenizer), so that stages needing
                  them are not blocked when this one is neither requested nor done.
    ``factory`` is unused (stages are functions); ``run`` is the stage.
    """

    needs: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    parallel: bool = False
    rerun: bool = False
    order: int = 100
    done_marker: str = "done.json"
    provided: Callable[[Any], str] | None = None
    run: Callable[[Any], dict[str, Any]] | None = None
    factory: Callable[..., Any] = lambda: None

    kind = "stage"


KINDS: dict[str, type[Spec]] = {
    "tokenizers": TokenizerSpec,
    "vfms": VfmSpec,
    "decoders": DecoderSpec,
    "diffusion": DiffusionSpec,
    "datasets": DatasetSpec,
    "extractors": ExtractorSpec,
    "metrics": MetricSpec,
    "presets": PresetSpec,
    "stages": StageSpec,
}
