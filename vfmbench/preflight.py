"""Everything that can be checked before a run writes anything, in ``vfmbench run`` and in
``--dry-run`` alike (``check_config``), plus what needs the run's datasets and real components
(``check_run``, ``vfmbench run`` only):

* sizes: batch sizes, image counts, steps and similar settings in their valid ranges;
* the components build: tokenizer, decoder and diffusion arguments are built on the meta device
  (shapes only, no weights), so an argument a constructor rejects fails here, naming the section;
* user files: every weights file named by the config exists and its header reads safely
  (``vfmbench.checkpoint``: never code); ``vfm.weights`` needs ``vfm.pretrained=true``;
* output folders: ``run.out`` and the cache folder can be created and written;
* free disk space: an estimate of what the run writes into ``run.out`` (weights, training
  checkpoints, latents, samples) against the free space of its filesystem.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

GIB = 2**30


def _at_least(value: float, low: float, key: str, why: str = "") -> None:
    if isinstance(value, float) and math.isnan(value) or value < low:
        raise UserError(f"{key} must be at least {low:g}{f' ({why})' if why else ''}, got {value}")


def check_sizes(cfg) -> None:
    """Every size-like setting in its valid range (a 0 batch size would fail only after training)."""
    from .divergence import check_settings

    d, m = cfg.data, cfg.metrics
    _at_least(d.resolution, 1, "data.resolution")
    _at_least(d.train_images, 0, "data.train_images", "0 = the whole split")
    _at_least(d.val_images, 0, "data.val_images", "0 = the whole split")
    _at_least(m.batch_size, 1, "metrics.batch_size", "images per evaluation batch")
    _at_least(m.recon_images, 0, "metrics.recon_images")
    _at_least(m.isc_splits, 1, "metrics.isc_splits")
    _at_least(m.probe.batch_size, 1, "metrics.probe.batch_size")
    _at_least(m.probe.epochs, 0, "metrics.probe.epochs")
    for section, tc in (("tokenizer", cfg.tokenizer.train), ("diffusion", cfg.diffusion.train)):
        _at_least(tc.images, 0, f"{section}.train.images", "0 = no training")
        _at_least(tc.batch_size, 1, f"{section}.train.batch_size")
        _at_least(tc.grad_accum, 1, f"{section}.train.grad_accum")
        _at_least(tc.ema_halflife_images, 0, f"{section}.train.ema_halflife_images", "0 = no EMA")
        _at_least(tc.ckpt_every_images, 0, f"{section}.train.ckpt_every_images", "0 = only at the end")
        _at_least(tc.log_every_images, 0, f"{section}.train.log_every_images")
        if not (math.isfinite(tc.lr) and tc.lr > 0):
            raise UserError(f"{section}.train.lr must be a positive number, got {tc.lr}")
    s = cfg.diffusion.sample
    _at_least(s.num_images, 1, "diffusion.sample.num_images")
    _at_least(s.steps, 1, "diffusion.sample.steps")
    _at_least(s.batch_size, 1, "diffusion.sample.batch_size")
    _at_least(cfg.run.num_threads, 0, "run.num_threads", "0 = torch's default")
    check_settings(cfg.run.max_skipped_fraction)


def check_writable_folder(path: str | Path, key: str) -> Path:
    """``path`` is (or can be created as) a folder this process may write; returns it absolute."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise UserError(f"{key}={str(path)!r} is a file, not a folder; pass a folder path (it is created when missing)")
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{key}={str(path)!r} cannot be created: {str(anc)!r} is a regular file, not a folder; pass another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{key}={str(path)!r} cannot be written: {str(anc)!r} is not writable by this user; pass a folder you may write")
    return p


