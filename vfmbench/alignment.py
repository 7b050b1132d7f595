"""Targets of diffusion-side VFM alignment (REPA, REG): an alignment VFM's patch tokens of one layer,
resampled to the diffusion model's token grid, and its class token, for every training image and
for the image's horizontal flip (the runner trains on either latent at random and picks the
matching targets).

A diffusion model asks for them with ``alignment_request()``, a dict with the keys of
``AlignmentRequest``; the runner passes what ``alignment_targets`` returns into every training
batch as the extras ``align_tokens`` [B, N, D] (and ``align_cls`` [B, D] when ``prefix``).

The alignment VFM is any registered VFM. In smoke runs (``run.smoke``) it takes the size and the
``pretrained`` switch of the run's ``vfm`` section (a tiny random-init model of the same library
class); otherwise it is the full-size pretrained model, from ``weights`` when given, else from the
library's cache. Features come from the on-disk feature cache (``features='cache'``: computed once
per dataset, split, flip and VFM, stored as float16 safetensors shards, held in memory during
training) or are computed for each batch (``features='online'``, for datasets whose tokens do not
fit in memory: DINOv2-B tokens of ImageNet and its flips take about 1 TB in float16).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from .config import RunConfig, VfmConfig
from .errors import UserError
from .feature_cache import CacheStats, cached_tokens, cached_tokens_and_prefix
from .interfaces import Vfm
from .plugins import Host
from .vfm import build_vfm, target_size

FEATURE_SOURCES = ("cache", "online")
CACHE_DTYPE = torch.float16


@dataclass(frozen=True)
class AlignmentRequest:
    """What a diffusion model needs: ``vfm`` name, its ``layer`` (vfmbench index convention), whether
    the class token is needed (``prefix``), a ``weights`` path for non-smoke runs, the expected
    width ``dim`` (0 = any), the model's token ``grid`` and the ``features`` source."""

    vfm: str
    layer: int = -1
    prefix: bool = False
    weights: str = ""
    dim: int = 0
    grid: tuple[int, int] = (0, 0)
    features: str = "cache"

    @classmethod
    def parse(cls, request: Mapping[str, Any]) -> "AlignmentRequest":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(request) - names)
        if unknown:
            raise ValueError(f"alignment_request() has unknown keys {unknown}; known: {sorted(names)}")
        req = cls(**{**request, "grid": tuple(int(g) for g in request.get("grid", (0, 0)))})
        if req.features not in FEATURE_SOURCES:
            raise UserError(f"alignment features must be one of {', '.join(FEATURE_SOURCES)}, got {req.features!r}")
        if len(req.grid) != 2 or min(req.grid) < 1:
            raise ValueError(f"alignment_request() must give the model's token grid (h, w), got {req.grid}")
        return req


def vfm_config(cfg: RunConfig, req: AlignmentRequest) -> VfmConfig:
    """The alignment VFM's settings: the run's vfm size/pretrained switch in smoke runs, else full and pretrained."""
    if cfg.run.smoke:
        return VfmConfig(name=req.vfm, weights=req.weights, size=cfg.vfm.size, pretrained=cfg.vfm.pretrained or bool(req.weights))
    return VfmConfig(name=req.vfm, weights=req.weights, size="full", pretrained=True)


def build_alignment_vfm(host: Host, cfg: RunConfig, req: AlignmentRequest, device: torch.device, cache_dir: str | Path | None) -> Vfm:
    """The frozen alignment VFM on ``device``, checked against the request (layer, width, class token)."""
    spec = host.vfms.get(req.vfm)
    vcfg = vfm_config(cfg, req)
    vfm = build_vfm(spec, vcfg, cache_dir=cache_dir).to(device)
    vfm.hidden_index(req.layer)  # UserError when out of range
    if req.dim and vfm.embed_dim != req.dim:
        raise UserError(
            f"the alignment VFM {vfm.spec.name!r} ({vcfg.size}) has width {vfm.embed_dim}, but the diffusion model "
            f"projects to {req.dim}: set diffusion.args.align_dim={vfm.embed_dim}"
        )
    if req.prefix and getattr(vfm, "num_prefix_tokens", 0) < 1:
        raise UserError(
            f"the alignment VFM {vfm.spec.name!r} has no class token, which REG needs: choose one with a class token "
            "(dinov2-*, clip-*, mae-*, eva-clip-*) in diffusion.args.align_vfm"
        )
    return vfm


def vfm_grid(vfm: Vfm, resolution: int) -> tuple[int, int]:
    """The VFM's token grid for square images of ``resolution`` px."""
    n = target_size(resolution, float(vfm.input_scale), vfm.patch_size) // vfm.patch_size
    return (n, n)


