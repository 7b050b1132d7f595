"""``shapes``: the embedded default dataset: procedurally rendered, labelled, any resolution.

Each of the 10 classes is a fixed (shape, hue, texture) triple; everything else is drawn per
image: hue jitter (+-12 deg), saturation, brightness, the texture's period, angle and phase, the
shape's position, size and rotation, and a background of random colour with a linear gradient
and uniform pixel noise of random strength. Shapes are signed-distance functions, so edges are anti-aliased at
every resolution and the same index renders the same scene at any resolution.

Determinism: image ``i`` of split ``s`` is a pure function of ``(seed, s, i)`` (and the
resolution): its parameters and noise come from ``numpy.random.default_rng([seed, split_id, i])``
with split_id 0 for train and 1 for val, so the splits are independent streams. Labels are
``i % 10`` (every block of 10 consecutive images holds each class once). Rendering is vectorised
over pixels and over a batch (``__getitems__``, used by ``DataLoader``); the loops run over images
only to draw their parameters, and over the 10 classes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from vfmbench.config import DataConfig
from vfmbench.errors import UserError, did_you_mean
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import DatasetSpec

VERSION = "1"  # bump when the rendered pixels change (it is part of cache_id)
SPLITS = {"train": 0, "val": 1}
DEFAULT_LENGTH = {"train": 10000, "val": 1000}

# class -> (shape, hue in degrees, texture); the crescent (8) is drawn pale (low saturation)
CLASSES = (
    ("circle", 0, "solid"),
    ("square", 30, "stripes"),
    ("triangle", 58, "checker"),
    ("ring", 120, "dots"),
    ("cross", 180, "solid"),
    ("star", 225, "stripes"),
    ("diamond", 275, "checker"),
    ("hexagon", 310, "dots"),
    ("crescent", 90, "stripes"),
    ("heart", 345, "checker"),
)
NUM_CLASSES = len(CLASSES)
N_PARAMS = 17  # uniforms drawn per image (u[0] .. u[16] in render)


# ---------------------------------------------------------------------------------------------
# Signed distance functions (negative inside), on unit-size shapes in local coordinates


def _len(x, y):
    return np.sqrt(x * x + y * y)


def _box(x, y, bx, by):
    qx, qy = np.abs(x) - bx, np.abs(y) - by
    return _len(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _circle(x, y):
    return _len(x, y) - 0.9


def _square(x, y):
    return _box(x, y, 0.68, 0.68)


def _triangle(x, y):
    # equilateral triangle of circumradius 1 (Quilez's sdEquilateralTriangle with side sqrt(3))
    r, k = math.sqrt(3) / 2, math.sqrt(3)
    y = -y + 0.25  # centre the triangle's area, apex up
    x = np.abs(x) - r
    y = y + r / k
    fold = x + k * y > 0
    x, y = np.where(fold, (x - k * y) / 2, x), np.where(fold, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * r, 0)
    return -_len(x, y) * np.sign(y)


def _ring(x, y):
    return np.abs(_len(x, y) - 0.7) - 0.22


def _cross(x, y):
    return np.minimum(_box(x, y, 0.9, 0.28), _box(x, y, 0.28, 0.9))


def _star(x, y):
    # five-pointed star (Quilez's sdStar5), outer radius 1, inner ratio 0.45
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    r, rf = 1.0, 0.45
    x = np.abs(x)
    y = -y
    d = np.maximum(k1x * x + k1y * y, 0)
    x, y = x - 2 * d * k1x, y - 2 * d * k1y
    d = np.maximum(k2x * x + k2y * y, 0)
    x, y = x - 2 * d * k2x, y - 2 * d * k2y
    x = np.abs(x)
    y = y - r
    bax, bay = rf * -k1y - 0.0, rf * k1x - 1.0
    h = np.clip((x * bax + y * bay) / (bax * bax + bay * bay), 0, r)
    return _len(x - bax * h, y - bay * h) * np.sign(y * bax - x * bay)


def _diamond(x, y):
    # rhombus with half-diagonals 0.55 x 0.95 (Quilez's sdRhombus)
    bx, by = 0.55, 0.95
    x, y = np.abs(x), np.abs(y)
    h = np.clip(((bx - 2 * x) * bx - (by - 2 * y) * by) / (bx * bx + by * by), -1, 1)
    d = _len(x - 0.5 * bx * (1 - h), y - 0.5 * by * (1 + h))
    return d * np.sign(x * by + y * bx - bx * by)


def _hexagon(x, y):
    # regular hexagon with inradius 0.8 (Quilez's sdHexagon)
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    r = 0.8
    x, y = np.abs(x), np.abs(y)
    d = 2 * np.minimum(kx * x + ky * y, 0)
    x, y = x - d * kx, y - d * ky
    x = x - np.clip(x, -kz * r, kz * r)
    y = y - r
    return _len(x, y) * np.sign(y)


def _crescent(x, y):
    return np.maximum(_len(x, y) - 0.9, -(_len(x - 0.45, y - 0.1) - 0.7))


def _heart(x, y):
    # Quilez's sdHeart (spans y in [0, ~1.05]), centred and scaled to about unit radius
    s = 1.6
    x, y = np.abs(x) / s, (-y + 0.85) / s
    upper = y + x > 1.0
    d_up = _len(x - 0.25, y - 0.75) - math.sqrt(2) / 4
    m = 0.5 * np.maximum(x + y, 0)
    d_lo = np.sqrt(np.minimum((x) ** 2 + (y - 1.0) ** 2, (x - m) ** 2 + (y - m) ** 2)) * np.sign(x - y)
    return np.where(upper, d_up, d_lo) * s


SDF = {
    "circle": _circle, "square": _square, "triangle": _triangle, "ring": _ring, "cross": _cross,
    "star": _star, "diamond": _diamond, "hexagon": _hexagon, "crescent": _crescent, "heart": _heart,
}


# ---------------------------------------------------------------------------------------------
# Textures: 1 = foreground colour, 0 = secondary colour


def _texture(kind: str, x, y, period, angle, phase):
    if kind == "solid":
        return np.ones_like(x)
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = (x * ca + y * sa) / period + phase, (-x * sa + y * ca) / period + phase
    if kind == "stripes":
        return (u - np.floor(u) < 0.5).astype(np.float32)
    if kind == "checker":
        return 1.0 - ((np.floor(u) + np.floor(v)).astype(np.int32) & 1).astype(np.float32)
    # dots on a square lattice, radius 0.3 of the spacing
    du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
    return (du * du + dv * dv > 0.09).astype(np.float32)


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV (h in [0, 1)) -> RGB, each [N] -> [N, 3]."""
    k = np.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], axis=-1)
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


