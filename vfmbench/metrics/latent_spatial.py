"""Spatial structure of latents (LDS, CDS, SRSS: iREPA's ``spatial_metrics.py`` definitions),
foreground masks in the ImageNet-S layout, and VA-VAE's distribution-uniformity measure.

Spatial metrics read each image's tokens (the C-vectors of its H x W grid), L2-normalised, and
their cosine Gram matrix G; distances are Manhattan on the grid (diffusability.md §3.4):

* LDS  = mean cosine of 4-neighbours - mean cosine of pairs at distance >= 6;
* CDS  = -(slope of the mean cosine against d, d = 1..8, over the distances the grid has);
* SRSS = per foreground anchor, mean cosine to foreground tokens at d = 1 minus mean cosine to
  background tokens at d >= 6; averaged over anchors, then images.

Uniformity (diffusability.md §3.5, ``hustvl/LightningDiT tools/latent_vis.py``): t-SNE of random
single-token vectors, a Gaussian KDE evaluated at the embedded points, and the density's
coefficient of variation, Gini coefficient and normalised entropy, averaged over repeats.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .latent import EPS, as_array

FAR = 6  # "distant" pairs: Manhattan distance >= 6 cells
CDS_MAX_D = 8


def grid_distances(h: int, w: int) -> np.ndarray:
    """[H*W, H*W] Manhattan distances between grid cells (row-major)."""
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r, c = ii.reshape(-1), jj.reshape(-1)
    return np.abs(r[:, None] - r[None, :]) + np.abs(c[:, None] - c[None, :])


def _tokens(z: np.ndarray) -> np.ndarray:
    """[B, C, H, W] -> [B, H*W, C] L2-normalised tokens."""
    t = z.reshape(z.shape[0], z.shape[1], -1).transpose(0, 2, 1)
    return t / np.clip(np.linalg.norm(t, axis=2, keepdims=True), EPS, None)


def spatial_structure(z: Any, block: int = 256) -> dict[str, float]:
    """LDS and CDS of [N, C, H, W] latents. The per-image means are over the same pairs in every
    image, so the image average equals the mean of the summed Gram matrices over each pair set."""
    z = as_array(z)
    n, _, h, w = z.shape
    d = grid_distances(h, w)
    if d.max() < FAR:
        raise ValueError(f"LDS needs cell pairs at distance >= {FAR}; a {h}x{w} grid has none")
    gsum = np.zeros((h * w, h * w))
    for i in range(0, n, block):
        t = _tokens(z[i : i + block]).transpose(1, 0, 2).reshape(h * w, -1)  # [S, B*C]: one GEMM sums the images' Gram matrices
        gsum += t @ t.T
    g = gsum / n
    lds = float(g[d == 1].mean() - g[d >= FAR].mean())
    ds = np.array([k for k in range(1, CDS_MAX_D + 1) if (d == k).any()])
    means = np.array([g[d == k].mean() for k in ds])
    slope = np.polyfit(ds.astype(np.float64), means, 1)[0]
    return {"lds": lds, "cds": float(-slope), "distances": float(len(ds))}


def srss(z: Any, masks: Any, min_fg: int = 0, min_bg: int = 0, block: int = 256) -> dict[str, float]:
    """Spatial-region semantic separation of [N, C, H, W] latents with foreground masks [N, H, W]
    (bool, at the latent grid). Images with fewer than ``min_fg`` foreground or ``min_bg``
    background cells are left out. Returns {'srss', 'images'} (images that contributed)."""
    z = as_array(z)
    fg_all = np.asarray(masks, dtype=bool)
    n, _, h, w = z.shape
    if fg_all.shape != (n, h, w):
        raise ValueError(f"masks must be [N, H, W] = {(n, h, w)}, got {fg_all.shape}")
    d = grid_distances(h, w)
    near_d, far_d = (d == 1)[None], (d >= FAR)[None]
    per_image = []
    for i in range(0, n, block):
        fg = fg_all[i : i + block].reshape(-1, h * w)
        ok = (fg.sum(1) >= max(min_fg, 1)) & ((~fg).sum(1) >= max(min_bg, 1))
        if not ok.any():
            continue
        fg = fg[ok]
        t = _tokens(z[i : i + block][ok])
        g = np.matmul(t, t.transpose(0, 2, 1))
        near = near_d & fg[:, None, :]
        far = far_d & ~fg[:, None, :]
        nn, nf = near.sum(-1), far.sum(-1)
        valid = fg & (nn > 0) & (nf > 0)
        score = (g * near).sum(-1) / np.maximum(nn, 1) - (g * far).sum(-1) / np.maximum(nf, 1)
        for b in range(fg.shape[0]):
            if valid[b].any():
                per_image.append(score[b][valid[b]].mean())
    if not per_image:
        raise ValueError("SRSS: no image has foreground anchors with both near-foreground and far-background cells")
    return {"srss": float(np.mean(per_image)), "images": float(len(per_image))}


# -- foreground masks ----------------------------------------------------------------------------


def mask_cells(mask: np.ndarray, grid: int) -> np.ndarray:
    """A [res, res] bool mask -> [grid, grid] by binary max-pooling (a cell is foreground if any pixel is)."""
    res = mask.shape[0]
    if res % grid:
        raise ValueError(f"mask resolution {res} is not a multiple of the latent grid {grid}")
    f = res // grid
    return mask.reshape(grid, f, grid, f).any(axis=(1, 3))


def load_masks(dataset: Any, folder: str | Path, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground masks of an ``imagefolder`` dataset from an ImageNet-S-layout folder:
    ``folder/<class>/<image stem>.png`` whose class id is R + 256 * G (0 background, 1000 ignored).
    Each mask gets the images' geometry (the ADM centre crop, nearest-neighbour) and is max-pooled to
    the latent grid. Returns ([N, grid, grid] bool, [N] bool: a mask file exists)."""
    from PIL import Image

    from vfmbench.errors import UserError

    folder = Path(folder)
    files = getattr(dataset, "files", None)
    res = getattr(dataset, "resolution", None)
    if files is None or res is None:
        raise UserError("metrics.latent.masks needs an image-folder dataset (file names to match the masks); use --dataset imagefolder")
    if not folder.is_dir():
        raise UserError(f"metrics.latent.masks={str(folder)!r} is not a folder; pass an ImageNet-S-layout folder <class>/<image>.png")
    out = np.zeros((len(files), grid, grid), dtype=bool)
    present = np.zeros(len(files), dtype=bool)
    for i, (rel, _) in enumerate(files):
        path = folder / Path(rel).with_suffix(".png")
        if not path.is_file():
            continue
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        # the image's geometry, on a label map (nearest: labels must not blend)
        arr = np.asarray(rgb).astype(np.int64)
        ids = arr[..., 0] + 256 * arr[..., 1]
        fg = Image.fromarray(((ids != 0) & (ids != 1000)).astype(np.uint8) * 255)
        while min(fg.size) >= 2 * res:
            fg = fg.resize(tuple(s // 2 for s in fg.size), resample=Image.NEAREST)
        scale = res / min(fg.size)
        fg = fg.resize(tuple(round(s * scale) for s in fg.size), resample=Image.NEAREST)
        m = np.asarray(fg) > 127
        top, left = (m.shape[0] - res) // 2, (m.shape[1] - res) // 2
        out[i] = mask_cells(m[top : top + res, left : left + res], grid)
        present[i] = True
    if not present.any():
        raise UserError(f"no mask in {str(folder)!r} matches an image of the dataset (expected <class>/<image stem>.png)")
    return out, present


# -- uniformity -----------------------------------------------------------------------------------


def density_stats(density: Any) -> dict[str, float]:
    """CV = std/mean; normalised entropy = -sum p log2 p / log2 n with p = d / sum d;
    Gini = sum_i (2i - n - 1) d_(i) / (n sum d) over the ascending order statistics."""
    d = np.sort(np.asarray(density, dtype=np.float64).reshape(-1))
    n = d.size
    total = d.sum()
    p = d / total
    nz = p[p > 0]
    return {
        "cv": float(d.std() / d.mean()),
        "entropy": float(-(nz * np.log2(nz)).sum() / np.log2(n)),
        "gini": float(((2 * np.arange(1, n + 1) - n - 1) * d).sum() / (n * total)),
    }


def uniformity(z_std: Any, points: int = 10_000, repeats: int = 10, seed: int = 0,
               perplexity: float = 30.0, iterations: int = 1000) -> dict[str, float]:
    """VA-VAE's uniformity of standardised latents [N, C, H, W]: per repeat, ``points`` random
    (image, position) C-vectors, t-SNE to 2-D, Gaussian KDE at the points, then ``density_stats``;
    the mean over repeats."""
    from scipy.stats import gaussian_kde
    from sklearn.manifold import TSNE

    z = as_array(z_std)
    n, c, h, w = z.shape
    acc: dict[str, list[float]] = {"cv": [], "entropy": [], "gini": []}
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        img, pos = rng.integers(0, n, points), rng.integers(0, h * w, points)
        x = z.reshape(n, c, h * w)[img, :, pos]
        emb = TSNE(n_components=2, perplexity=min(perplexity, (points - 1) / 3), max_iter=iterations,
                   random_state=seed + r).fit_transform(x)
        dens = gaussian_kde(emb.T)(emb.T)
        for k, v in density_stats(dens).items():
            acc[k].append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}
