"""Typed run configuration: a preset, then a YAML file, then ``--set a.b=c`` overrides.

Every section is a dataclass; an unknown key is an error naming the key and the nearest valid
ones, and a value of the wrong type is an error naming the expected type. A component's own
arguments (``tokenizer.args``, ``decoder.args``, ``diffusion.args``) are validated against the
dataclass its spec declares (``spec.config``). The resolved config is saved with every run.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import UserError, did_you_mean

# The built-in stages (vfmbench.stages), in plan order; plugins may register more.
STAGES = ("tokenizer", "recon-eval", "latents", "latent-eval", "probe", "diffusion", "sample", "gen-eval", "results")


@dataclass(frozen=True)
class RunSection:
    seed: int = 0
    out: str = "runs"  # parent folder of run directories
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16: autocast of training forwards, encoding and decoding (docs/performance.md)
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    stages: list[str] = field(default_factory=list)  # [] = every registered stage (vfmbench.planner)
    cache_dir: str = ""  # features, reference statistics, smoke weights; default ~/.cache/vfmbench
    smoke: bool = False  # random-init weights are allowed; every number is labelled 'smoke'
    tf32: bool = False  # TF32 tensor cores for float32 matmuls and convolutions (CUDA, Ampere and later)
    compile: str = "off"  # off | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs: torch.compile of trained components
    compile_backend: str = "inductor"  # a torch.compile backend (aot_eager to debug)
    grad_checkpointing: bool = False  # recompute heavy blocks' activations in backward (trained components must support it)
    channels_last: bool = False  # NHWC memory format for conv-heavy components that support it
    allow_divergence: bool = False  # finish a diverged stage instead of stopping; its rows carry diverged: true (vfmbench.divergence)
    max_skipped_fraction: float = 0.1  # a training stage diverges when more of its steps than this share are skipped

    def __post_init__(self) -> None:
        from .perf import check_compile, check_precision

        check_precision(self.precision)
        check_compile(self.compile, self.compile_backend)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "shapes"
    root: str = ""  # dataset root (imagefolder: root/{train,val}/<class>/*)
    resolution: int = 256
    train_images: int = 0  # 0 = the whole split
    val_images: int = 0  # 0 = the whole split
    num_workers: int = 0  # DataLoader worker processes decoding images (0 = in the main process)
    seed: int = 0  # procedural datasets: generation seed
    skip_corrupt: bool = False  # skip (and count) images that cannot be decoded instead of stopping
    shuffle_buffer: int = 1000  # webdataset streaming: encoded samples in each worker's shuffle buffer (0 = shard order)
    train_transform: str = "adm-center-crop"  # images a tokenizer trains on: adm-center-crop | vfm-vae-random-crop (vfmbench.transforms)
    eval_transform: str = "adm-center-crop"  # the val split: adm-center-crop | resize-center-crop (a protocol field of reconstruction rows)
    min_short_side: int = 0  # tokenizer training: only images whose short side is at least this (VFM-VAE: 256); 0 = all


@dataclass(frozen=True)
class VfmConfig:
    name: str = "siglip"
    weights: str = ""  # local file or folder; else the library's cache; else an error
    size: str = "full"  # full | tiny (the same library architecture at CPU-test size)
    pretrained: bool = True  # False = random init (allowed only with run.smoke)
    layers: list[int] = field(default_factory=list)  # [] = the spec's default taps
    input_scale: float = 0.0  # 0 = the spec's resize factor
    cache_features: str = "auto"  # auto | always | never: VFM tokens of evaluated splits cached on disk
    cache_max_gib: float = 4.0  # 'auto' caches a split only when its tokens fit in this size
    trust_torchscript: bool = False  # read a TorchScript archive as vfm.weights (loading one runs its code; docs/security.md)


@dataclass(frozen=True)
class TrainConfig:
    images: int = 0  # training length, counted in images
    batch_size: int = 64  # global batch = per-device batch x world size x grad_accum
    grad_accum: int = 1
    lr: float = 1e-4
    ema_halflife_images: float = 0.0  # 0 = no EMA
    ckpt_every_images: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2  # the newest training checkpoints kept (resume falls back to an older one if the newest is unreadable)
    log_every_images: int = 0  # 0 = every ~1% of training
    precision: str = ""  # this stage's training precision (fp32 | bf16 autocast); "" = run.precision


@dataclass(frozen=True)
class TokenizerConfig:
    name: str = "vfm-vae"
    weights: str = ""  # load instead of training (tokenizer stage then only loads)
    args: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class DecoderConfig:
    name: str = ""  # '' = the tokenizer's default decoder
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleConfig:
    num_images: int = 50000
    sampler: str = "euler"  # euler | heun | euler-maruyama
    steps: int = 250
    cfg_scale: float = 1.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    timestep_shift: float = 1.0  # LightningDiT's s: t' = s t / (1 + (s - 1) t), t = 0 noise (s < 1: more steps near noise)
    guided_channels: int = 0  # CFG on the first n latent channels only (LightningDiT: 3); 0 = all
    joint_cfg_scale: float | None = None  # REG's cls_cfg_scale for the class token; None = cfg_scale, <= 0 = unguided
    label_sampling: str = "random"  # random | balanced
    batch_size: int = 64
    precision: str = ""  # fp32 | bf16 autocast of the sampler's model calls; "" = run.precision


@dataclass(frozen=True)
class DiffusionConfig:
    name: str = "flow-dit"
    args: dict[str, Any] = field(default_factory=dict)
    weights: str = ""  # trained or released weights (vfmbench.diffusion_weights): the diffusion stage is skipped
    latent_stats: str = ""  # released model's latents_stats.pt ({mean, std}) for de-normalising samples; '' = the tokenizer's
    latent_multiplier: float = 1.0  # LightningDiT's latent_multiplier: latent = sample * std / multiplier + mean
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass(frozen=True)
class ProbeConfig:
    pooling: str = "mean"  # mean | flatten
    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 1024


@dataclass(frozen=True)
class LatentMetricsConfig:
    """The ``latent-eval`` stage (vfmbench.latent_eval; docs/latent-metrics.md)."""

    images: int = 0  # val images whose posterior means are measured; 0 = the whole val split
    k: int = 10  # LNC nearest neighbours
    viv_iterations: int = 5  # Kronecker flip-flop iterations
    twonn_fraction: float = 0.9  # share of the r2/r1 ratios TwoNN fits
    masks: str = ""  # ImageNet-S-layout foreground masks <class>/<image>.png: SRSS and masked LNC pooling
    srss_min_fraction: float = 0.25  # SRSS keeps images with this share of foreground and of background cells (iREPA: 64/256)
    uniformity: bool = False  # t-SNE uniformity (slow; on in the paper presets)
    uniformity_points: int = 10000
    uniformity_repeats: int = 10
    equivariance_images: int = 1000  # val images of the equivariance error (0 = off)
    ifid_neighbours: int = 10  # iFID: cosine neighbours among the train latents
    ifid_alpha: float = 0.5  # iFID: slerp weight


@dataclass(frozen=True)
class MetricsConfig:
    names: list[str] = field(default_factory=list)  # [] = every registered metric of each family
    inception_weights: str = ""  # torch-fidelity Inception file; default: $TORCH_HOME/hub/checkpoints
    reference: str = ""  # gFID reference: '' = the dataset's val split, or an ADM reference batch .npz
    lpips_weights: str = ""  # torchvision VGG16 file for LPIPS; default: $TORCH_HOME/hub/checkpoints
    batch_size: int = 64
    recon_images: int = 50000  # val images reconstructed for rFID / PSNR
    isc_splits: int = 10
    isc_split_order: str = "shuffled"  # shuffled (torch-fidelity, RandomState(2020)) | consecutive (ADM evaluator)
    ssim_range: str = "[-1, 1]"  # SSIM's image range: [-1, 1] with data range 2 (VFM-VAE) | [0, 1] with data range 1
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    cache_image_features: bool = True  # Inception/LPIPS outputs of candidate images cached by their pixels' hash
    latent: LatentMetricsConfig = field(default_factory=LatentMetricsConfig)


@dataclass(frozen=True)
class ZooConfig:
    root: str = ""  # folder of released tokenizers, one subfolder per zoo entry (ROOT/NAME); docs/zoo.md


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    vfm: VfmConfig = field(default_factory=VfmConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    # Per-component default arguments, keyed by component name (presets use this so that e.g.
    # --tokenizer kl-vae picks up the preset's kl-vae sizes); ``<section>.args`` wins over it.
    component_args: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def sample_precision(self) -> str:
        """The precision sampling runs in: ``diffusion.sample.precision``, else ``run.precision``."""
        return self.diffusion.sample.precision or self.run.precision


# ---------------------------------------------------------------------------------------------
# Merging and validation


def deep_merge(base: dict, over: Mapping) -> dict:
    """Recursive dict merge; ``over`` wins. Neither input is modified."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_set(item: str) -> dict:
    """``a.b.c=value`` -> {'a': {'b': {'c': value}}}; the value is parsed as YAML (1e-4, [0, 12, -1], true)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value, e.g. --set data.resolution=128")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {item!r}: the key {key!r} is not a dotted path like data.resolution")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"--set {item!r}: the value is not valid YAML ({e.problem})") from None
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"config file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping of sections (run:, data:, ...), not {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise UserError(f"config key {where!r} is a section; give it a mapping, not {value!r}")
        return build_dataclass(tp, value, where)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise UserError(f"config key {where!r} expects a list of {_type_name(inner)}, got {value!r} (write e.g. [0, 12, -1])")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        inner = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {where!r} expects a list, got {value!r}")
        return tuple(_coerce(v, inner[0] if inner else Any, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"config key {where!r} expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key {where!r} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise UserError(f"config key {where!r} expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise UserError(f"config key {where!r} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config key {where!r} expects a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def build_dataclass(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """Instantiate ``cls`` from a mapping: unknown keys and wrong types are ``UserError``s."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise UserError(f"unknown config key {path!r}: {did_you_mean(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def resolve(layers: list[Mapping[str, Any]], stage_names: Iterable[str] = STAGES) -> RunConfig:
    """Merge config layers in order and validate them into a ``RunConfig``; ``run.stages`` must name
    stages of ``stage_names`` (the registered stages: ``host.stages.names()``; default the built-ins)."""
    merged: dict = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    cfg = build_dataclass(RunConfig, merged)
    stage_names = tuple(stage_names)
    bad = [s for s in cfg.run.stages if s not in stage_names]
    if bad:
        raise UserError(f"unknown stage {bad[0]!r} in run.stages: {did_you_mean(bad[0], stage_names)}")
    return cfg


def validate_args(spec_config: type | None, args: Mapping[str, Any], where: str) -> Any:
    """Validate a component's ``args`` mapping against its spec's config dataclass."""
    if spec_config is None:
        if args:
            raise UserError(f"{where} takes no arguments, got {sorted(args)}")
        return None
    return build_dataclass(spec_config, args, where)


def config_hash(cfg_dict: Mapping[str, Any], n: int = 10) -> str:
    """Stable hash of a resolved config (the run directory's suffix)."""
    blob = json.dumps(cfg_dict, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
