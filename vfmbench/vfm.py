"""Frozen vision foundation models: the machinery every VFM plugin shares.

A VFM plugin registers ``VfmSpec`` records whose ``adapter`` is one of the library adapters below
(``TransformersAdapter``, ``TimmAdapter``, ``OpenClipAdapter``), possibly a small subclass in the
plugin file. Everything else is data on the spec: preprocessing (``input_scale``,
``interpolation``, ``mean``, ``std``), the architecture (``model_id``, ``arch``, ``tiny``) and the
weights source. ``build_vfm(spec, cfg)`` returns a ``FrozenVfm``.

Layer indices: 0 = the input of the first block (patch + position embedding, after the pre-norm
where the model has one), k = the output of block k, -1 = the final normed sequence, -2 = the
output of the last block (before that norm), -3 the block before, and so on down to -(depth + 2)
= 0. Patch tokens exclude class/register tokens, which are returned in ``VfmTokens.prefix``.

Weights lookup, in order: ``vfm.weights`` (a file or a folder); the library's own cache (the
Hugging Face hub cache, timm's torch-hub checkpoints, open_clip's ``~/.cache/clip``), read without
network; a download through the library unless ``HF_HUB_OFFLINE`` is set; else
``MissingWeightsError``. Random init only with ``vfm.pretrained=false``.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import VfmConfig, deep_merge
from .errors import MissingWeightsError, UserError
from .interfaces import Vfm, VfmTokens
from .specs import VfmSpec

SIZES = ("full", "tiny")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
RANDOM_INIT_SEED = 0


def default_cache_dir() -> Path:
    """``$VFMBENCH_CACHE_DIR``, else ``~/.cache/vfmbench`` (as the runner's ``run.cache_dir`` default)."""
    return Path(os.environ.get("VFMBENCH_CACHE_DIR") or "~/.cache/vfmbench").expanduser()


def is_offline() -> bool:
    """True when the Hugging Face offline switch is on (read at call time, not at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def arch_kwargs(spec: VfmSpec, size: str) -> dict:
    """The library kwargs of ``spec`` at ``size``: ``spec.arch``, with ``spec.tiny`` merged over it for 'tiny'."""
    if size not in SIZES:
        raise UserError(f"vfm.size must be one of {', '.join(SIZES)}, got {size!r}")
    return deep_merge(dict(spec.arch), spec.tiny if size == "tiny" else {})


# ---------------------------------------------------------------------------------------------
# Preprocessing


def target_size(n: int, scale: float, patch_size: int) -> int:
    """``n * scale`` rounded to the nearest multiple of the patch size (at least one patch)."""
    return max(patch_size, int(math.floor(n * scale / patch_size + 0.5)) * patch_size)


def preprocess(
    images: torch.Tensor,
    scale: float,
    patch_size: int,
    interpolation: str,
    mean: Sequence[float],
    std: Sequence[float],
    pre_scale: float = 1.0,
) -> torch.Tensor:
    """uint8 NCHW -> normalised float32 NCHW at ``target_size`` of each side.

    Resizing uses ``interpolation`` (antialiased where any side shrinks) and is skipped when the
    size does not change; the result is clamped to [0, 1] (as a resized uint8 image would be)
    before ``(x - mean) / std``. ``pre_scale`` != 1 first resizes the float image by that factor
    (``scale_factor`` semantics, antialiased when shrinking), then ``scale`` applies to the result:
    two resizes, as VFM-VAE's image-space equivariance feeds its VFM.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise TypeError(f"images must be uint8 NCHW with 3 channels, got {images.dtype} {tuple(images.shape)}")
    x = images.float().div(255.0)
    if pre_scale != 1.0:
        x = F.interpolate(x, scale_factor=float(pre_scale), mode=interpolation, align_corners=False, antialias=pre_scale < 1.0)
    h, w = x.shape[-2:]
    th, tw = target_size(h, scale, patch_size), target_size(w, scale, patch_size)
    if (th, tw) != (h, w):
        x = F.interpolate(x, size=(th, tw), mode=interpolation, align_corners=False, antialias=th < h or tw < w)
        x = x.clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------------------------------------
# Weight files and their ids


def weight_files(path: Path) -> list[Path]:
    """The weight files of a file or folder: the file itself; a folder's safetensors files, else its other weight files."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    safe = [p for p in files if p.suffix == ".safetensors"]
    return safe or files


def pick_weights_file(path: Path, preferred: Sequence[str], what: str) -> Path:
    """One weights file: ``path`` itself, else the first ``preferred`` name in the folder, else its only weight file."""
    if path.is_file():
        return path
    for name in preferred:
        if (path / name).is_file():
            return path / name
    files = weight_files(path)
    if len(files) != 1:
        raise UserError(f"vfm.weights={str(path)!r}: expected {what} ({' or '.join(preferred)}) in the folder, found {[f.name for f in files]}; pass the file")
    return files[0]


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def refuse_torchscript(path: Path, setting: str = "") -> None:
    """A TorchScript archive runs its own code when loaded: refused, naming the flag that trusts it."""
    how = f"if you trust its source, pass --set {setting}=true; else" if setting else "convert it:"
    raise UserError(
        f"{str(path)!r} is a TorchScript archive: loading it runs the code inside it, so vfmbench does not read it by "
        f"default. {how} load it once in a trusted Python session and save its state_dict() as safetensors "
        "(safetensors.torch.save_file), then pass that file"
    )


def load_weight_file(path: Path, trust_torchscript: bool = False, trust_setting: str = "") -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, a torch checkpoint (optionally under 'state_dict'/'model'),
    read without running code (``vfmbench.checkpoint.load_torch``), or a TorchScript archive when
    ``trust_torchscript`` (else refused: loading TorchScript runs its code)."""
    from .checkpoint import load_torch

    if _is_torchscript(path):
        if not trust_torchscript:
            refuse_torchscript(path, trust_setting)
        with warnings.catch_warnings():  # OpenAI's CLIP .pt files are TorchScript; jit.load is their only reader
            warnings.simplefilter("ignore", FutureWarning)
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        obj = load_torch(path, "cpu")
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise UserError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def weights_id(files: Sequence[Path], cache_dir: Path | None = None) -> str:
    """First 16 hex digits of the sha256 over the files' bytes, in the given order.

    Cached in ``cache_dir/weights-ids.json`` keyed by each file's resolved path, size and mtime,
    so a multi-GB checkpoint is hashed once.
    """
    stats = []
    for f in files:
        real = Path(f).resolve()
        st = real.stat()
        stats.append(f"{real}|{st.st_size}|{st.st_mtime_ns}")
    key = "\n".join(stats)
    index_path = (cache_dir or default_cache_dir()) / "weights-ids.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    h = hashlib.sha256()
    for f in files:
        with open(Path(f).resolve(), "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    wid = h.hexdigest()[:16]
    try:
        index = json.loads(index_path.read_text())  # re-read: another process may have added entries
    except (OSError, ValueError):
        index = {}
    index[key] = wid
    with contextlib.suppress(OSError):
        _atomic_write_json(index_path, index)
    return wid


def state_dict_id(module: nn.Module) -> str:
    """Short sha256 of a module's state dict (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-dim buffers (BatchNorm's num_batches_tracked)
    return h.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Library adapters


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hf_cached_file(repo_id: str, filenames: Sequence[str]) -> tuple[Path | None, str]:
    """The first of ``filenames`` present in the Hugging Face cache for ``repo_id`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    cache = _hf_cache_dir()
    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=cache)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit), ""
    where = f"Hugging Face cache {cache} (repo {repo_id}, files {', '.join(filenames)}): not there"
    return None, where


class Adapter(abc.ABC):
    """Builds, loads and taps one library's ViT. Subclasses in plugin files add per-family details.

    ``hidden_states(model, x, blocks, final)`` returns the full sequences (prefix tokens first)
    of the requested ``blocks`` (0 = embedding output, k = output of block k) and, when
    ``final``, the final normed sequence.
    """

    library = ""

    @abc.abstractmethod
    def build(self, spec: VfmSpec, size: str) -> nn.Module:
        """The architecture with the library's random init (on the current default device)."""

    @abc.abstractmethod
    def load(self, spec: VfmSpec, size: str, path: Path, trust_torchscript: bool = False) -> tuple[nn.Module, list[Path]]:
        """The model with weights from a local file or folder, and the weight files it read; a TorchScript
        archive only with ``trust_torchscript`` (``vfm.trust_torchscript``: reading one runs its code)."""

    @abc.abstractmethod
    def cached(self, spec: VfmSpec) -> tuple[Path | None, list[str]]:
        """Weights in the library's cache, found without network, and the places looked."""

    @abc.abstractmethod
    def download(self, spec: VfmSpec) -> Path:
        """Fetch the weights through the library; returns the local path."""

    @abc.abstractmethod
    def how_to_fetch(self, spec: VfmSpec) -> str:
        """A command that fetches the weights, for error messages."""

    @abc.abstractmethod
    def dims(self, model: nn.Module) -> tuple[int, int, int]:
        """(embed_dim, patch_size, num_blocks) of a built model."""

    @abc.abstractmethod
    def resolution(self, model: nn.Module) -> int:
        """The native input size of a built model (its position-embedding grid times the patch)."""

    @abc.abstractmethod
    def hidden_states(self, model: nn.Module, x: torch.Tensor, blocks: set[int], final: bool) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Full sequences of ``blocks`` and, if ``final``, the final normed sequence."""


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports and progress bars for one call, then restore them."""
    from transformers.utils import logging as tlog

    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


class TransformersAdapter(Adapter):
    """A transformers vision model: ``model_class``/``config_class`` are names in ``transformers``.

    ``spec.arch`` holds the config kwargs of the full-size model (hub configs are not reachable
    offline); a ``save_pretrained`` folder brings its own config. ``config_overrides`` are applied
    on every build and load; ``forward_kwargs`` are passed to every forward.
    """

    library = "transformers"

    def __init__(self, model_class: str, config_class: str, config_overrides: Mapping[str, Any] | None = None, forward_kwargs: Mapping[str, Any] | None = None):
        self.model_class = model_class
        self.config_class = config_class
        self.config_overrides = dict(config_overrides or {})
        self.forward_kwargs = dict(forward_kwargs or {})

    def _classes(self):
        import transformers

        return getattr(transformers, self.model_class), getattr(transformers, self.config_class)

    def build(self, spec, size):
        model_cls, config_cls = self._classes()
        return model_cls(config_cls(**{**arch_kwargs(spec, size), **self.config_overrides}))

    def load(self, spec, size, path, trust_torchscript=False):
        model_cls, config_cls = self._classes()
        try:
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise UserError(f"vfm.weights={str(path)!r} is a folder without config.json; pass a save_pretrained folder of {spec.model_id}")
                with _quiet_transformers():
                    config = config_cls.from_pretrained(str(path), local_files_only=True, **self.config_overrides)
                    model, info = model_cls.from_pretrained(
                        str(path), config=config, dtype=torch.float32, local_files_only=True, output_loading_info=True
                    )
                missing, files = list(info.get("missing_keys", [])), weight_files(path)
            else:
                with torch.device("meta"):  # check names and shapes before building the real model
                    probe = self.build(spec, size)
                shapes = {k: t.shape for k, t in probe.state_dict().items()}
                sd = load_weight_file(path, trust_torchscript=trust_torchscript, trust_setting="vfm.trust_torchscript")
                prefix = max(("", f"{probe.base_model_prefix}."), key=lambda p: sum(k.startswith(p) and k[len(p):] in shapes for k in sd))
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix):] in shapes}
                wrong = [f"{k} {tuple(v.shape)} != {tuple(shapes[k])}" for k, v in sd.items() if v.shape != shapes[k]]
                if wrong:
                    raise ValueError(f"{len(wrong)} tensors have other shapes, e.g. {wrong[:2]}")
                missing, files = [k for k in shapes if k not in sd], [path]
                if not missing:
                    model = self.build(spec, size)
                    model.load_state_dict(sd, strict=True)
        except UserError:
            raise
        except Exception as e:  # the library's own error, whatever its type, with the path and model named
            raise UserError(f"vfm.weights={str(path)!r} could not be loaded as {self.model_class} for {spec.name!r} at size {size!r}: {e}") from None
        if missing:
            raise UserError(
                f"vfm.weights={str(path)!r} does not hold a {self.model_class} matching {spec.name!r} "
                f"({len(missing)} missing tensors, e.g. {missing[:3]})"
            )
        return model, files

    def cached(self, spec):
        from huggingface_hub import snapshot_download

        cache = _hf_cache_dir()
        try:
            folder = Path(snapshot_download(spec.model_id, local_files_only=True, cache_dir=cache))
        except Exception:
            return None, [f"Hugging Face cache {cache} (repo {spec.model_id}): no snapshot"]
        if (folder / "config.json").is_file() and weight_files(folder):
            return folder, []
        return None, [f"Hugging Face cache {folder}: snapshot without config.json or weight files"]

    def download(self, spec):
        with _quiet_transformers():
            self._classes()[0].from_pretrained(spec.model_id, dtype=torch.float32)
        folder, _ = self.cached(spec)
        if folder is None:
            raise FileNotFoundError(f"{spec.model_id} was downloaded but is not in {_hf_cache_dir()}")
        return folder

    def how_to_fetch(self, spec):
        return (
            f"`hf download {spec.model_id} --local-dir DIR`, or "
            f"`{self.model_class}.from_pretrained('{spec.model_id}').save_pretrained(DIR)`"
        )

    def dims(self, model):
        c = model.config
        patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
        return c.hidden_size, patch, c.num_hidden_layers

    def resolution(self, model):
        size = model.config.image_size
        return size if isinstance(size, int) else size[0]

    def hidden_states(self, model, x, blocks, final):
        out = model(pixel_values=x, output_hidden_states=True, **self.call_kwargs(model, x))
        hs = out.hidden_states
        return {b: hs[b] for b in blocks}, (out.last_hidden_state if final else None)

    def call_kwargs(self, model: nn.Module, x: torch.Tensor) -> dict:
        return dict(self.forward_kwargs)


class TimmAdapter(Adapter):
    """A timm ViT-family model (``forward_intermediates``, ``norm_pre``, ``dynamic_img_size``).

    ``spec.model_id`` is the timm name with its pretrained tag; ``spec.arch``/``tiny`` are
    ``create_model`` kwargs. The classifier is removed after loading.
    """

    library = "timm"

    def _kwargs(self, spec, size):
        return {**arch_kwargs(spec, size), "dynamic_img_size": True}

    def build(self, spec, size):
        import timm

        model = timm.create_model(spec.model_id, pretrained=False, **self._kwargs(spec, size))
        model.reset_classifier(0)
        return model

    def load(self, spec, size, path, trust_torchscript=False):
        import timm

        file = pick_weights_file(path, ("model.safetensors", "pytorch_model.bin"), "a timm weights file")
        try:
            model = timm.create_model(spec.model_id, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **self._kwargs(spec, size))
        except Exception as e:  # the library's own error, whatever its type, with the path and model named
            raise UserError(f"vfm.weights={str(file)!r} does not match timm model {spec.model_id!r} at size {size!r}: {e}") from None
        model.reset_classifier(0)
        return model, [file]

    def _pretrained_cfg(self, spec):
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.model_id)
        if cfg is None:
            raise UserError(f"timm has no pretrained config {spec.model_id!r}")
        return cfg

    def cached(self, spec):
        cfg = self._pretrained_cfg(spec)
        looked = []
        if cfg.hf_hub_id:
            found, where = _hf_cached_file(cfg.hf_hub_id, [cfg.hf_hub_filename or "model.safetensors", "pytorch_model.bin"])
            if found:
                return found, []
            looked.append(where)
        if cfg.url:
            p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
            if p.is_file():
                return p, []
            looked.append(f"torch hub cache {p}: not there")
        return None, looked

    def download(self, spec):
        from huggingface_hub import hf_hub_download

        cfg = self._pretrained_cfg(spec)
        try:
            return Path(hf_hub_download(cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors"))
        except Exception:
            return Path(hf_hub_download(cfg.hf_hub_id, "pytorch_model.bin"))

    def how_to_fetch(self, spec):
        repo = self._pretrained_cfg(spec).hf_hub_id or spec.source
        return f"`hf download {repo} model.safetensors --local-dir DIR` (timm's file for {spec.model_id})"

    def dims(self, model):
        return model.embed_dim, model.patch_embed.patch_size[0], len(model.blocks)

    def resolution(self, model):
        return model.patch_embed.img_size[0]

    def hidden_states(self, model, x, blocks, final):
        taken: dict[int, torch.Tensor] = {}
        handle = model.norm_pre.register_forward_hook(lambda m, i, o: taken.__setitem__(0, o))
        want = sorted(b - 1 for b in blocks if b > 0)
        try:
            res = model.forward_intermediates(
                x,
                indices=want or [0],
                norm=False,
                output_fmt="NLC",
                return_prefix_tokens=True,
                stop_early=not final,
                intermediates_only=not final,
            )
        finally:
            handle.remove()
        last, inter = (None, res) if not final else res
        out = {0: taken[0]} if 0 in blocks else {}
        if want:
            for b, (patches, prefix) in zip(want, inter):
                out[b + 1] = torch.cat([prefix, patches], dim=1) if prefix is not None else patches
        return out, last


class OpenClipAdapter(Adapter):
    """The vision tower of an open_clip model: ``spec.model_id`` is the open_clip config name,
    ``spec.weights_tag`` its pretrained tag; ``spec.arch``/``tiny`` deep-merge into the config
    (``{"vision_cfg": {...}, "embed_dim": ...}``). Only the vision tower is built.

    The position embedding is resampled (bicubic, as timm does) for inputs off the native grid.
    """

    library = "open_clip"

    def _config(self, spec, size):
        import open_clip

        base = open_clip.get_model_config(spec.model_id)
        if base is None:
            raise UserError(f"open_clip has no model config {spec.model_id!r}")
        cfg = deep_merge(base, arch_kwargs(spec, size))
        tag_cfg = open_clip.get_pretrained_cfg(spec.model_id, spec.weights_tag) if spec.weights_tag else {}
        quick_gelu = bool(cfg.get("quick_gelu", False) or (tag_cfg or {}).get("quick_gelu", False))
        return cfg, quick_gelu

    def build(self, spec, size):
        from open_clip.model import _build_vision_tower

        cfg, quick_gelu = self._config(spec, size)
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=quick_gelu)
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "transformer"):
            raise UserError(f"open_clip model {spec.model_id!r} is not a plain ViT vision tower")
        return visual

    def load(self, spec, size, path, trust_torchscript=False):
        file = pick_weights_file(path, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), "an open_clip weights file")
        visual = self.build(spec, size)
        sd = load_weight_file(file, trust_torchscript=trust_torchscript, trust_setting="vfm.trust_torchscript")
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        try:
            visual.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(f"vfm.weights={str(file)!r} does not match the open_clip vision tower of {spec.model_id!r} at size {size!r}: {e}") from None
        return visual, [file]

    def _pretrained_cfg(self, spec) -> dict:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.model_id, spec.weights_tag) if spec.weights_tag else {}
        if not cfg:
            raise UserError(f"open_clip has no pretrained tag {spec.weights_tag!r} for {spec.model_id!r}")
        return cfg

    def cached(self, spec):
        cfg = self._pretrained_cfg(spec)
        looked = []
        if cfg.get("hf_hub"):
            hub = cfg["hf_hub"]
            repo, filename = (hub[:-1], "") if hub.endswith("/") else os.path.split(hub)
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            found, where = _hf_cached_file(repo, names)
            if found:
                return found, []
            looked.append(where)
        if cfg.get("url"):
            p = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
            if p.is_file():
                return p, []
            looked.append(f"open_clip URL cache {p}: not there")
        return None, looked

    def download(self, spec):
        import open_clip

        return Path(open_clip.download_pretrained(self._pretrained_cfg(spec)))

    def how_to_fetch(self, spec):
        hub = self._pretrained_cfg(spec).get("hf_hub", "")
        repo, filename = (hub[:-1], "open_clip_model.safetensors") if hub.endswith("/") else os.path.split(hub)
        return f"`hf download {repo} {filename} --local-dir DIR` (open_clip {spec.model_id}, tag {spec.weights_tag})"

    def dims(self, model):
        return model.transformer.width, model.patch_size[0], len(model.transformer.resblocks)

    def resolution(self, model):
        return model.image_size[0]

    def embed(self, visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The input of the first block; off the native grid, with the position embedding resampled."""
        grid = (x.shape[-2] // visual.patch_size[0], x.shape[-1] // visual.patch_size[1])
        if grid == tuple(visual.grid_size):
            return visual._embeds(x)
        from timm.layers import resample_abs_pos_embed

        t = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(t.dtype).view(1, 1, -1).expand(t.shape[0], 1, -1)
        t = torch.cat([cls, t], dim=1)
        pos = resample_abs_pos_embed(visual.positional_embedding.unsqueeze(0), new_size=list(grid), old_size=list(visual.grid_size), num_prefix_tokens=1)
        t = visual.patch_dropout(t + pos.to(t.dtype))
        return visual.ln_pre(t)

    def hidden_states(self, model, x, blocks, final):
        h0 = self.embed(model, x)
        want = sorted(b - 1 for b in blocks if b > 0)
        last, inter = model.transformer.forward_intermediates(h0, indices=want or [0], stop_early=not final)
        out = {0: h0} if 0 in blocks else {}
        if want:
            out.update({b + 1: t for b, t in zip(want, inter)})
        return out, (model.ln_post(last) if final else None)


# ---------------------------------------------------------------------------------------------
# The frozen model


class FrozenVfm(Vfm):
    """A library ViT behind the ``Vfm`` interface: frozen, in eval mode, no gradients.

    ``forward(images uint8 NCHW, layers, scale=None)`` resizes by ``scale`` (default
    ``input_scale``), normalises, runs the model (bf16 autocast on CUDA) and returns float32
    ``VfmTokens``. Any input size works where the library interpolates position embeddings.
    ``spec`` is the registered spec resolved for the model built (``resolved_spec``).
    """

    def __init__(self, spec: VfmSpec, model: nn.Module, adapter: Adapter, *, weights_id: str, weights_source: str, size: str, input_scale: float, default_layers: Sequence[int]):
        super().__init__()
        self.spec = spec
        self.adapter = adapter
        self.model = model
        self.weights_id = weights_id
        self.weights_source = weights_source
        self.size = size
        self.input_scale = float(input_scale)
        self.embed_dim, self.patch_size, self.num_blocks = adapter.dims(model)
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.model.requires_grad_(False)
        self.model.eval()
        self.default_layers = tuple(default_layers)
        for i in self.default_layers:
            self.hidden_index(i)

    def train(self, mode: bool = True) -> "FrozenVfm":
        super().train(mode)
        self.model.eval()  # frozen: never in training mode
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hidden_index(self, layer: int) -> int | None:
        """Map a layer index to a hidden-state index (0..num_blocks), or None for the final normed output."""
        d = self.num_blocks
        if 0 <= layer <= d:
            return layer
        if layer == -1:
            return None
        if -(d + 2) <= layer <= -2:
            return d + 2 + layer
        raise UserError(
            f"layer {layer} is out of range for vfm {self.spec.name!r} ({self.size}, {d} blocks): "
            f"valid are 0..{d} (0 = embedding, k = block k) and -1..-{d + 2} (-1 = final norm)"
        )

    def preprocess(self, images: torch.Tensor, scale: float | None = None, pre_scale: float = 1.0) -> torch.Tensor:
        s = self.input_scale if scale is None else float(scale)
        return preprocess(images.to(self.device), s, self.patch_size, self.spec.interpolation, self.spec.mean, self.spec.std, pre_scale)

    def forward(self, images: torch.Tensor, layers: Sequence[int] = (-1,), scale: float | None = None, pre_scale: float = 1.0) -> VfmTokens:
        layers = [int(i) for i in layers]
        index = {i: self.hidden_index(i) for i in layers}
        x = self.preprocess(images, scale, pre_scale)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        blocks = {h for h in index.values() if h is not None}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            hidden, final = self.adapter.hidden_states(self.model, x, blocks, final=None in index.values())
        p = self.num_prefix_tokens
        out, prefix = {}, {}
        for i, h in index.items():
            seq = (final if h is None else hidden[h]).float()
            if seq.shape[1] != p + grid[0] * grid[1]:
                raise RuntimeError(
                    f"vfm {self.spec.name!r}: layer {i} has {seq.shape[1]} tokens, expected "
                    f"{p} prefix + {grid[0]}x{grid[1]} patches"
                )
            prefix[i], out[i] = seq[:, :p], seq[:, p:]
        return VfmTokens(layers=out, grid=grid, prefix=prefix)


def default_layers(spec: VfmSpec, depth: int) -> tuple[int, ...]:
    """``spec.default_layers``; at another depth (tiny), positive indices scale by depth / spec.depth."""
    if not spec.depth or depth == spec.depth:
        return tuple(spec.default_layers)
    return tuple(i if i <= 0 else max(1, min(depth, round(i * depth / spec.depth))) for i in spec.default_layers)


def resolve_weights(spec: VfmSpec, cfg: VfmConfig, adapter: Adapter) -> Path:
    """The local path of pretrained weights: ``cfg.weights``, else the library cache, else a download (online only)."""
    if cfg.weights:
        p = Path(cfg.weights).expanduser()
        if p.exists():
            return p
        raise MissingWeightsError(
            f"vfm.weights={cfg.weights!r} for vfm {spec.name!r} ({spec.model_id}) does not exist; "
            f"pass an existing file or folder with `--set vfm.weights=PATH` ({adapter.how_to_fetch(spec)})"
        )
    if cfg.size != "full":
        raise MissingWeightsError(
            f"vfm {spec.name!r} at size {cfg.size!r} has no published weights: pass your own with "
            "`--set vfm.weights=PATH`, or use `--set vfm.pretrained=false` for a random-init smoke run"
        )
    looked = ["vfm.weights: not set"]
    found, places = adapter.cached(spec)
    if found is not None:
        return found
    looked += places
    if is_offline():
        looked.append("no download tried: HF_HUB_OFFLINE is set")
    else:
        try:
            return adapter.download(spec)
        except Exception as e:  # any network or hub failure ends in the same actionable message
            looked.append(f"download of {spec.source or spec.model_id}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    tag = f", tag {spec.weights_tag}" if spec.weights_tag else ""
    raise MissingWeightsError(
        f"pretrained weights of vfm {spec.name!r} ({spec.library} model {spec.model_id}{tag}) were not found. Looked in:\n"
        + "".join(f"  - {w}\n" for w in looked)
        + f"Fetch them where the hub is reachable ({adapter.how_to_fetch(spec)}), then pass "
        "`--set vfm.weights=PATH`; or use `--set vfm.pretrained=false` for a random-init smoke run."
    )


def _check_config(spec: VfmSpec, cfg: VfmConfig) -> Adapter:
    if spec.adapter is None:
        raise TypeError(f"vfm spec {spec.name!r} has no adapter")
    if cfg.size not in SIZES:
        raise UserError(f"vfm.size must be one of {', '.join(SIZES)}, got {cfg.size!r}")
    if cfg.input_scale < 0:
        raise UserError(f"vfm.input_scale must be > 0 (or 0 for the spec's {spec.input_scale}), got {cfg.input_scale}")
    check_pretrained_flag(cfg)
    return spec.adapter


def check_pretrained_flag(cfg: VfmConfig) -> None:
    """``vfm.weights`` is read only for pretrained VFMs: with ``vfm.pretrained=false`` it would be ignored."""
    if cfg.weights and not cfg.pretrained:
        raise UserError(
            f"vfm.weights={cfg.weights!r} is set but vfm.pretrained=false, so the file would be ignored: set "
            "vfm.pretrained=true to load it, or remove vfm.weights for a random-init smoke run"
        )


def resolved_spec(spec: VfmSpec, size: str, model: nn.Module) -> VfmSpec:
    """``spec`` with the fields of the model actually built (tiny, or a folder with another config):
    width, depth, patch and default layers; at the tiny size also its resolution and input scale 1
    (the tiny models take 64 px inputs as an 8x8 grid)."""
    width, patch, depth = spec.adapter.dims(model)
    fields = dict(width=width, depth=depth, patch_size=patch, default_layers=default_layers(spec, depth))
    if size == "tiny":
        fields.update(resolution=spec.adapter.resolution(model), input_scale=1.0)
    return dataclasses.replace(spec, **fields)


def _freeze(spec: VfmSpec, cfg: VfmConfig, model: nn.Module, weights_id: str, source: str) -> FrozenVfm:
    spec = resolved_spec(spec, cfg.size, model)
    layers = tuple(cfg.layers) if cfg.layers else spec.default_layers
    return FrozenVfm(spec, model, spec.adapter, weights_id=weights_id, weights_source=source, size=cfg.size,
                     input_scale=cfg.input_scale or spec.input_scale, default_layers=layers)


def frozen_vfm(spec: VfmSpec, cfg: VfmConfig, cache_dir: str | Path | None = None) -> FrozenVfm:
    """The factory of every built-in VFM plugin: ``spec.adapter`` builds or loads the model, then it is frozen."""
    adapter = _check_config(spec, cfg)
    if cfg.pretrained:
        path = resolve_weights(spec, cfg, adapter)
        model, files = adapter.load(spec, cfg.size, path, trust_torchscript=cfg.trust_torchscript)
        return _freeze(spec, cfg, model, weights_id(files, Path(cache_dir).expanduser() if cache_dir else None), str(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = adapter.build(spec, cfg.size)
    return _freeze(spec, cfg, model, "random-init-" + state_dict_id(model), "random-init")


def build_vfm(spec: VfmSpec, cfg: VfmConfig, cache_dir: str | Path | None = None, meta: bool = False) -> Vfm:
    """Build the VFM of ``spec`` as configured by ``cfg`` (the ``vfm`` section) through its plugin's factory.

    ``meta=True`` builds the architecture on the meta device without weights (dry runs): shapes
    and parameter counts are real, ``weights_id`` is 'meta', nothing is read or downloaded.
    """
    if meta and spec.adapter is None:  # a VFM with its own factory: its random-init architecture (on the CPU:
        import dataclasses  # a factory may compute with its tensors), nothing read or downloaded

        with torch.device("cpu"):
            return spec.factory(spec, dataclasses.replace(cfg, pretrained=False, weights=""), cache_dir)
    if meta:
        _check_config(spec, cfg)
        with torch.device("meta"):
            model = spec.adapter.build(spec, cfg.size)
        return _freeze(spec, cfg, model, "meta", "meta")
    vfm = spec.factory(spec, cfg, cache_dir)
    if not isinstance(vfm, Vfm):
        raise TypeError(f"the factory of vfm {spec.name!r} returned {type(vfm).__name__}, not a vfmbench.interfaces.Vfm")
    if not isinstance(vfm, FrozenVfm):  # library ViTs (adapters) have one width by construction
        check_token_widths(vfm)
    return vfm


def check_token_widths(vfm: Vfm) -> None:
    """The one-width rule: every tapped layer (``vfm.default_layers``) gives [B, h*w, D] tokens of one
    width ``D == vfm.embed_dim`` on one grid (the tokenizers' latent heads read all taps with one
    projection). Checked with one black image at ``vfm.spec.resolution``; a ``UserError`` otherwise."""
    res = int(getattr(vfm.spec, "resolution", 0) or 224)
    with torch.no_grad():
        tokens = vfm(torch.zeros(1, 3, res, res, dtype=torch.uint8), layers=tuple(vfm.default_layers))
    h, w = tokens.grid
    shapes = {i: tuple(t.shape) for i, t in tokens.layers.items()}
    bad = {i: s for i, s in shapes.items() if len(s) != 3 or s[1] != h * w or s[2] != vfm.embed_dim}
    if bad or set(shapes) != set(vfm.default_layers):
        raise UserError(
            f"vfm {vfm.spec.name!r} breaks the one-width rule: its tapped layers {list(vfm.default_layers)} give tokens "
            f"{shapes} on grid {tokens.grid}, but every tap must be [B, h*w, embed_dim={vfm.embed_dim}] on one grid "
            "(docs/vfms.md, 'One width'): project the taps to one width in the VFM's factory, or tap layers of one width (vfm.layers)"
        )


def vfm_param_count(spec: VfmSpec, size: str = "full") -> int:
    """Parameters of the architecture at ``size``, built on the meta device (no weights, no download)."""
    if spec.adapter is None:
        raise TypeError(f"vfm spec {spec.name!r} has no adapter to build its architecture from")
    with torch.device("meta"):
        model = spec.adapter.build(spec, size)
    return sum(p.numel() for p in model.parameters())


def builtin_vfm_spec(**fields: Any) -> VfmSpec:
    """The ``VfmSpec`` of a built-in VFM plugin: built by ``frozen_vfm``, version '1', tapped at the
    first, middle and last layer (0, depth // 2, -1); ``fields`` give the rest and may override these."""
    defaults = dict(factory=frozen_vfm, version="1", default_layers=(0, fields["depth"] // 2, -1))
    return VfmSpec(**{**defaults, **fields})
