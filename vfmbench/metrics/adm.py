"""ADM-evaluator file formats (openai/guided-diffusion ``evaluations/evaluator.py``).

* A *sample batch* is an ``.npz`` whose ``arr_0`` is uint8 [N, H, W, 3] (NHWC).
* A *reference batch* (e.g. ``VIRTUAL_imagenet256_labeled.npz``) has ``arr_0`` images (used for
  precision/recall) and precomputed Inception statistics ``mu``/``sigma`` (pool_3, for FID) and
  ``mu_s``/``sigma_s`` (mixed_6/conv spatial features, for sFID) when present.

Inside vfmbench images are uint8 NCHW; these helpers convert at the file boundary. Writes are
atomic (temporary file + rename), so an interrupted run never leaves a truncated ``.npz``.

``check_reference`` is the preflight of ``metrics.reference`` (run before any work, also under
``--dry-run``): the paper presets name ``VIRTUAL_imagenet256_labeled.npz``, and without it a run
stops with exit 2 and says where to get it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .cache import atomic_write

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")

# The ADM evaluator's ImageNet reference batches (openai/guided-diffusion evaluations/README.md)
ADM_BASE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
ADM_IMAGENET256 = "VIRTUAL_imagenet256_labeled.npz"
REFERENCE_BATCH_URLS = {
    "VIRTUAL_imagenet64_labeled.npz": f"{ADM_BASE_URL}/64/VIRTUAL_imagenet64_labeled.npz",
    "VIRTUAL_imagenet128_labeled.npz": f"{ADM_BASE_URL}/128/VIRTUAL_imagenet128_labeled.npz",
    ADM_IMAGENET256: f"{ADM_BASE_URL}/256/{ADM_IMAGENET256}",
    "VIRTUAL_imagenet512.npz": f"{ADM_BASE_URL}/512/VIRTUAL_imagenet512.npz",
}
# stages that compare against metrics.reference (gen-eval; the diffusion stage's convergence FID)
REFERENCE_STAGES = ("diffusion", "gen-eval")


def check_reference(path: str, stages: Any = REFERENCE_STAGES) -> None:
    """Preflight of ``metrics.reference`` (cheap: reads the .npz directory only). '' (the val split)
    or ``stages`` without one that uses it pass; a missing file or one without ADM statistics raises
    a ``UserError`` naming the file, where to get it and the alternative."""
    if not path or not set(stages) & set(REFERENCE_STAGES):
        return
    p = Path(path).expanduser()
    name = p.name
    if not p.is_file():
        where = (f"it is the ADM evaluator's reference batch (openai/guided-diffusion evaluations): download "
                 f"{REFERENCE_BATCH_URLS[name]} where the network is reachable, then pass its path with "
                 f"`--set metrics.reference=PATH`" if name in REFERENCE_BATCH_URLS else
                 "pass the path of an ADM-format reference batch .npz with `--set metrics.reference=PATH`")
        raise UserError(
            f"metrics.reference={path!r}: {str(p.resolve())!r} does not exist; {where}. Or use "
            "`--set metrics.reference=''` to compare with the dataset's val split instead (another protocol: "
            "those rows never share a leaderboard table with reference-batch rows)."
        )
    try:
        with np.load(p, allow_pickle=False) as data:
            files = set(data.files)
    except (OSError, ValueError) as e:
        raise UserError(f"metrics.reference={path!r} is not a readable .npz ({type(e).__name__}: {e}); pass an ADM reference batch") from None
    if not ({"mu", "sigma"} <= files or "arr_0" in files):
        raise UserError(f"metrics.reference={path!r} has neither mu/sigma nor arr_0 images ({sorted(files)}): not an ADM reference batch")


@dataclass
class AdmReference:
    """A loaded reference batch; absent entries are None."""

    path: str
    images: np.ndarray | None = None  # uint8 [N, H, W, 3]
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None

    def images_nchw(self) -> torch.Tensor:
        if self.images is None:
            raise UserError(f"reference batch {self.path!r} has no images (arr_0); precision/recall and KID need them")
        return torch.from_numpy(np.ascontiguousarray(self.images.transpose(0, 3, 1, 2)))

    def pool_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        return (self.mu, self.sigma) if self.mu is not None and self.sigma is not None else None

    def spatial_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        return (self.mu_s, self.sigma_s) if self.mu_s is not None and self.sigma_s is not None else None


def _check_nhwc(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise UserError(f"{where}: arr_0 must be uint8 N x H x W x 3 (ADM format), got {arr.dtype} {arr.shape}")
    return arr


def _to_nhwc(images: Any) -> np.ndarray:
    """uint8 NCHW tensor/array (the vfmbench convention) -> uint8 NHWC numpy."""
    if torch.is_tensor(images):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"images must be uint8 N x 3 x H x W, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


def load_reference_batch(path: str | Path, images: bool = True) -> AdmReference:
    """Read an ADM reference batch; ``images=False`` skips the (large) ``arr_0``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"reference batch {str(p)!r} does not exist; pass the path of an ADM-format .npz")
    ref = AdmReference(path=str(p))
    with np.load(p, allow_pickle=False) as data:
        if images and "arr_0" in data.files:
            ref.images = _check_nhwc(data["arr_0"], str(p))
        for k in STAT_KEYS:
            if k in data.files:
                setattr(ref, k, np.asarray(data[k], dtype=np.float64))
    if (ref.mu is None) != (ref.sigma is None) or (ref.mu_s is None) != (ref.sigma_s is None):
        raise UserError(f"reference batch {str(p)!r} has a mean without its covariance (or the reverse)")
    return ref


def write_reference_batch(path: str | Path, images: Any = None, **stats: np.ndarray) -> Path:
    """Write an ADM reference batch: optional uint8 NCHW images as ``arr_0`` plus ``mu``/``sigma``/``mu_s``/``sigma_s``."""
    unknown = set(stats) - set(STAT_KEYS)
    if unknown:
        raise ValueError(f"unknown reference statistics {sorted(unknown)}; expected some of {STAT_KEYS}")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items() if v is not None}
    if images is not None:
        arrays = {"arr_0": _to_nhwc(images), **arrays}
    p = Path(path)
    atomic_write(p, lambda f: np.savez(f, **arrays))
    return p


def write_samples_npz(path: str | Path, images: Any) -> Path:
    """Save uint8 NCHW images as an ADM sample batch (``arr_0`` uint8 N x H x W x 3), atomically."""
    arr = _to_nhwc(images)
    p = Path(path)
    atomic_write(p, lambda f: np.savez(f, arr_0=arr))
    return p


def read_samples_npz(path: str | Path) -> torch.Tensor:
    """Load an ADM sample batch as uint8 NCHW."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"sample batch {str(p)!r} does not exist; run the 'sample' stage first")
    with np.load(p, allow_pickle=False) as data:
        if "arr_0" not in data.files:
            raise UserError(f"{str(p)!r} has no arr_0: not an ADM sample batch")
        arr = _check_nhwc(data["arr_0"], str(p))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
