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
    """A frozen vision foundation model. ``factory(spec, vfm_config) -> Vfm``.

    Preprocessing is data: images are resized by ``input_scale`` (the paper feeds 256 px to
    SigLIP2-L/16 upsampled x2 to 512) with ``interpolation`` and normalised by ``mean``/``std``.
    ``tiny`` holds architecture overrides for the CPU smoke size of the same library model.
    """

    family: str = ""
    library: str = ""  # timm | transformers | open_clip
    model_id: str = ""  # hub id / architecture name in that library
    patch_size: int = 16
    resolution: int = 224  # native input resolution
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


KINDS: dict[str, type[Spec]] = {
    "tokenizers": TokenizerSpec,
    "vfms": VfmSpec,
    "decoders": DecoderSpec,
    "diffusion": DiffusionSpec,
    "datasets": DatasetSpec,
    "metrics": MetricSpec,
    "presets": PresetSpec,
}
