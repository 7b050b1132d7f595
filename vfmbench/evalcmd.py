"""``vfmbench eval``: metrics without training.

* ``vfmbench eval generation SAMPLES --reference REF``: generation metrics (gFID, sFID, IS, KID,
  precision/recall) of a folder of images or an ADM ``.npz`` of samples against a reference: an
  ADM reference batch ``.npz`` (its mu/sigma for FID, mu_s/sigma_s for sFID, its images for the
  rest) or a folder of images.
* ``vfmbench eval reconstruction --tokenizer NAME --weights PATH``: reconstruction metrics of a
  tokenizer loaded from weights on a dataset's val split (the run's ``tokenizer``, ``recon-eval``
  and ``results`` stages, with the weights loaded instead of trained).

``vfmbench eval alignment RUN_DIR`` lives in ``vfmbench.alignment_eval``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_images(path: str | Path) -> tuple[torch.Tensor, str]:
    """uint8 NCHW images from a folder (sorted by name) or an ADM ``.npz`` (``arr_0``), and a content id."""
    from PIL import Image

    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        from .metrics.adm import read_samples_npz
        from .metrics.cache import file_sha256

        return read_samples_npz(p), file_sha256(p)[:16]
    if not p.is_dir():
        raise UserError(f"{str(p)!r} is neither a folder of images nor an .npz file")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{str(p)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays, h = [], hashlib.sha256()
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise UserError(f"cannot read image {str(f)!r}: {e}") from None
        if arrays and arr.shape != arrays[0].shape:
            raise UserError(f"{str(f)!r} is {arr.shape[1]}x{arr.shape[0]}, the others {arrays[0].shape[1]}x{arrays[0].shape[0]}: images must share one size")
        arrays.append(arr)
        h.update(f.name.encode())
        h.update(arr.tobytes())
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()), h.hexdigest()[:16]


def evaluate_generation(host, cfg, samples: str, reference: str) -> list[dict[str, Any]]:
    """Rows of every generation metric of ``samples`` against ``reference``."""
    from . import __version__
    from .build import default_cache_dir, resolve_device
    from .evaluate import Evaluator
    from .results import SCHEMA_VERSION

    device = resolve_device(cfg.run.device)
    ev = Evaluator(host, cfg, device, default_cache_dir(cfg))
    images, sid = load_images(samples)
    ref_path = Path(reference)
    if ref_path.is_file() and ref_path.suffix == ".npz":
        ref = ev.adm_reference(ref_path)
    else:
        ref_images, rid = load_images(ref_path)
        ref = ev.images_reference(f"folder:{ref_path.name}:{rid}", ref_images, {"folder": rid, "num_images": int(ref_images.shape[0])})
    bs = cfg.metrics.batch_size
    for i in range(0, images.shape[0], bs):
        ev.add_samples(images[i : i + bs])
    rows = ev.finish("generation", ref, extra_protocol={"samples": f"{Path(samples).name}:{sid}"})
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = []
    for r in rows:
        out.append({
            "schema": SCHEMA_VERSION, "run_id": Path(samples).name, "label": "smoke" if r["smoke"] else "official",
            "tokenizer": "", "tokenizer_version": "", "vfm": "", "vfm_version": "", "vfm_weights": "", "decoder": "",
            "decoder_version": "", "diffusion": "", "diffusion_version": "", "dataset": ref.id, "dataset_version": "",
            "split": "", "resolution": int(images.shape[-1]), "metric": r["metric"], "metric_version": r["metric_version"],
            "family": r["family"], "value": r["value"], "higher_is_better": r["higher_is_better"], "protocol": r["protocol"],
            "seed": cfg.run.seed, "date": now, "device": str(device), "vfmbench_version": __version__, "git": "", "images": {},
        })
    return out
