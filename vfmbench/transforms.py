"""Image transforms of datasets that decode real images (PIL in, uint8 [res, res, 3] array out).

Evaluation (``data.eval_transform``, recorded as the ``eval_transform`` protocol field of
reconstruction rows; it changes rFID/PSNR/SSIM/LPIPS):

* ``adm-center-crop``: ADM's ``center_crop_arr`` (guided-diffusion; LightningDiT, REPA and VFM-VAE's
  latent prefetch): BOX halving while the short side >= 2 * res, BICUBIC resize of the short side
  to res, centre crop at ``(size - res) // 2``.
* ``resize-center-crop``: what VFM-VAE's reconstruction tool reports (torchvision
  ``Resize(res)`` + ``CenterCrop(res)`` on PIL images): BILINEAR resize of the short side to res
  (long side ``int(res * long / short)``), centre crop at ``round((size - res) / 2)``.

Training (``data.train_transform``; used only for the batches a tokenizer trains on, never for the
latent cache or any evaluation):

* ``adm-center-crop`` (default): as above, deterministic.
* ``vfm-vae-random-crop``: VFM-VAE's training augmentation (``training/data_wds.py``): a square of
  ``int(short * U(0.5, 1))`` px at a uniform position, LANCZOS resize to res, horizontal flip with
  probability 0.5. Draws come from ``rng`` (the dataset seeds it per image and visit).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image

from .errors import UserError

DEFAULT = "adm-center-crop"


def adm_center_crop(image: Image.Image, resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def resize_center_crop(image: Image.Image, resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if w <= h else (new_long, resolution)
    arr = np.asarray(image.resize(size, resample=Image.BILINEAR))
    top = int(round((arr.shape[0] - resolution) / 2.0))
    left = int(round((arr.shape[1] - resolution) / 2.0))
    return arr[top : top + resolution, left : left + resolution]


def vfm_vae_random_crop(image: Image.Image, resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    if rng is None:
        raise ValueError("vfm-vae-random-crop draws its crop and flip: pass an rng")
    w, h = image.size
    side = max(1, int(min(h, w) * rng.uniform(0.5, 1.0)))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), resample=Image.LANCZOS)
    arr = np.asarray(crop)
    if rng.uniform() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


EVAL_TRANSFORMS: dict[str, Callable[..., np.ndarray]] = {"adm-center-crop": adm_center_crop, "resize-center-crop": resize_center_crop}
TRAIN_TRANSFORMS: dict[str, Callable[..., np.ndarray]] = {"adm-center-crop": adm_center_crop, "vfm-vae-random-crop": vfm_vae_random_crop}
RANDOM = {"vfm-vae-random-crop"}


def check_names(data_cfg: Any) -> None:
    """Known transform names and a valid ``min_short_side`` (before any dataset is opened)."""
    for field, table in (("train_transform", TRAIN_TRANSFORMS), ("eval_transform", EVAL_TRANSFORMS)):
        name = getattr(data_cfg, field)
        if name not in table:
            raise UserError(f"data.{field}={name!r} is not a transform: choose one of {', '.join(table)}")
    if data_cfg.min_short_side < 0:
        raise UserError(f"data.min_short_side must be >= 0 (0 keeps every image), got {data_cfg.min_short_side}")


def check_dataset(data_cfg: Any, dataset: Any) -> None:
    """A dataset that applies them (it has ``with_transform``) when any is not the default."""
    if hasattr(dataset, "with_transform"):
        return
    for field in ("train_transform", "eval_transform"):
        if getattr(data_cfg, field) != DEFAULT:
            raise UserError(f"dataset {data_cfg.dataset!r} does not decode images through vfmbench.transforms: "
                            f"remove data.{field} (or use a dataset such as imagefolder)")
    if data_cfg.min_short_side:
        raise UserError(f"dataset {data_cfg.dataset!r} cannot filter by image size: remove data.min_short_side")


def training_view(dataset: Any, data_cfg: Any) -> Any:
    """The dataset a tokenizer trains on: ``dataset`` itself, or its view decoding with
    ``data.train_transform`` and keeping images whose short side is >= ``data.min_short_side``."""
    if data_cfg.train_transform == DEFAULT and not data_cfg.min_short_side:
        return dataset
    return dataset.with_transform(data_cfg.train_transform, data_cfg.min_short_side)


def protocol(dataset: Any) -> dict[str, str]:
    """The protocol field of a reconstruction row: the eval transform, or that the dataset makes its own images."""
    return {"eval_transform": getattr(dataset, "transform", "") or "dataset-native"}
