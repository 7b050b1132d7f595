"""Shared machinery of the released-tokenizer zoo (not a plugin; the ``zoo_*`` plugin files use it).

A release is data (``Release``): its spec metadata, the diffusers class that loads it, the
release's own ``config.json`` (full size, used on the meta device for parameter counts and dry
runs), where its encoder and decoder parameters live, and its shipped latent normalisation. One
``ReleasedTokenizer`` subclass per loading family says how to get a latent and an image out of the
library model; nothing branches on names.

Loading is strict: ``config.json`` builds the model, every weights file of the folder is read and
``load_state_dict`` must match exactly (a wrong or missing key is a ``UserError`` naming it).

Evaluation protocol (docs/zoo.md): ``encode`` returns the posterior **mean** as a point posterior
(log-variance at the clamp floor, std 3e-7) unless ``tokenizer.args.posterior=sample``; the latent
normalisation is the release's own (``normalisation=shipped``) or the runner's per-channel
statistics (``per-channel``); the runner recomputes per-channel statistics the same way for all.
"""
from __future__ import annotations

import abc
import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vfmbench.errors import UserError, did_you_mean
from vfmbench.interfaces import DiagonalGaussian, Phase, Tokenizer, to_float
from vfmbench.specs import TokenizerSpec
from vfmbench.zoo import release_path, release_protocol
from vfmbench_plugins.tokenizers.sd_vae import load_into

POSTERIORS = ("mean", "sample")
NORMALISATIONS = ("shipped", "per-channel")
POINT_LOGVAR = -30.0  # DiagonalGaussian's clamp floor: std = exp(-15) ~ 3e-7
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class ReleasedArgs:
    posterior: str = "mean"  # mean (the zoo protocol) | sample (a posterior sample; another protocol)
    normalisation: str = "shipped"  # shipped: the release's own | per-channel: the runner's statistics of the train latents


@dataclass(frozen=True)
class Release:
    """One released tokenizer as data. ``meta`` holds the ``TokenizerSpec`` metadata fields."""

    name: str
    description: str
    library_class: str  # the diffusers class that loads it
    config: Mapping[str, Any]  # the release's config.json (architecture keys), full size
    meta: Mapping[str, Any]
    encoder_prefixes: tuple[str, ...] = ("encoder.", "quant_conv.")
    decoder_prefixes: tuple[str, ...] = ("decoder.", "post_quant_conv.")
    layout: str = "diffusers"  # diffusers (config.json + weights) | ldm (one original-layout checkpoint)
    scale: float = 0.0  # shipped scaling factor when the config does not carry it (0 = read the config)
    shift: float = 0.0
    ignore_keys: tuple[str, ...] = ()  # original-layout keys that are not the autoencoder (training-only heads)
    stats_file: str = ""  # original layout: per-channel latent statistics shipped beside the checkpoint
    tiny: Mapping[str, Any] = field(default_factory=dict)  # config overrides of a CPU-size copy (tests, smoke zoo folders)
    latent_keys: tuple[str, ...] = ("latent_channels",)  # config keys a loaded folder must share with the release (its latent)


def library_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def build_model(release: Release, config: Mapping[str, Any] | None = None, meta: bool = False) -> nn.Module:
    """The release's library model from ``config`` (default: the release's own), random init."""
    cls = library_class(release.library_class)
    cfg = dict(config if config is not None else release.config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        if meta:
            with torch.device("meta"):
                return cls.from_config(cfg)
        return cls.from_config(cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"config of {release.name!r} does not build a {release.library_class}: {e}") from None


def param_split(release: Release, model: nn.Module) -> tuple[int, int]:
    """(encoder, decoder) parameter counts by the release's prefixes."""
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith(release.encoder_prefixes))
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith(release.decoder_prefixes))
    return enc, dec


def _read_config(path: Path, release: Release) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{str(path)!r} is not a readable config.json of {release.name!r}: {e}") from None
    cls = cfg.get("_class_name")
    if cls and cls != release.library_class:
        raise UserError(f"{str(path)!r} is a {cls} config; {release.name!r} is loaded by {release.library_class} "
                        f"(is this the right release? expected {release.meta.get('release', '')!r})")
    for key in release.latent_keys:
        if key in cfg and cfg[key] != release.config[key]:
            raise UserError(f"{str(path)!r} has {key}={cfg[key]!r}; {release.name!r} ({release.meta.get('release', '')}) has "
                            f"{release.config[key]!r}: is this the right release folder?")
    return cfg


