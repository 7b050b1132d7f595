"""Batched image loading for the runner: DataLoader workers, and the corrupt-image policy.

Datasets are map-style: ``ds[i] -> (uint8 [3, R, R] tensor, int label)``, optionally with
``__getitems__(indices)`` for batched reads. An item that cannot be decoded raises
``CorruptImageError`` (a ``UserError``) naming the file, or the shard and member. The runner then
either stops with that message, or, with ``data.skip_corrupt=true``, skips the item and records it
in a ``SkipCounter``:

- ``on_corrupt="replace"`` (training batches, and every pass over the train split): the item is
  replaced by the next index, cyclically, that decodes. Batches keep their size and position ``k``
  of a pass still holds index ``k`` or its replacement, so index-based consumers (exact resume,
  DDP batch sizes, latents indexed by dataset index) stay aligned.
- ``on_corrupt="drop"`` (evaluation passes): the item is left out, so no image is counted twice.

Workers (``num_workers > 0``) decode and collate whole batches; the main process only records
skips and reassembles. ``num_workers=0`` decodes in the calling process, with the same results.

``to_rgb`` is how every image decoder turns a PIL image into 8-bit RGB: high-depth images (16-bit
grey ``I;16``, 32-bit ``I``, float ``F``) are scaled to 0..255, never clipped; 48-bit RGB PNGs
arrive from Pillow already scaled (its most significant bytes).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from .errors import UserError

ON_CORRUPT = ("raise", "replace", "drop")
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(im):
    """A PIL image as 8-bit RGB. 16-bit modes map 0..65535 to 0..255 (rounded); 32-bit integers
    likewise when their values fit 16 bits (how Pillow may decode a 16-bit PNG), else 0..2^32-1;
    float images map 0..1 to 0..255 when their values lie in [0, 1], else their own min..max
    (non-finite values become the minimum). Other modes go through ``Image.convert('RGB')``."""
    import numpy as np
    from PIL import Image

    if im.mode not in HIGH_DEPTH_MODES:
        return im.convert("RGB")
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        finite = a[np.isfinite(a)]
        lo, hi = 0.0, 1.0
        if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
            lo, hi = float(finite.min()), float(finite.max())
        a = np.where(np.isfinite(a), a, lo)
    elif im.mode == "I":
        lo = min(0.0, float(a.min()) if a.size else 0.0)
        hi = 65535.0 if a.size and a.max() <= 65535 and lo == 0.0 else (float(a.max()) if a.size else 1.0)
    else:
        lo, hi = 0.0, 65535.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    grey = np.clip(np.rint((a - lo) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1)), "RGB")


class CorruptImageError(UserError):
    """A dataset item that cannot be read or decoded. ``where`` names the file (or shard and member)."""

    def __init__(self, where: str, reason: str):
        super().__init__(
            f"cannot decode image {where} ({reason}); remove or replace the file, "
            "or pass --set data.skip_corrupt=true to skip corrupt images"
        )
        self.where, self.reason = where, reason

    def __reduce__(self):
        return (CorruptImageError, (self.where, self.reason))


# ---------------------------------------------------------------------------------------------
# Skipped images


@dataclass
class SkipCounter:
    """Corrupt images skipped by a run, per split, keyed by where they are (file or shard member).

    ``path`` (optional) is a JSON file rewritten whenever a new image is recorded, once its folder
    exists; ``others`` are files written by other processes (ranks, earlier invocations) whose
    records count too. ``log`` is called with one line per newly skipped image.
    """

    path: Path | None = None
    others: Callable[[], Iterable[Path]] = lambda: ()
    log: Callable[[str], None] | None = None
    items: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> where -> reason
    replacements: dict[tuple[str, int], int] = field(default_factory=dict)  # (split, index) -> index

    def __post_init__(self) -> None:
        if self.path is not None and self.path.is_file():
            self.items = _merge(self.items, _read(self.path))

    def record(self, split: str, where: str, reason: str) -> bool:
        """Record a skipped image; returns whether it was new."""
        seen = self.items.setdefault(split, {})
        if where in seen:
            return False
        seen[where] = reason
        if self.log is not None:
            self.log(f"data: skipped corrupt {split} image {where} ({reason}); {len(seen)} skipped in {split} so far")
        if self.path is not None and self.path.parent.is_dir():
            from .checkpoint import write_json

            write_json(self.path, self.items)
        return True

    def all_items(self) -> dict[str, dict[str, str]]:
        """This process's records merged with those of ``others``."""
        out = {s: dict(v) for s, v in self.items.items()}
        for p in self.others():
            if p != self.path:
                out = _merge(out, _read(p))
        return out

    def counts(self) -> dict[str, int]:
        return {split: len(v) for split, v in sorted(self.all_items().items())}

    def total(self) -> int:
        return sum(self.counts().values())