# ---------------------------------------------------------------------------------------------
# Dataset


class ShapesDataset(Dataset):
    """``(uint8 [3, R, R] tensor, int label)`` pairs; see the module docstring."""

    num_classes = NUM_CLASSES
    class_names = tuple(f"{shape}-{texture}" for shape, _, texture in CLASSES)

    def __init__(self, split: str = "train", resolution: int = 64, length: int = 0, seed: int = 0):
        if split not in SPLITS:
            raise UserError(f"dataset 'shapes' has no split {split!r}: {did_you_mean(split, SPLITS)}")
        if resolution < 8:
            raise UserError(f"dataset 'shapes' needs data.resolution >= 8, got {resolution}")
        if length < 0 or seed < 0:
            raise UserError("data.train_images / data.val_images and data.seed must be >= 0")
        self.split, self.resolution, self.seed = split, int(resolution), int(seed)
        self.length = int(length) or DEFAULT_LENGTH[split]
        self.cache_id = f"shapes:v{VERSION}:seed={self.seed}:split={split}:res={self.resolution}:n={self.length}"
        c = (np.arange(self.resolution, dtype=np.float32) + 0.5) / self.resolution * 2 - 1
        self._gy, self._gx = np.meshgrid(c, c, indexing="ij")  # image coordinates in (-1, 1), y down

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.render([index])
        return torch.from_numpy(images[0]), int(labels[0])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        images, labels = self.render(indices)
        return [(torch.from_numpy(im), int(y)) for im, y in zip(images, labels)]

    def _check(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for shapes/{self.split} of length {self.length}")
        return index

    def render(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Render a batch: (uint8 [N, 3, R, R], int64 labels [N])."""
        idx = [self._check(i) for i in indices]
        n, r = len(idx), self.resolution
        split_id = SPLITS[self.split]
        params = np.empty((n, N_PARAMS), dtype=np.float64)
        noise = np.empty((n, 3, r, r), dtype=np.float32)
        for j, i in enumerate(idx):
            rng = np.random.default_rng([self.seed, split_id, i])
            params[j] = rng.random(N_PARAMS)
            noise[j] = rng.random((3, r, r), dtype=np.float32)  # uniform: 4x cheaper than normal draws
        labels = np.asarray(idx, dtype=np.int64) % NUM_CLASSES
        u = params.T.astype(np.float32)  # one row per parameter

        # geometry: size (circumradius), centre keeping the shape inside, rotation
        size = 0.28 + 0.3 * u[0]
        cx = (2 * u[1] - 1) * (0.95 - size)
        cy = (2 * u[2] - 1) * (0.95 - size)
        rot = 2 * math.pi * u[3]
        # colours
        base_hue = np.array([CLASSES[k][1] for k in labels], dtype=np.float32) / 360.0
        hue = (base_hue + (u[4] - 0.5) * 24 / 360) % 1.0
        fg = _hsv_to_rgb(hue, 0.6 + 0.4 * u[5], 0.6 + 0.4 * u[6])
        crescent = labels == 8
        fg[crescent] = _hsv_to_rgb(hue[crescent], 0.25 + 0.2 * u[5][crescent], 0.8 + 0.2 * u[6][crescent])
        sec = fg * (0.15 + 0.3 * u[7])[:, None]
        bg = _hsv_to_rgb(u[8], 0.35 * u[9], 0.15 + 0.8 * u[10])
        grad_angle, grad_amp, noise_std = 2 * math.pi * u[11], 0.25 * u[12], 0.06 * u[13]
        period = 0.25 + 0.2 * u[14]
        tex_angle = math.pi * u[15]
        phase_u = u[16]

        # local (unit-size, rotated) coordinates: [N, R, R]
        dx = self._gx[None] - cx[:, None, None]
        dy = self._gy[None] - cy[:, None, None]
        cr, sr = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
        s = size[:, None, None]
        lx = (dx * cr + dy * sr) / s
        ly = (-dx * sr + dy * cr) / s

        dist = np.empty((n, r, r), dtype=np.float32)
        tex = np.empty((n, r, r), dtype=np.float32)
        for k, (shape, _, texture) in enumerate(CLASSES):
            sel = np.nonzero(labels == k)[0]
            if len(sel) == 0:
                continue
            dist[sel] = SDF[shape](lx[sel], ly[sel])
            tex[sel] = _texture(
                texture, lx[sel], ly[sel], period[sel, None, None], tex_angle[sel, None, None], phase_u[sel, None, None]
            )
        pixel = 2.0 / r  # one pixel in image coordinates
        alpha = np.clip(0.5 - dist * (size[:, None, None] / pixel), 0.0, 1.0)[:, None]  # SDF is in units of size

        ramp = self._gx[None] * np.cos(grad_angle)[:, None, None] + self._gy[None] * np.sin(grad_angle)[:, None, None]
        ramp *= grad_amp[:, None, None]
        # img = bg + ramp + alpha (colour - bg - ramp) + noise, colour = sec + tex (fg - sec); in place
        img = tex[:, None] * (fg - sec)[:, :, None, None]
        img += (sec - bg)[:, :, None, None]
        img -= ramp[:, None]
        img *= alpha
        img += ramp[:, None]
        img += bg[:, :, None, None]
        noise -= 0.5  # uniform noise of std noise_std
        noise *= (noise_std * math.sqrt(12.0))[:, None, None, None]
        img += noise
        np.clip(img, 0.0, 1.0, out=img)
        img *= 255.0
        img += 0.5
        return img.astype(np.uint8), labels


def factory(cfg: DataConfig, split: str) -> ShapesDataset:
    """``data.train_images`` / ``data.val_images`` set the length (0 = 10000 train / 1000 val)."""
    length = cfg.train_images if split == "train" else cfg.val_images
    return ShapesDataset(split=split, resolution=cfg.resolution, length=length, seed=cfg.seed)


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name="shapes",
            description="procedural 10-class shapes (shape x colour x texture), any resolution; the embedded default",
            factory=factory,
            version=VERSION,
            source="generated by vfmbench (no download)",
            license="Apache-2.0",
            num_classes=NUM_CLASSES,
            splits=tuple(SPLITS),
            needs_root=False,
        )
    )
