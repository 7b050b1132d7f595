"""``diffusion.weights``: load a trained or released diffusion model for sampling.

A file is read safely (safetensors, or a torch checkpoint through ``torch.load(weights_only=True)``;
nothing else is unpickled). Released checkpoints nest the state dict: LightningDiT and REG/REPA
``.pt`` files hold the EMA weights under ``"ema"`` (taken first), others under ``"model"``,
``"state_dict"`` or ``"module"`` (an ``argparse.Namespace`` beside them, as REPA/REG save their
arguments, is the one non-tensor type allowed); ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes are
stripped. A state dict in the reference implementation's own key layout (hustvl/LightningDiT,
Martinser/REG and sihyun-yu/REPA ``SiT``) is converted by the model's ``released_state_dict``; a file
written by vfmbench (``diffusion/model.pt``) loads as it is. Missing or unexpected keys and shape
mismatches are ``UserError`` naming what to change.

Latent de-normalisation of released models (LightningDiT ``inference.py``): the sampler's output is
``sample * std / multiplier + mean`` with the per-channel ``mean``/``std`` of the tokenizer's
``latents_stats.pt`` (``diffusion.latent_stats``) and ``diffusion.latent_multiplier`` (1.0 for VA-VAE
and VFM-VAE); without ``diffusion.latent_stats`` the tokenizer's own statistics are used.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

NESTING_KEYS = ("ema", "model", "state_dict", "module")  # in this order: released LightningDiT/REG keep the EMA under "ema"
STRIP_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path, key: str = "diffusion.weights", nest: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors of the file's state dict, the nesting key it was under or ''); ``key`` names the config key in errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{key}={str(path)!r} does not exist; pass a released .pt/.pth/.safetensors file "
                        "(for diffusion.weights also the diffusion/model.pt of an earlier run)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:
            raise UserError(f"{key}={str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    else:
        try:
            # REPA/REG checkpoints keep their argparse Namespace under "args": a plain attribute bag, allowed
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{key}={str(path)!r} cannot be read as a torch state dict with weights_only=True "
                            f"({type(e).__name__}: {e}); convert it to .safetensors") from None
    nested = ""
    if isinstance(obj, Mapping) and nest:
        for name in NESTING_KEYS:
            if isinstance(obj.get(name), Mapping):
                obj, nested = obj[name], name
                break
    if not isinstance(obj, Mapping):
        raise UserError(f"{key}={str(path)!r} holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise UserError(f"{key}={str(path)!r} holds no tensors (top-level keys: {sorted(map(str, obj))[:8]})")
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, nested


def load_diffusion_weights(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load ``path`` into ``model`` (converting a reference layout); returns what was loaded, for the stage info."""
    sd, nested = read_state_dict(path)
    layout = "vfmbench"
    convert = getattr(model, "released_state_dict", None)
    if convert is not None:
        converted = convert(sd)
        if converted is not None:
            sd, layout = converted, "reference"
    missing, unexpected = [], []
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            missing.append(k)
        elif tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"diffusion.weights={str(path)!r}: {k} has shape {tuple(sd[k].shape)}, the model built from "
                            f"diffusion.args has {tuple(v.shape)}; set diffusion.args (size/width/depth/heads/patch_size, "
                            "align_dim, ...) and the dataset's classes to the checkpoint's")
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise UserError(f"diffusion.weights={str(path)!r} ({layout} layout) does not fit {getattr(model, 'spec', None) and model.spec.name}: "
                        f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                        f"{' ...' if len(unexpected) > 6 else ''}; check diffusion.name and diffusion.args")
    model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own})
    return {"loaded_from": str(path), "layout": layout, "nested_under": nested, "tensors": len(own)}


def read_latent_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std), each [C], from a ``latents_stats.pt`` ({'mean', 'std'} of shape [1, C, 1, 1] or [C])."""
    sd, _ = read_state_dict(path, key="diffusion.latent_stats", nest=False)
    if "mean" not in sd or "std" not in sd:
        raise UserError(f"diffusion.latent_stats={str(path)!r} must hold 'mean' and 'std' tensors, found {sorted(sd)[:6]}")
    if sd["mean"].numel() != sd["std"].numel():
        raise UserError(f"diffusion.latent_stats={str(path)!r}: 'mean' and 'std' have {sd['mean'].numel()} and {sd['std'].numel()} values")
    return sd["mean"].flatten().float(), sd["std"].flatten().float()


def denormalize_released(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """LightningDiT's de-normalisation: ``z * std / multiplier + mean`` with per-channel [C] statistics."""
    view = (1, -1) + (1,) * (z.ndim - 2)
    return (z * std.to(z).view(view)) / multiplier + mean.to(z).view(view)


def sample_to_latents(tok, z: torch.Tensor, dc) -> torch.Tensor:
    """Raw tokenizer latents from sampler output ``z``: ``diffusion.latent_stats`` when set, else the tokenizer's own."""
    if getattr(dc, "latent_stats", ""):
        mean, std = read_latent_stats(dc.latent_stats)
        return denormalize_released(z, mean, std, float(getattr(dc, "latent_multiplier", 1.0)))
    return tok.denormalize(z)


def check_config(dc) -> None:
    """``UserError`` before any work for a ``diffusion`` section that cannot run (files, sampler options)."""
    from .sampling import check_options

    sc = dc.sample
    check_options(sc.sampler, sc.steps, sc.cfg_scale, sc.cfg_interval, sc.timestep_shift, sc.precision or "fp32", sc.guided_channels)
    if dc.weights and not Path(dc.weights).expanduser().is_file():
        raise UserError(f"diffusion.weights={dc.weights!r} does not exist; pass a released .pt/.pth/.safetensors file "
                        "or the diffusion/model.pt of an earlier run")
    if dc.latent_stats and not Path(dc.latent_stats).expanduser().is_file():
        raise UserError(f"diffusion.latent_stats={dc.latent_stats!r} does not exist; pass the tokenizer's latents_stats.pt or leave it empty")
    if not dc.latent_multiplier > 0:
        raise UserError(f"diffusion.latent_multiplier must be > 0 (LightningDiT's VA-VAE configs use 1.0), got {dc.latent_multiplier!r}")


def sampling_model(host, cfg, latent_shape: tuple[int, int, int], num_classes: int, device: torch.device | str = "cpu",
                   trained: str | Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The configured diffusion model in eval mode with ``diffusion.weights`` (else ``trained``, the diffusion stage's
    model.pt) loaded: what the sample stage uses, and what a user's released checkpoint goes through."""
    from .build import build_diffusion

    path = cfg.diffusion.weights or trained
    if not path:
        raise UserError("no diffusion weights to sample from: set diffusion.weights or run the diffusion stage")
    model = build_diffusion(host, cfg, latent_shape, num_classes)
    info = load_diffusion_weights(model, path)
    return model.to(device).eval(), info