def _read(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {str(s): {str(k): str(v) for k, v in items.items()} for s, items in data.items() if isinstance(items, dict)}


def _merge(a: dict[str, dict[str, str]], b: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    out = {s: dict(v) for s, v in a.items()}
    for s, items in b.items():
        out.setdefault(s, {}).update({k: v for k, v in items.items() if k not in out[s]})
    return out


# ---------------------------------------------------------------------------------------------
# Fetching (runs in DataLoader workers)


@dataclass
class Fetched:
    """A decoded batch: ``images``/``labels`` hold the good items in order (``good`` gives their
    positions in the requested list); ``bad`` holds (position, where, reason) of the others."""

    good: list[int]
    images: torch.Tensor | None
    labels: torch.Tensor | None
    bad: list[tuple[int, str, str]]

    def pin_memory(self) -> "Fetched":
        if self.images is not None:
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        return self


class _Guarded:
    """Wraps a dataset so that a batch read returns a ``Fetched`` instead of raising on a corrupt item."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> Fetched:
        indices = [int(i) for i in indices]
        items: list[Any] = []
        batched = getattr(self.dataset, "__getitems__", None)
        if batched is not None:
            try:
                items = list(batched(indices))
            except CorruptImageError:
                items = []  # find which ones, item by item
        if not items:
            for i in indices:
                try:
                    items.append(self.dataset[i])
                except CorruptImageError as e:
                    items.append(e)
        good = [k for k, it in enumerate(items) if not isinstance(it, CorruptImageError)]
        bad = [(k, it.where, it.reason) for k, it in enumerate(items) if isinstance(it, CorruptImageError)]
        if not good:
            return Fetched(good, None, None, bad)
        images = torch.stack([items[k][0] for k in good])
        labels = torch.tensor([int(items[k][1]) for k in good], dtype=torch.long)
        return Fetched(good, images, labels, bad)


def _as_is(batch: Fetched) -> Fetched:
    # the DataLoader's fetcher passes __getitems__'s result to collate_fn as is
    return batch


def _loader(dataset: _Guarded, batch_sampler: Iterable[list[int]], num_workers: int, pin_memory: bool, persistent: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_as_is,
        pin_memory=pin_memory, persistent_workers=persistent, prefetch_factor=2 if num_workers > 0 else None,
    )


# ---------------------------------------------------------------------------------------------
# The corrupt-image policy (main process)


class _Policy:
    def __init__(self, dataset: Any, split: str, on_corrupt: str, skips: SkipCounter | None):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if on_corrupt != "raise" and skips is None:
            raise ValueError("a SkipCounter is needed to skip corrupt images")
        self.guarded, self.split, self.on_corrupt, self.skips = _Guarded(dataset), split, on_corrupt, skips

    def apply(self, indices: Sequence[int], fetched: Fetched) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch for ``indices`` under the policy (None when every item was dropped)."""
        if not fetched.bad:
            return fetched.images, fetched.labels
        if self.on_corrupt == "raise":
            _, where, reason = fetched.bad[0]
            raise CorruptImageError(where, reason)
        for _, where, reason in fetched.bad:
            self.skips.record(self.split, where, reason)
        if self.on_corrupt == "drop":
            return (fetched.images, fetched.labels) if fetched.good else None
        # replace: position k of the batch gets the next index after indices[k] that decodes
        images: list[torch.Tensor | None] = [None] * len(indices)
        labels: list[int] = [0] * len(indices)
        for j, k in enumerate(fetched.good):
            images[k], labels[k] = fetched.images[j], int(fetched.labels[j])
        for k, _, _ in fetched.bad:
            images[k], labels[k] = self.replacement(int(indices[k]))
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)

    def replacement(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.guarded)
        key = (self.split, index)
        if key in self.skips.replacements:
            f = self.guarded.__getitems__([self.skips.replacements[key]])
            if not f.bad:
                return f.images[0], int(f.labels[0])
        for step in range(1, n):
            j = (index + step) % n
            f = self.guarded.__getitems__([j])
            if not f.bad:
                self.skips.replacements[key] = j
                return f.images[0], int(f.labels[0])
            self.skips.record(self.split, f.bad[0][1], f.bad[0][2])
        raise UserError(f"every image of the {self.split!r} split is corrupt; check data.root and the files it holds")


def _chunks(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def iter_batches(
    dataset: Any,
    indices: Sequence[int],
    batch_size: int,
    *,
    split: str = "",
    num_workers: int = 0,
    on_corrupt: str = "raise",
    skips: SkipCounter | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 images [B, 3, R, R], int64 labels [B])`` over ``indices`` in order, in batches
    of ``batch_size`` (the last one shorter; fewer when items are dropped), decoded by
    ``num_workers`` DataLoader worker processes (0: in this process)."""
    if batch_size < 1:
        raise UserError(f"the batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"data.num_workers must be >= 0, got {num_workers}")
    policy = _Policy(dataset, split, on_corrupt, skips)
    chunks = _chunks([int(i) for i in indices], batch_size)
    if not chunks:
        return
    if num_workers == 0:
        fetched_batches: Iterable[Fetched] = (policy.guarded.__getitems__(c) for c in chunks)
    else:
        fetched_batches = _loader(policy.guarded, chunks, min(num_workers, len(chunks)), pin_memory, persistent=False)
    for chunk, fetched in zip(chunks, fetched_batches):
        out = policy.apply(chunk, fetched)
        if out is not None:
            yield out


class _Feed:
    """A batch sampler whose batches are set before each pass (the BatchLoader's persistent loader)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """Loads one batch of arbitrary indices at a time (training: the IndexStream's batches), its
    items spread over persistent DataLoader workers. Corrupt items are handled like ``iter_batches``."""

    def __init__(self, dataset: Any, *, split: str = "", num_workers: int = 0, on_corrupt: str = "raise",
                 skips: SkipCounter | None = None, pin_memory: bool = False):
        if num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {num_workers}")
        self.policy = _Policy(dataset, split, on_corrupt, skips)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._feed = _Feed()
        self._loader: DataLoader | None = None

    def load(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [int(i) for i in indices]
        if not ids:
            raise ValueError("no indices to load")
        if self.num_workers == 0:
            fetched = self.policy.guarded.__getitems__(ids)
            out = self.policy.apply(ids, fetched)
        else:
            per = -(-len(ids) // self.num_workers)
            self._feed.batches = _chunks(ids, per)
            if self._loader is None:
                self._loader = _loader(self.policy.guarded, self._feed, self.num_workers, self.pin_memory, persistent=True)
            try:
                parts = [self.policy.apply(c, f) for c, f in zip(self._feed.batches, self._loader)]
            except BaseException:
                self._loader = None  # an interrupted pass: start fresh workers next time
                raise
            out = (torch.cat([p[0] for p in parts if p is not None]), torch.cat([p[1] for p in parts if p is not None])) if any(
                p is not None for p in parts) else None
        if out is None:
            raise UserError(f"every image of this batch of the {self.policy.split!r} split is corrupt")
        return out


def skip_files(run_dir: Path) -> list[Path]:
    """The skipped-image records of every rank of a run."""
    return sorted(Path(run_dir).glob("skipped-images*.json"))


def skip_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / ("skipped-images.json" if rank == 0 else f"skipped-images.rank{rank}.json")


def worker_count(requested: int) -> int:
    """``data.num_workers`` capped at the machine's cores (a DataLoader warns and slows down beyond)."""
    return max(0, min(int(requested), os.cpu_count() or 1))
