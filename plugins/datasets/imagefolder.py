"""``imagefolder``: labelled images in the ImageNet layout ``root/{train,val}/<class>/<image>``.

Class indices follow the sorted folder names of ``root/train`` (the reference split, so that
``val`` uses the same indices), or of the requested split's folder when ``root/train`` is absent.
Files are images by extension (case-insensitive: .jpeg .jpg .png .bmp .webp .ppm .tif .tiff) in
each class folder, not recursive, ordered by (class, file name).

Preprocessing is ADM's ``center_crop_arr`` (guided-diffusion; also LlamaGen, REPA, LightningDiT
and VFM-VAE's latent prefetch): convert to RGB; while the short side is >= 2 * resolution,
BOX-downsample by 2 (integer halving of both sides); BICUBIC-resize so the short side equals
the resolution (the long side rounded); centre crop (offset ``(size - res) // 2``).

Subsets: ``data.train_images`` / ``data.val_images`` > 0 take that many files, chosen as the
first n of ``numpy.random.default_rng([data.seed, split_id]).permutation(count)`` (split_id 0
train, 1 val) and kept in (class, file name) order. 0 takes every file.

Other transforms (``vfmbench.transforms``): the val split decodes with ``data.eval_transform``;
a tokenizer trains on ``with_transform(data.train_transform, data.min_short_side)``, a view of the
train split (random transforms draw from ``default_rng([data.seed, index, visit])``, visit counting
this process's reads of that index; ``min_short_side`` keeps only files whose short side is at
least that, read from each file's header once).
"""
from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vfmbench.config import DataConfig
from vfmbench.data import CorruptImageError
from vfmbench.errors import UserError, did_you_mean
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import DatasetSpec
from vfmbench.transforms import DEFAULT, EVAL_TRANSFORMS, RANDOM, TRAIN_TRANSFORMS, adm_center_crop

VERSION = "1"
SPLITS = {"train": 0, "val": 1}
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
LAYOUT = "root/{train,val}/<class>/<image>"


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's centre crop: BOX halving while the short side >= 2 * res, BICUBIC resize of the short
    side to res, centre crop. Returns uint8 [res, res, C]."""
    return adm_center_crop(image, resolution)


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _images(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


class ImageFolderDataset(Dataset):
    """``(uint8 [3, res, res] tensor, int label)`` pairs; see the module docstring."""

    def __init__(self, root: str, split: str = "train", resolution: int = 256, max_images: int = 0, seed: int = 0, transform: str = DEFAULT):
        if split not in SPLITS:
            raise UserError(f"dataset 'imagefolder' has no split {split!r}: {did_you_mean(split, SPLITS)}")
        if not root:
            raise UserError(f"dataset 'imagefolder' needs a root folder laid out as {LAYOUT}: pass --set data.root=PATH")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise UserError(f"data.root {str(self.root)!r} is not a folder; pass --set data.root=PATH to a folder laid out as {LAYOUT}")
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise UserError(f"{str(split_dir)!r} does not exist: dataset 'imagefolder' expects {LAYOUT}; check --set data.root=PATH")
        ref_dir = self.root / "train" if (self.root / "train").is_dir() else split_dir
        self.classes = _subdirs(ref_dir)
        if not self.classes:
            raise UserError(f"{str(ref_dir)!r} holds no class folders: dataset 'imagefolder' expects {LAYOUT}; check --set data.root=PATH")
        extra = sorted(set(_subdirs(split_dir)) - set(self.classes))
        if extra:
            raise UserError(f"{str(split_dir)!r} has class folders missing from {str(ref_dir)!r}: {extra[:5]}; both splits must use the same classes")
        files: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            if (split_dir / name).is_dir():
                files += [(f"{name}/{f}", label) for f in _images(split_dir / name)]
        if not files:
            raise UserError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(split_dir)!r}/<class>/: "
                f"dataset 'imagefolder' expects {LAYOUT}; check --set data.root=PATH"
            )
        self.split, self.resolution, self.seed = split, int(resolution), int(seed)
        self.file_count = len(files)
        if max_images < 0:
            raise UserError(f"data.{split}_images must be >= 0, got {max_images}")
        if max_images > len(files):
            raise UserError(
                f"data.{split}_images={max_images} but {str(split_dir)!r} holds {len(files)} images; "
                f"lower it or set it to 0 for all"
            )
        if max_images:
            pick = np.random.default_rng([self.seed, SPLITS[split]]).permutation(len(files))[:max_images]
            files = [files[i] for i in np.sort(pick)]
        self.split_dir = split_dir
        self.files = files
        self.num_classes = len(self.classes)
        self._subset = f":subset-seed={self.seed}" if max_images else ""
        self._set_transform(transform)

    def _set_transform(self, name: str) -> None:
        table = {**EVAL_TRANSFORMS, **TRAIN_TRANSFORMS}
        if name not in table:
            raise UserError(f"unknown image transform {name!r}: {did_you_mean(name, table)}")
        self.transform, self._fn, self._visits = name, table[name], {}
        listing = hashlib.sha256("\n".join(f for f, _ in self.files).encode()).hexdigest()[:12]
        how = "" if name == DEFAULT else f":transform={name}"
        self.cache_id = (
            f"imagefolder:v{VERSION}:root={self.root}:split={self.split}:res={self.resolution}:"
            f"n={len(self.files)}:files={self.file_count}:list={listing}{self._subset}{how}"
        )

    def with_transform(self, name: str, min_short_side: int = 0) -> "ImageFolderDataset":
        """A view decoding with transform ``name``, keeping only files whose short side is >= ``min_short_side``."""
        view = copy.copy(self)
        if min_short_side:
            keep = []
            for rel, label in self.files:
                try:
                    with Image.open(self.split_dir / rel) as im:
                        size = im.size
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                    keep.append((rel, label))  # a corrupt file is reported (or skipped) when it is read
                    continue
                if min(size) >= min_short_side:
                    keep.append((rel, label))
            if not keep:
                raise UserError(f"no image of {str(self.split_dir)!r} has a short side >= data.min_short_side={min_short_side}")
            view.files = keep
            view._subset = f"{self._subset}:min-short-side={min_short_side}"
        view._set_transform(name)
        return view

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.split_dir / self.files[index][0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rel, label = self.files[index]
        path = self.split_dir / rel
        try:
            with Image.open(path) as im:
                im.load()
                rgb = im.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise CorruptImageError(repr(str(path)), f"{type(e).__name__}: {e}") from None
        rng = None
        if self.transform in RANDOM:
            visit = self._visits[index] = self._visits.get(index, -1) + 1
            rng = np.random.default_rng([self.seed, index, visit])
        arr = self._fn(rgb, self.resolution, rng)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), label


def factory(cfg: DataConfig, split: str) -> ImageFolderDataset:
    n = cfg.train_images if split == "train" else cfg.val_images
    transform = cfg.eval_transform if split == "val" else DEFAULT  # training batches: vfmbench.transforms.training_view
    return ImageFolderDataset(cfg.root, split=split, resolution=cfg.resolution, max_images=n, seed=cfg.seed, transform=transform)


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name="imagefolder",
            description=f"labelled images in the ImageNet layout {LAYOUT}, ADM centre crop",
            factory=factory,
            version=VERSION,
            source="local folder (data.root)",
            license="that of the images",
            num_classes=0,  # from the folder
            splits=tuple(SPLITS),
            needs_root=True,
        )
    )