def _folder_files(path: Path, release: Release) -> tuple[Path, list[Path]]:
    """(config.json, weights files) of a diffusers-format release folder (or its ``vae/`` subfolder)."""
    from vfmbench.vfm import weight_files

    if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a whole pipeline folder
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"{str(path)!r} is not a diffusers {release.library_class} folder (config.json + weights) of {release.name!r}")
    files = [f for f in weight_files(path) if f.name.startswith("diffusion_pytorch_model")] or weight_files(path)
    if not files:
        raise UserError(f"{str(path)!r} has a config.json but no weights file ({' or '.join(DIFFUSERS_WEIGHTS)})")
    return path / "config.json", files


def load_release(release: Release, path: Path, cache_dir: Path | None) -> tuple[nn.Module, str, dict[str, torch.Tensor] | None]:
    """(library model, weights id, shipped statistics or None) from a release folder or file, strictly."""
    from vfmbench.vfm import load_weight_file, weights_id

    if release.layout == "ldm":
        return _load_ldm(release, path, cache_dir)
    cfg_file, files = _folder_files(path, release)
    model = build_model(release, _read_config(cfg_file, release))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_weight_file(f))
    load_into(model, state, f"{release.name} weights {str(cfg_file.parent)!r}")
    return model, weights_id([cfg_file, *files], cache_dir), None


def _load_ldm(release: Release, path: Path, cache_dir: Path | None):
    """An original LDM-layout checkpoint (VA-VAE, MAR): mapped onto ``AutoencoderKL`` by ``sd_vae.LDM_KEY_TABLE``.

    ``path`` is the checkpoint or a folder holding it (and the release's ``stats_file``); a
    ``config.json`` there overrides the release's architecture (e.g. a retrained width).
    """
    from vfmbench.vfm import WEIGHT_SUFFIXES, load_weight_file, weights_id
    from vfmbench_plugins.tokenizers.sd_vae import convert_ldm_state_dict, is_ldm_layout

    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        suffixes = (*WEIGHT_SUFFIXES, ".ckpt")
        ckpts = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes and p.name != release.stats_file)
        if len(ckpts) != 1:
            raise UserError(f"{str(path)!r} must hold exactly one {release.name} checkpoint ({', '.join(suffixes)}); "
                            f"found {[p.name for p in ckpts]}")
        path = ckpts[0]
    state = load_weight_file(path)
    if not is_ldm_layout(state):
        raise UserError(f"{str(path)!r} is not an original-layout {release.name} checkpoint (no encoder.down.N.block keys)")
    state = {k: v for k, v in state.items() if not (release.ignore_keys and k.endswith(release.ignore_keys))}
    converted, unmapped = convert_ldm_state_dict(state)
    if unmapped:
        raise UserError(f"{str(path)!r}: keys outside the {release.name} autoencoder layout: {unmapped[:5]}")
    cfg = _read_config(folder / "config.json", release) if (folder / "config.json").is_file() else dict(release.config)
    model = build_model(release, cfg)
    load_into(model, converted, f"{release.name} checkpoint {str(path)!r}")
    files, stats = [path], None
    if release.stats_file:
        sf = folder / release.stats_file
        if not sf.is_file():
            raise UserError(f"{release.name}: the release's latent statistics {release.stats_file!r} are not beside {str(path)!r}")
        raw = torch.load(sf, map_location="cpu", weights_only=True)
        missing = [k for k in ("mean", "std") if k not in raw]
        if missing:
            raise UserError(f"{str(sf)!r} has no key {missing[0]!r} (expected 'mean' and 'std' of the latent channels)")
        stats = {k: raw[k].float().flatten() for k in ("mean", "std")}
        files.append(sf)
    return model, weights_id(files, cache_dir), stats


