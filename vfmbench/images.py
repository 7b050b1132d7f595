"""Pictures people look at: image grids and training curves as PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_write


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 NCHW -> uint8 HWC grid with ``pad`` px white borders."""
    if images.dtype != torch.uint8:
        raise TypeError("make_grid expects uint8 NCHW images")
    n, c, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    if c == 1:
        arr = np.repeat(arr, 3, axis=-1)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, min_size: int = 256) -> Path:
    """Save a grid PNG, upscaled (nearest) so that small images stay visible."""
    grid = make_grid(images, nrow)
    img = Image.fromarray(grid)
    if img.width < min_size * 2:
        f = max(1, (min_size * 2) // img.width)
        img = img.resize((img.width * f, img.height * f), Image.NEAREST)
    return atomic_write(path, lambda p: img.save(p, format="PNG"))


def save_pairs(inputs: torch.Tensor, recons: torch.Tensor, path: str | Path, n: int = 8) -> Path:
    """Inputs (top row) over reconstructions (bottom row)."""
    n = min(n, inputs.shape[0])
    return save_grid(torch.cat([inputs[:n], recons[:n]]), path, nrow=n)


def plot_curves(log_path: str | Path, out_path: str | Path, keys: list[str] | None = None, title: str = "") -> Path | None:
    """Plot the loss curves of a ``train_log.jsonl`` against images seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    keys = keys or sorted({k for r in rows for k in r if k.endswith("/loss") or k.endswith("/l1")})
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for k in keys:
        pts = [(r["nimg"], r[k]) for r in rows if k in r]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, label=k)
    ax.set_xlabel("images seen")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = atomic_write(out_path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out
