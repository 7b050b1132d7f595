"""Latent metrics that need the tokenizer: the equivariance error (EQ-VAE App. C.3) and the
interpolated latents of iFID (Xu et al., arXiv 2603.05630, ``evalvae.py`` as described in
diffusability.md §4). Model calls go through callables, so the numerics stay testable.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

ROTATIONS = (1, 2, 3)  # multiples of 90 degrees: pi/2, pi, 3pi/2
SCALES = (0.25, 0.5, 0.75)


def transforms(resolution: int, downsample: int) -> list[tuple[str, str, float]]:
    """(name, group, parameter) of the EQ-VAE transform set. A scale applies when the scaled image
    still maps to a whole latent grid (``resolution * s`` a multiple of ``downsample``)."""
    out = [(f"rot{90 * k}", "rotation", float(k)) for k in ROTATIONS]
    for s in SCALES:
        size = resolution * s
        if size == int(size) and int(size) % downsample == 0 and size > 0:
            out.append((f"scale{s:g}", "scale", s))
    return out


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def apply(x: torch.Tensor, group: str, p: float) -> torch.Tensor:
    """The transform on an NCHW tensor: uint8 images stay uint8 (rounded), float latents stay float."""
    if group == "rotation":
        return torch.rot90(x, int(p), dims=(-2, -1))
    size = int(round(x.shape[-1] * p))
    if x.dtype == torch.uint8:
        return _resize(x.float(), size).round().clamp(0, 255).to(torch.uint8)
    return _resize(x, size)


def equivariance_errors(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                        transforms_: list[tuple[str, str, float]], skipped: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Per image and transform tau: ||tau(E(x)) - E(tau(x))||^2 / ||E(tau(x))||^2, with E the
    posterior mean. Returns {group: [n_transforms_in_group * B] errors}. A scaled image the encoder
    cannot take (e.g. a ViT at a fixed input size) leaves that transform out, its error message in
    ``skipped`` (when given; otherwise it raises)."""
    with torch.no_grad():
        z = encode(images).float()
        out: dict[str, list[np.ndarray]] = {}
        for name, group, p in transforms_:
            try:
                target = encode(apply(images, group, p)).float()
            except (RuntimeError, ValueError) as e:
                if skipped is None or group != "scale":
                    raise
                skipped[name] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            moved = apply(z, group, p)
            if moved.shape != target.shape:
                raise ValueError(f"transform {group} {p}: transformed latent {tuple(moved.shape)} vs latent of the transformed image {tuple(target.shape)}")
            num = (moved - target).pow(2).flatten(1).sum(1)
            den = target.pow(2).flatten(1).sum(1).clamp_min(1e-12)
            out.setdefault(group, []).append((num / den).double().cpu().numpy())
    return {g: np.concatenate(v) for g, v in out.items()}


# -- iFID ------------------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation of each row pair (flattened), angle from the normalised vectors;
    nearly parallel pairs fall back to linear interpolation."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (F.normalize(fa, dim=1) * F.normalize(fb, dim=1)).sum(1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    lin = so.abs() < 1e-6
    wa = torch.where(lin, torch.full_like(so, 1 - alpha), torch.sin((1 - alpha) * omega) / torch.where(lin, torch.ones_like(so), so))
    wb = torch.where(lin, torch.full_like(so, alpha), torch.sin(alpha * omega) / torch.where(lin, torch.ones_like(so), so))
    return (wa[:, None] * fa + wb[:, None] * fb).reshape(a.shape).to(a.dtype)


def interpolation_partners(val: Any, train: Any, k: int = 10, seed: int = 0, block: int = 256,
                           device: torch.device | str = "cpu") -> np.ndarray:
    """For each val latent: its top-``k`` cosine nearest train latents (flattened, float32 on
    ``device``), then one of them drawn with probabilities softmax(-MSE) (seeded, on the CPU).
    Returns train indices [N_val]."""
    v = torch.as_tensor(np.asarray(val) if not torch.is_tensor(val) else val).flatten(1).float()
    t = torch.as_tensor(np.asarray(train) if not torch.is_tensor(train) else train).flatten(1).float()
    k = min(k, t.shape[0])
    t_dev = t.to(device)
    tn = F.normalize(t_dev, dim=1)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, v.shape[0], block):
        vb = v[i : i + block].to(device)
        top = (F.normalize(vb, dim=1) @ tn.T).topk(k, dim=1).indices
        mse = (t_dev[top] - vb[:, None, :]).double().pow(2).mean(-1).cpu()
        pick = torch.multinomial(torch.softmax(-mse, dim=1), 1, generator=gen)[:, 0]
        out.append(top.cpu().gather(1, pick[:, None])[:, 0])
    return torch.cat(out).numpy()