class ReleasedTokenizer(Tokenizer):
    """A released tokenizer behind the Tokenizer interface, evaluated as released (never trained).

    Subclasses give ``moments(x) -> (mean, logvar or None)`` of the raw latent from images in the
    release's input range, ``reconstruct_pixels(z)`` back to that range, and ``shipped_stats()``.
    """

    def __init__(self, release: Release, args: ReleasedArgs, model: nn.Module, shipped: dict[str, torch.Tensor] | None = None):
        super().__init__(int(release.meta["latent_channels"]), int(release.meta["downsample"]))
        self.release, self.args, self.model = release, args, model
        self.shipped = shipped
        self.unit_range = release.meta.get("input_range", "[-1, 1]") == "[0, 1]"
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self._reset_stats()

    # -- family hooks --
    @abc.abstractmethod
    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, log-variance or None for a point latent) of the raw latent of ``x`` in the release's input range."""

    @abc.abstractmethod
    def reconstruct_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> image in the release's input range."""

    def shipped_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) equivalent of the release's normalisation, z -> (z - mean) / std:
        a statistics file shipped beside the checkpoint, else the config's ``latents_mean`` /
        ``latents_std`` (diffusers: (z - mean) * scaling_factor / std), else its scaling and shift factors."""
        scale, shift = self._scale_shift()
        if self.shipped is not None:
            return self.shipped["mean"], self.shipped["std"]
        cfg = self.model.config
        lm, ls = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if lm is not None and ls is not None:
            return torch.tensor(lm, dtype=torch.float32).flatten(), torch.tensor(ls, dtype=torch.float32).flatten() / scale
        c = self.latent_channels
        return torch.full((c,), shift), torch.full((c,), 1.0 / scale)

    def _scale_shift(self) -> tuple[float, float]:
        cfg = self.model.config
        scale = self.release.scale or float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = self.release.shift or float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        return scale, shift

    # -- Tokenizer --
    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # batch-norm statistics and dropout stay as released
        return self

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        x = to_float(images)
        if self.unit_range:
            x = x.add(1.0).mul(0.5)
        mean, logvar = self.moments(x)
        mean = mean.float().contiguous()
        if logvar is None or self.args.posterior == "mean":
            logvar = torch.full_like(mean, POINT_LOGVAR)
        return DiagonalGaussian(mean, logvar.float().contiguous())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.reconstruct_pixels(z).float()
        return x.mul(2.0).sub(1.0) if self.unit_range else x

    def _reset_stats(self) -> None:
        mean, std = self.shipped_stats()
        if mean.is_meta or std.is_meta:  # a dry run's architecture: no statistics to copy
            return
        self.latent_mean.copy_(mean.to(self.latent_mean))
        self.latent_std.copy_(std.to(self.latent_std))

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The runner's per-channel statistics; kept at the release's own in ``shipped`` mode."""
        if self.args.normalisation == "shipped":
            self._reset_stats()
        else:
            super().set_latent_stats(mean, std)

    def weights_state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def protocol(self) -> dict[str, Any]:
        return release_protocol(self.args.posterior)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Nothing to checkpoint: a release is never trained here (``run.grad_checkpointing`` then only affects the diffusion model)."""

    def training_phases(self, lr: float) -> list[Phase]:
        raise UserError(f"{self.release.name!r} is a released tokenizer, evaluated as released: it is not trained here "
                        "(drop the tokenizer stage or set tokenizer.train.images=0)")

    def phase_loss(self, phase, images, labels, nimg):
        raise UserError(f"{self.release.name!r} is a released tokenizer; it has no training loss here")


def build_released(cls: type[ReleasedTokenizer], release: Release, args: ReleasedArgs, ctx) -> ReleasedTokenizer:
    """Factory of every zoo spec: validate the args, find the weights, load strictly (meta: architecture only)."""
    if args.posterior not in POSTERIORS:
        raise UserError(f"tokenizer.args.posterior={args.posterior!r}: {did_you_mean(args.posterior, POSTERIORS)}")
    if args.normalisation not in NORMALISATIONS:
        raise UserError(f"tokenizer.args.normalisation={args.normalisation!r}: {did_you_mean(args.normalisation, NORMALISATIONS)}")
    spec = ctx.host.tokenizers.get(release.name)
    if ctx.meta:  # dry run: the release's architecture at full size, no weights
        tok = cls(release, args, build_model(release, meta=True), None)
        tok.weights_id = "meta"
        return tok
    model, wid, shipped = load_release(release, release_path(spec, ctx.config), ctx.cache_dir)
    tok = cls(release, args, model, shipped)
    tok.weights_id = wid
    return tok


def release_spec(cls: type[ReleasedTokenizer], release: Release, **extra: Any) -> TokenizerSpec:
    """The ``TokenizerSpec`` of ``release``, built by ``cls``."""
    return TokenizerSpec(
        name=release.name, description=release.description, factory=functools.partial(build_released, cls, release),
        config=ReleasedArgs, uses_vfm=False, uses_decoder=False, default_decoder="", **dict(release.meta), **extra,
    )


def kl_meta(**kw: Any) -> dict[str, Any]:
    """Spec metadata with the zoo defaults ([-1, 1] input, KL posterior) filled in."""
    base = {"input_range": "[-1, 1]", "deterministic": False, "version": "1", "normalisation": "shipped"}
    return {**base, **kw}


def with_config(release: Release, **over: Any) -> Release:
    return replace(release, config={**release.config, **over})




# ---------------------------------------------------------------------------------------------
# Random-init releases in the release's own format (tests; the smoke zoo folder of sweeps/zoo.yaml)

_LDM_RESNET = {"conv_shortcut": "nin_shortcut"}
_LDM_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def to_ldm_layout(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the original LDM key layout (the inverse of
    ``sd_vae.LDM_KEY_TABLE``, written independently; attention projections become 1x1 convs)."""
    import re

    out = {}
    for key, v in state.items():
        k = key
        k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", k)
        k = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.attentions\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.attn.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
        k = k.replace("conv_norm_out.", "norm_out.")
        head, _, param = k.rpartition(".")
        if ".attn" in head:
            for a, b in _LDM_ATTN.items():
                if head.endswith("." + a):
                    head = head[: -len(a)] + b
            if param == "weight" and v.ndim == 2:
                v = v[:, :, None, None]
        elif ".block" in head:
            for a, b in _LDM_RESNET.items():
                if head.endswith("." + a):
                    head = head[: -len(a)] + b
        out[f"{head}.{param}"] = v.clone()
    return out


