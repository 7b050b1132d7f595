"""Per-image reconstruction scores of (input, reconstruction) pairs: PSNR, SSIM and LPIPS-VGG.

Data range. Both images arrive as uint8 NCHW. PSNR compares them as float64 in [0, 1] with
``data_range = 1.0``; PSNR is invariant to an affine map of both images with their data range, so
this equals the VFM-VAE protocol's [-1, 1] images with data range 2. SSIM is not: its luminance
term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) changes when the images are shifted, so the range
is a setting (``SSIM_RANGES``, recorded in the row's protocol): ``[-1, 1]`` with data range 2 is
VFM-VAE's ``tools/reconstruct/evaluate.py`` (torchmetrics ``StructuralSimilarityIndexMeasure(
data_range=2.0)`` on (x - 0.5) / 0.5); ``[0, 1]`` with data range 1 equals SSIM on uint8 with data
range 255 (a pure rescaling). On uniform-noise images the two differ by 0.2; on natural images less.
PSNR and SSIM go through torchmetrics' functional API (SSIM: Gaussian window sigma 1.5, 11 taps,
k1 0.01, k2 0.03, reflect padding, mean over channels and pixels). A pair of identical images has
PSNR +inf.

LPIPS-VGG (Zhang et al. 2018, v0.1): images mapped to [-1, 1], the LPIPS input scaling, VGG16
``features`` activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, each unit-normalised over
channels, squared differences weighted by the LPIPS linear layers (the official v0.1 weights that
torchmetrics ships in ``lpips_models/vgg.pth``), averaged over space and summed over layers. The
VGG16 backbone comes from torchvision's ImageNet file ``vgg16-397923af.pth`` (``metrics.lpips_weights``,
else torch hub's cache); without it only a smoke run may use a deterministic random backbone.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
import numpy as np
import torch
from torch import nn

from ..errors import MissingWeightsError
from .cache import file_sha256

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_SHA256_PREFIX = "397923af"
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILENAME
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices in vgg16.features of relu1_2 ... relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
SMOKE_SEED = 0
# metrics.ssim_range -> (offset, scale, data_range): SSIM on offset + scale * (uint8 / 255)
SSIM_RANGES = {"[-1, 1]": (-1.0, 2.0, 2.0), "[0, 1]": (0.0, 1.0, 1.0)}


def _pair_float(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, x in (("input", a), ("reconstruction", b)):
        if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.ndim != 4:
            raise TypeError(f"{name} images must be uint8 N x C x H x W tensors, got {getattr(x, 'dtype', type(x))}")
    if a.shape != b.shape:
        raise ValueError(f"image pairs must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.double() / 255.0, b.double() / 255.0


def psnr_per_image(images: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
    """[N] PSNR in dB of uint8 NCHW pairs (data range 1 on [0, 1] == data range 2 on [-1, 1])."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _pair_float(images, recon)
    v = peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return v.reshape(-1).cpu().numpy().astype(np.float64)


def ssim_per_image(images: torch.Tensor, recon: torch.Tensor, value_range: str = "[-1, 1]") -> np.ndarray:
    """[N] SSIM of uint8 NCHW pairs (torchmetrics defaults) with the images in ``value_range``
    (``SSIM_RANGES``: [-1, 1] with data range 2 as VFM-VAE, or [0, 1] with data range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if value_range not in SSIM_RANGES:
        raise ValueError(f"SSIM value range must be one of {sorted(SSIM_RANGES)}, got {value_range!r}")
    offset, scale, data_range = SSIM_RANGES[value_range]
    a, b = _pair_float(images, recon)
    v = structural_similarity_index_measure(offset + scale * b, offset + scale * a, data_range=data_range, reduction="none")
    return v.reshape(-1).cpu().numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# LPIPS-VGG


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layer for layer (same indices, so its state dict loads)."""
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            c = int(v)
    return nn.Sequential(*layers)


def _lin_weights_path() -> Path:
    import torchmetrics

    return Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "vgg.pth"