def check_weights_header(path: str | Path, key: str, trust_torchscript: bool = False) -> None:
    """An existing weights file whose header reads without running code: safetensors (the header),
    a torch zip file (its pickle, tensors memory-mapped) or a legacy torch file (read in full)."""
    import zipfile

    from .checkpoint import UnreadableFileError, is_safetensors, load_torch

    p = Path(path).expanduser()
    if not p.is_file():
        return  # a folder (VFM libraries' layouts) or missing: the component's own lookup says where it looked
    if p.stat().st_size == 0:
        raise UnreadableFileError(f"{key} file {str(p)!r} is empty (0 bytes); pass a complete weights file")
    if is_safetensors(p):
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                f.keys()
        except Exception as e:
            raise UnreadableFileError(f"{key} file {str(p)!r} is not a readable safetensors file ({type(e).__name__}: {e}); pass a complete file") from None
        return
    if zipfile.is_zipfile(p):
        from .vfm import _is_torchscript, refuse_torchscript

        if _is_torchscript(p):
            if key == "vfm.weights" and trust_torchscript:
                return  # the user trusts it (vfm.trust_torchscript); the VFM's adapter reads it
            refuse_torchscript(p, "vfm.trust_torchscript" if key == "vfm.weights" else "")
        try:
            with torch.serialization.safe_globals([]):
                torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            return
        except UserError:
            raise
        except Exception:
            pass  # fall through: load_torch gives the precise message
    load_torch(p, "cpu", what=key)


def check_npz(path: str | Path, key: str) -> None:
    """An ``.npz`` (samples, ADM reference batch) whose arrays hold no Python objects: numpy would have
    to unpickle those (vfmbench never does). Only the arrays' headers are read."""
    import zipfile

    import numpy as np

    p = Path(path).expanduser()
    if not (p.is_file() and p.suffix == ".npz"):
        return
    try:
        with zipfile.ZipFile(p) as z:
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    _, _, dtype = read(f)
                if dtype.hasobject:
                    raise UserError(f"{key} {str(p)!r}: array {name[:-4]!r} holds Python objects, which would have to be "
                                    "unpickled (vfmbench never does); pass an .npz of plain numeric arrays")
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UserError(f"{key} {str(p)!r} is not a readable .npz file ({type(e).__name__}: {e}); pass a complete file") from None


def user_files(cfg) -> list[tuple[str, str]]:
    """(config key, path) of every weights file the config names."""
    out = [("tokenizer.weights", cfg.tokenizer.weights), ("metrics.inception_weights", cfg.metrics.inception_weights),
           ("metrics.lpips_weights", cfg.metrics.lpips_weights)]
    if cfg.vfm.pretrained:
        out.append(("vfm.weights", cfg.vfm.weights))
    for section, args in (("tokenizer.args", cfg.tokenizer.args), ("decoder.args", cfg.decoder.args)):
        for k, v in args.items():  # released checkpoints passed as paths (e.g. tokenizer.args.pretrained)
            if isinstance(v, str) and v and Path(v).expanduser().is_file():
                out.append((f"{section}.{k}", v))
    return [(k, v) for k, v in out if v]


@dataclass
class Built:
    """The run's components on the meta device: shapes and parameter counts, no weights."""

    tokenizer: torch.nn.Module
    diffusion: torch.nn.Module
    latent_shape: tuple[int, ...]


def build_meta(host, cfg) -> Built:
    """Build tokenizer (with its decoder) and diffusion model on the meta device; an argument a
    constructor rejects is a ``UserError`` naming the sections to check."""
    from .build import BuildContext, build_diffusion, build_tokenizer, decoder_name

    ctx = BuildContext(host=host, config=cfg, meta=True)
    dec = decoder_name(host, cfg)
    where = "tokenizer.args" + (f" and decoder.args (decoder {dec!r})" if dec else "")
    try:
        with torch.device("meta"):
            tok = build_tokenizer(ctx)
            shape = tuple(tok.latent_shape(cfg.data.resolution))
    except UserError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"tokenizer {cfg.tokenizer.name!r} cannot be built with these settings ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check {where}") from None
    ds = host.datasets.get(cfg.data.dataset)
    try:
        with torch.device("meta"):
            diff = build_diffusion(host, cfg, shape, ds.num_classes or 1000)
    except UserError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"diffusion model {cfg.diffusion.name!r} cannot be built for latents of shape {list(shape)} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check diffusion.args") from None
    return Built(tok, diff, shape)