def resample_tokens(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], chunk: int = 1024) -> torch.Tensor:
    """[N, h*w, D] tokens on ``grid`` -> [N, H*W, D] on ``target``, in the input dtype.

    Block averages when each side shrinks by an integer factor (e.g. 8x8 -> 4x4), else bilinear
    interpolation (antialiased where a side shrinks). The identity when the grids match.
    """
    (h, w), (th, tw) = tuple(grid), tuple(target)
    if (h, w) == (th, tw):
        return tokens
    if tokens.shape[1] != h * w:
        raise ValueError(f"{tokens.shape[1]} tokens do not fill a {h}x{w} grid")
    out = []
    for start in range(0, tokens.shape[0], chunk):
        x = tokens[start : start + chunk].float().transpose(1, 2).reshape(-1, tokens.shape[2], h, w)
        if h % th == 0 and w % tw == 0:
            y = F.adaptive_avg_pool2d(x, (th, tw))
        else:
            y = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=th < h or tw < w)
        out.append(y.flatten(2).transpose(1, 2).to(tokens.dtype))
    return torch.cat(out)


class CachedTargets:
    """Alignment targets of every training item held in memory (CPU), for the item and its flip."""

    def __init__(self, tokens: torch.Tensor, tokens_flip: torch.Tensor, cls: torch.Tensor | None = None,
                 cls_flip: torch.Tensor | None = None):
        self.tokens, self.tokens_flip, self.cls, self.cls_flip = tokens, tokens_flip, cls, cls_flip

    def __call__(self, idx: torch.Tensor, use_flip: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        i, f = idx.cpu(), use_flip.cpu()
        out = {"align_tokens": torch.where(f.view(-1, 1, 1), self.tokens_flip[i], self.tokens[i]).to(device, torch.float32)}
        if self.cls is not None:
            out["align_cls"] = torch.where(f.view(-1, 1), self.cls_flip[i], self.cls[i]).to(device, torch.float32)
        return out


class OnlineTargets:
    """Alignment targets computed by the VFM for each batch from the training images."""

    def __init__(self, vfm: Vfm, req: AlignmentRequest, images: Callable[[torch.Tensor], torch.Tensor]):
        self.vfm, self.req, self.images = vfm, req, images

    def __call__(self, idx: torch.Tensor, use_flip: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        x = self.images(idx)
        x = torch.where(use_flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        out = self.vfm(x, [self.req.layer])
        tokens = resample_tokens(out.layers[self.req.layer], out.grid, self.req.grid)
        res = {"align_tokens": tokens.to(device, torch.float32)}
        if self.req.prefix:
            res["align_cls"] = out.prefix[self.req.layer][:, 0].to(device, torch.float32)
        return res


def alignment_targets(
    host: Host,
    cfg: RunConfig,
    request: Mapping[str, Any],
    *,
    device: torch.device,
    cache_dir: str | Path,
    key_fields: Mapping[str, Any],
    batches: Callable[[bool], Iterable[torch.Tensor]],
    images: Callable[[torch.Tensor], torch.Tensor],
    stats: CacheStats | None = None,
) -> CachedTargets | OnlineTargets:
    """A callable ``(idx, use_flip, device) -> extras`` for the training loop's batches.

    ``key_fields`` names the training set (``dataset``, ``split``, ``resolution``, ``images``: see
    ``vfmbench.feature_cache``); ``batches(flip)`` yields its uint8 images in index order, flipped
    horizontally when ``flip``; ``images(idx)`` returns the uint8 images of some indices (online mode).
    Cache entries live under ``cache_dir/vfm-features`` (as the runner's tokenizer token cache), keyed with ``hflip``.
    """
    req = AlignmentRequest.parse(request)
    vfm = build_alignment_vfm(host, cfg, req, device, cache_dir)
    if req.features == "online":
        return OnlineTargets(vfm, req, images)
    grid = vfm_grid(vfm, int(key_fields["resolution"]))
    root = Path(cache_dir) / "vfm-features"
    parts: dict[bool, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for flip in (False, True):
        fields = {**key_fields, "hflip": flip}
        source = (lambda f=flip: batches(f))
        if req.prefix:
            tokens, prefix = cached_tokens_and_prefix(vfm, [req.layer], fields, source, root, dtype=CACHE_DTYPE, stats=stats)
            cls = prefix[req.layer][:, 0].contiguous()
        else:
            tokens, cls = cached_tokens(vfm, [req.layer], fields, source, root, dtype=CACHE_DTYPE, stats=stats), None
        parts[flip] = (resample_tokens(tokens[req.layer], grid, req.grid), cls)
    return CachedTargets(parts[False][0], parts[True][0], parts[False][1], parts[True][1])