def resolve_vgg16_weights(path: str, smoke: bool) -> Path | None:
    """The VGG16 weights file: ``path``, else torch hub's cache; None = smoke random backbone."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingWeightsError(
                f"VGG16 weights file {str(p)!r} for LPIPS (metrics.lpips_weights) does not exist; download {VGG16_URL} "
                "and pass its path with --set metrics.lpips_weights=PATH"
            )
        return p
    hub = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME
    if hub.is_file():
        return hub
    if smoke:
        return None
    raise MissingWeightsError(
        f"VGG16 weights for LPIPS were not found (looked at: metrics.lpips_weights, empty; {hub}). Download "
        f"{VGG16_URL} and either put it at {hub} or pass --set metrics.lpips_weights=PATH; for a CPU smoke test, "
        "--set run.smoke=true uses a random backbone (its numbers are labelled smoke)"
    )


class LpipsVgg(nn.Module):
    """LPIPS-VGG distance of uint8 NCHW pairs -> [N] float64 numpy. ``weights_id`` and ``is_official``
    describe the backbone (``smoke-...`` for a random one)."""

    def __init__(self, weights: str = "", smoke: bool = False, cache_dir: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32):
        super().__init__()
        self.batch_size = int(batch_size)
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(ch, 1, kernel_size=1, bias=False) for ch in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        lin = torch.load(_lin_weights_path(), map_location="cpu", weights_only=True)
        for i, conv in enumerate(self.lins):
            conv.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        path = resolve_vgg16_weights(weights, smoke)
        if path is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SMOKE_SEED)
                for m in self.features.modules():
                    if isinstance(m, nn.Conv2d):  # torchvision's VGG init
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                        nn.init.zeros_(m.bias)
            h = hashlib.sha256()
            for k, v in self.features.state_dict().items():
                h.update(k.encode())
                h.update(v.numpy().tobytes())
            self.weights_id, self.is_official = "smoke-" + h.hexdigest()[:10], False
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")} or sd
            missing, unexpected = self.features.load_state_dict(feats, strict=False)
            if missing or unexpected:
                raise MissingWeightsError(
                    f"{str(path)!r} is not a torchvision VGG16 state dict (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                    f"use {VGG16_URL}"
                )
            sha = file_sha256(path, cache_dir)
            self.weights_id, self.is_official = sha[:16], sha.startswith(VGG16_SHA256_PREFIX)
        self.requires_grad_(False)
        self.eval()
        self.to(device)

    def distance(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """LPIPS of float images in [-1, 1] -> [N]."""
        h0, h1 = (x0 - self.shift) / self.scale, (x1 - self.shift) / self.scale
        total = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
        li = 0
        for idx, layer in enumerate(self.features[: LPIPS_TAPS[-1] + 1]):
            h0, h1 = layer(h0), layer(h1)
            if idx in LPIPS_TAPS:
                n0 = h0 / (h0.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                n1 = h1 / (h1.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[li]((n0 - n1).pow(2)).mean(dim=(1, 2, 3))
                li += 1
        return total

    @torch.no_grad()
    def forward(self, images: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
        if images.shape != recon.shape or images.dtype != torch.uint8 or recon.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise TypeError(f"LPIPS needs uint8 N x 3 x H x W pairs of one shape, got {tuple(images.shape)} and {tuple(recon.shape)}")
        dev = self.shift.device
        out = []
        for s in range(0, images.shape[0], self.batch_size):
            a = images[s : s + self.batch_size].to(dev).float() / 127.5 - 1.0
            b = recon[s : s + self.batch_size].to(dev).float() / 127.5 - 1.0
            out.append(self.distance(a, b).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def lpips_per_image(images: torch.Tensor, recon: torch.Tensor, weights: str = "", smoke: bool = False,
                    cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                    batch_size: int = 32) -> tuple[np.ndarray, str, bool]:
    """(per-image LPIPS-VGG, weights id, is the official backbone). Builds the network each call:
    keep an ``LpipsVgg`` to score many batches."""
    net = LpipsVgg(weights, smoke, cache_dir, device, batch_size)
    return net(images, recon), net.weights_id, net.is_official