def estimate_run_bytes(cfg, built: Built, n_train: int, n_val: int) -> dict[str, int]:
    """What a run writes into its directory, by kind (bytes, float32 weights; an estimate from above
    for what scales: checkpoints hold weights, two AdamW moments and the EMA)."""
    from .build import tokenizer_is_trained

    stages = set(cfg.run.stages)
    out: dict[str, int] = {}

    def trainable(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    tok_p, diff_p = trainable(built.tokenizer), trainable(built.diffusion)
    if "tokenizer" in stages:
        out["tokenizer weights"] = 4 * tok_p * 2
        if tokenizer_is_trained(cfg) and cfg.tokenizer.train.images > 0:
            out["tokenizer checkpoints"] = 4 * tok_p * 4 * cfg.tokenizer.train.keep_checkpoints
    latent = math.prod(built.latent_shape)
    if "latents" in stages:
        out["latents"] = 4 * latent * (2 * n_train + n_val)
    if "diffusion" in stages:
        out["diffusion weights"] = 4 * diff_p
        if cfg.diffusion.train.images > 0:
            out["diffusion checkpoints"] = 4 * diff_p * 4 * cfg.diffusion.train.keep_checkpoints
    if "sample" in stages:
        r = cfg.data.resolution
        out["samples"] = cfg.diffusion.sample.num_images * 3 * r * r
    return out


def check_free_space(folder: Path, need: dict[str, int], key: str = "run.out") -> None:
    anc = Path(folder)
    while not anc.exists():
        anc = anc.parent
    free = shutil.disk_usage(anc).free
    total = sum(need.values())
    if total > free:
        parts = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sorted(need.items(), key=lambda kv: -kv[1]) if v)
        raise UserError(
            f"not enough free disk space for this run: it writes about {total / GIB:.2f} GiB into {key}={str(folder)!r} "
            f"({parts}), but only {free / GIB:.2f} GiB are free there. Free space, pass another --out, or make the run "
            "smaller (diffusion.sample.num_images, data.train_images, *.train.keep_checkpoints)"
        )


def check_vfm_weights(host, cfg) -> None:
    """Pretrained VFM weights are where the run will look (``vfm.weights``, else the library's cache
    when offline); never downloads: online, a missing cache is left to the run's download."""
    from .vfm import is_offline, resolve_weights

    if not (host.tokenizers.get(cfg.tokenizer.name).uses_vfm and cfg.vfm.pretrained):
        return
    spec = host.vfms.get(cfg.vfm.name)
    if spec.adapter is not None and (cfg.vfm.weights or cfg.vfm.size != "full" or is_offline()):
        resolve_weights(spec, cfg.vfm, spec.adapter)


def check_config(host, cfg) -> Built:
    """The checks that need neither data nor weights (``vfmbench run`` and ``--dry-run``)."""
    from .build import default_cache_dir
    from .vfm import check_pretrained_flag

    check_sizes(cfg)
    check_pretrained_flag(cfg.vfm)
    out = check_writable_folder(cfg.run.out, "run.out (--out)")
    check_writable_folder(default_cache_dir(cfg), "run.cache_dir")
    for key, path in user_files(cfg):
        check_weights_header(path, key, trust_torchscript=cfg.vfm.trust_torchscript)
    if cfg.metrics.reference:
        check_npz(cfg.metrics.reference, "metrics.reference")
    check_vfm_weights(host, cfg)
    built = build_meta(host, cfg)  # last: seconds for full-size models
    import dataclasses

    from .planner import requested_stages

    planned = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, stages=requested_stages(host, list(cfg.run.stages))))  # [] = all
    check_free_space(out, estimate_run_bytes(planned, built, cfg.data.train_images, cfg.data.val_images))
    return built


def check_run(run: Any) -> None:
    """``vfmbench run`` only, after ``check_config``: the free space against the datasets' real sizes,
    the tokenizer built with its weights (a released checkpoint, ``tokenizer.weights``) so that a
    missing or mismatched file stops the run before its directory exists."""
    from .build import build_diffusion

    cfg = run.cfg
    tok = run.tokenizer()
    shape = tuple(tok.latent_shape(cfg.data.resolution))
    with torch.device("meta"):
        diff = build_diffusion(run.host, cfg, shape, run.host.datasets.get(cfg.data.dataset).num_classes or 1000)
    stages = set(cfg.run.stages)
    n_train = len(run.dataset("train")) if stages & {"tokenizer", "diffusion", "latents", "probe"} else 0
    built = Built(tok, diff, shape)
    check_free_space(Path(cfg.run.out).expanduser().absolute(), estimate_run_bytes(cfg, built, n_train, len(run.dataset("val"))))
    from .zoo import is_release

    if cfg.tokenizer.weights and not is_release(run.host.tokenizers.get(cfg.tokenizer.name)):  # a release: its factory loaded them
        from .checkpoint import load_torch
        from .context import load_tokenizer_state

        load_tokenizer_state(tok, load_torch(cfg.tokenizer.weights, run.device, what="tokenizer.weights"))