def write_random_release(release: Release, folder: Path, tiny: bool = True, seed: int = 0) -> Path:
    """A random-init copy of ``release`` in its own format in ``folder``: a ``save_pretrained``
    folder from its config, or an original-layout checkpoint (plus its statistics file). Batch-norm
    running statistics are randomised so that a shipped normalisation built on them is exercised."""
    cfg = {**release.config, **(release.tiny if tiny else {})}
    torch.manual_seed(seed)
    model = build_model(release, cfg)
    g = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    if release.layout == "diffusers":
        model.save_pretrained(str(folder), safe_serialization=True)
        return folder
    state = to_ldm_layout(model.state_dict(), len(cfg["block_out_channels"]))
    state["loss.logvar"] = torch.zeros(())  # training-only entries of a real LDM checkpoint are ignored
    torch.save({"state_dict": state}, folder / f"{release.name}.ckpt")
    if tiny:
        (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": release.library_class}, indent=1))
    if release.stats_file:
        c = int(cfg["latent_channels"])
        torch.save({"mean": torch.randn(1, c, 1, 1, generator=g) * 0.1, "std": torch.rand(1, c, 1, 1, generator=g) + 0.5}, folder / release.stats_file)
    return folder


def release_of(spec: TokenizerSpec) -> Release | None:
    """The ``Release`` record behind a zoo spec (its factory is ``build_released`` bound to it), else None."""
    f = spec.factory
    return f.args[1] if isinstance(f, functools.partial) and f.func is build_released else None


def write_tiny_zoo(root: Path, names: list[str] | None = None) -> list[str]:
    """A random-init CPU-size copy of every registered release (or of ``names``) in ``root/<name>``:
    the folder convention of ``zoo.root`` (docs/zoo.md). Returns the names written."""
    from vfmbench.plugins import get_plugin_manager

    host = get_plugin_manager()
    specs = [s for s in host.tokenizers if release_of(s) is not None]
    if names:
        unknown = [n for n in names if n not in {s.name for s in specs}]
        if unknown:
            raise UserError(f"not a zoo entry: {unknown[0]!r}; {did_you_mean(unknown[0], [s.name for s in specs])}")
        specs = [s for s in specs if s.name in names]
    for i, s in enumerate(specs):
        write_random_release(release_of(s), Path(root) / s.name, tiny=True, seed=i)
    return [s.name for s in specs]


if __name__ == "__main__":  # python -m vfmbench_plugins.tokenizers.released ROOT [NAME ...]
    import sys

    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m vfmbench_plugins.tokenizers.released ROOT [NAME ...]  (random-init tiny zoo releases)")
    from vfmbench_plugins.tokenizers import released  # the registered module (this file runs as __main__)

    print("\n".join(released.write_tiny_zoo(Path(sys.argv[1]), sys.argv[2:] or None)))
