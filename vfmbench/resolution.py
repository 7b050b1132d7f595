"""One resolution step: preset + YAML + flags + ``--set`` -> a validated, immutable ``ResolvedRun``.

Every check of a run's input lives here (``validate``): names of components and stages, each
component's arguments against its spec's config dataclass, settings with a fixed set of values,
files that must exist. ``resolve_run`` builds the plan once — the typed config (frozen
dataclasses), the requested stages in plan order, the components (spec, canonical name, version,
validated arguments) and the run directory's name — and the runner, the dry run and sweeps only
read it. Nothing is written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from . import preflight, transforms
from .build import component_args, decoder_name
from .config import RunConfig, config_hash, resolve, validate_args
from .errors import UserError
from .planner import requested_stages
from .plugins import Host
from .zoo import is_release, release_path


@dataclass(frozen=True)
class Component:
    kind: str  # tokenizer | vfm | decoder | diffusion | dataset
    name: str  # canonical
    version: str
    args: Any = None  # the validated arguments dataclass (None for components without one)


@dataclass(frozen=True)
class ResolvedRun:
    """The read-only plan of one run: ``cfg`` (frozen), ``stages`` (plan order), ``components``,
    ``run_name`` and ``run_dir``; ``result_config`` is what the run directory's hash covers."""

    cfg: RunConfig
    stages: tuple[str, ...]
    components: Mapping[str, Component]
    run_name: str

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.out) / self.run_name


def resolve_run(host: Host, cfg_or_layers: RunConfig | list[Mapping[str, Any]]) -> ResolvedRun:
    """Config layers (or a typed config) -> the validated ``ResolvedRun`` (UserError on bad input)."""
    cfg = cfg_or_layers if isinstance(cfg_or_layers, RunConfig) else resolve(cfg_or_layers, host.stages.names())
    validate(host, cfg)
    cfg = resolve_stages(host, cfg)
    return ResolvedRun(cfg=cfg, stages=tuple(cfg.run.stages), components=MappingProxyType(components(host, cfg)), run_name=run_name(host, cfg))


def components(host: Host, cfg: RunConfig) -> dict[str, Component]:
    tok = host.tokenizers.get(cfg.tokenizer.name)
    out = {"tokenizer": Component("tokenizer", tok.name, tok.version, validate_args(tok.config, component_args(cfg, tok.name, cfg.tokenizer.args), "tokenizer.args"))}
    if tok.uses_vfm:
        v = host.vfms.get(cfg.vfm.name)
        out["vfm"] = Component("vfm", v.name, v.version)
    dec = decoder_name(host, cfg)
    if dec:
        d = host.decoders.get(dec)
        out["decoder"] = Component("decoder", d.name, d.version, validate_args(d.config, component_args(cfg, d.name, cfg.decoder.args), "decoder.args"))
    diff = host.diffusion.get(cfg.diffusion.name)
    out["diffusion"] = Component("diffusion", diff.name, diff.version, validate_args(diff.config, component_args(cfg, diff.name, cfg.diffusion.args), "diffusion.args"))
    ds = host.datasets.get(cfg.data.dataset)
    out["dataset"] = Component("dataset", ds.name, ds.version)
    return out


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


