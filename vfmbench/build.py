"""Building components from a resolved config: the context handed to tokenizer factories."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import perf
from .config import RunConfig, validate_args
from .errors import UserError
from .interfaces import DiffusionModel, Tokenizer, Vfm
from .plugins import Host


def default_cache_dir(cfg: RunConfig) -> Path:
    """``run.cache_dir``, else ``$VFMBENCH_CACHE_DIR``, else ``~/.cache/vfmbench``."""
    import os

    return Path(cfg.run.cache_dir or os.environ.get("VFMBENCH_CACHE_DIR") or "~/.cache/vfmbench").expanduser()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per torchrun rank
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"run.device={name!r} but no CUDA device is available; use --set run.device=cpu")
    return dev


@dataclass
class BuildContext:
    """What a tokenizer factory may ask for: the frozen VFM and the decoder chosen by the config."""

    host: Host
    config: RunConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    meta: bool = False  # build architectures without weights (dry runs)
    preflight: bool = False  # a run's check before anything is written: factories also locate (never read) the weights they will need
    _vfm: Vfm | None = None

    @property
    def cache_dir(self) -> Path:
        return default_cache_dir(self.config)

    def vfm(self) -> Vfm:
        """The VFM named by ``vfm.name`` (built once per context)."""
        if self._vfm is None:
            from .vfm import build_vfm

            spec = self.host.vfms.get(self.config.vfm.name)
            if not self.config.vfm.pretrained and not self.config.run.smoke and not self.meta:
                raise UserError(
                    "vfm.pretrained=false (a random-init VFM) is only allowed in smoke runs: use --preset smoke "
                    "or --set run.smoke=true, or point at real weights with --set vfm.weights=PATH"
                )
            self._vfm = build_vfm(spec, self.config.vfm, cache_dir=self.cache_dir, meta=self.meta)
            if not self.meta:
                self._vfm = self._vfm.to(self.device)
        return self._vfm

    def decoder(self, latent_channels: int, downsample: int, default: str) -> nn.Module:
        """The decoder named by ``decoder.name`` (or the tokenizer's ``default``), built for this latent."""
        name = self.config.decoder.name or default
        spec = self.host.decoders.get(name)
        args = validate_args(spec.config, component_args(self.config, spec.name, self.config.decoder.args), "decoder.args")
        return spec.factory(args, latent_channels, downsample)


def component_args(cfg: RunConfig, canonical_name: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """A component's arguments: the config's ``component_args[name]`` under the section's ``args``."""
    from .config import deep_merge

    base = cfg.component_args.get(canonical_name, {})
    return deep_merge(base, explicit)


def decoder_name(host: Host, cfg: RunConfig) -> str:
    spec = host.tokenizers.get(cfg.tokenizer.name)
    if not spec.uses_decoder:
        return ""
    return host.decoders.canonical(cfg.decoder.name or spec.default_decoder)


# Tokenizer methods run under the run's precision (``run.precision``): encoding (latent caching,
# reconstruction) and decoding (reconstructions, samples). Training forwards get theirs in train_loop.
TOKENIZER_AUTOCAST_METHODS = ("encode", "encode_from_vfm", "decode")


def tokenizer_is_trained(cfg: RunConfig) -> bool:
    return cfg.tokenizer.train.images > 0 and not cfg.tokenizer.weights


def build_tokenizer(ctx: BuildContext) -> Tokenizer:
    """The configured tokenizer with the run's switches applied (``vfmbench.perf``): channels-last
    where it supports it, gradient checkpointing when it is trained, bf16 encode/decode."""
    cfg = ctx.config
    spec = ctx.host.tokenizers.get(cfg.tokenizer.name)
    if not spec.uses_decoder and cfg.decoder.name:
        raise UserError(f"tokenizer {spec.name!r} has a fixed decoder; remove --decoder / decoder.name")
    args = validate_args(spec.config, component_args(cfg, spec.name, cfg.tokenizer.args), "tokenizer.args")
    tok = spec.factory(args, ctx)
    tok.spec = spec
    run = cfg.run
    if run.channels_last:
        perf.set_channels_last(tok, True)
    if run.grad_checkpointing and tokenizer_is_trained(cfg):
        perf.set_grad_checkpointing(tok, True, f"tokenizer {spec.name!r} (with decoder {decoder_name(ctx.host, cfg) or 'built in'!r})")
    perf.autocast_methods(tok, TOKENIZER_AUTOCAST_METHODS, run.precision)
    return tok


def build_diffusion(host: Host, cfg: RunConfig, latent_shape: tuple[int, int, int], num_classes: int) -> DiffusionModel:
    """The configured diffusion model; gradient checkpointing applied when ``run.grad_checkpointing``
    is set and the model is trained (``diffusion.train.images > 0``)."""
    spec = host.diffusion.get(cfg.diffusion.name)
    args = validate_args(spec.config, component_args(cfg, spec.name, cfg.diffusion.args), "diffusion.args")
    model = spec.factory(args, latent_shape, num_classes)
    model.spec = spec
    if cfg.run.channels_last:
        perf.set_channels_last(model, True)
    if cfg.run.grad_checkpointing and cfg.diffusion.train.images > 0:
        perf.set_grad_checkpointing(model, True, f"diffusion model {spec.name!r}")
    return model


def param_counts(module: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
