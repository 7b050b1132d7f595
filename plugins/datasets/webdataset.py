"""``webdataset``: labelled images in WebDataset tar shards, e.g. the public imagenet-1k ones.

Layouts of ``data.root`` (the first that matches):

- ``imagenet-1k-wds`` (timm/imagenet-1k-wds): ``root/imagenet1k-train-NNNN.tar`` and
  ``root/imagenet1k-validation-NN.tar``; 1000 classes.
- ``split folders``: ``root/train/*.tar`` and ``root/val/*.tar``; ``num_classes`` is the largest
  label of the train split (of the requested split when there is no train folder) plus one.

Shards are taken in sorted file-name order. A sample is the tar members sharing a key (the member
name up to the first dot of its file name): an image (``.jpg .jpeg .png .webp .bmp .ppm .tif
.tiff``), ``.cls`` (the class index as ASCII text) and any other members (``.json`` metadata), which
are ignored.

Two ways to read a split:

- Indexed (the runner's passes and training batches): a map-style dataset. On first use each
  shard's tar headers are scanned (stdlib ``tarfile``) into an index of the image's offset and size
  and the label per sample, cached in ``$VFMBENCH_CACHE_DIR/webdataset-index`` (default
  ``~/.cache/vfmbench``) under the shard's path, size and modification time; ``ds[i]`` then seeks
  to the image's bytes. Sample ``i`` is the i-th sample in shard order.
- Streaming (``stream``, for passes that read a split once at scale): a ``webdataset.WebDataset``
  pipeline reading shards sequentially. The shard list is permuted by (seed, epoch), dealt to the
  ranks (``rank::world``) and then to each rank's DataLoader workers (``worker::num_workers``), so
  that every sample is read exactly once per epoch over all ranks and workers; each worker shuffles
  its samples through a buffer seeded by (seed, epoch, rank, worker).

Preprocessing is the imagefolder plugin's ADM centre crop, to uint8 [3, R, R]. Subsets
(``data.train_images`` / ``data.val_images``) pick samples as imagefolder does, from
``numpy.random.default_rng([data.seed, split_id]).permutation(count)``; streams keep only them.
A corrupt image raises ``CorruptImageError`` naming the shard and the member.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vfmbench.config import DataConfig
from vfmbench.data import CorruptImageError, SkipCounter, to_rgb
from vfmbench.errors import UserError, did_you_mean
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import DatasetSpec
from vfmbench_plugins.datasets.imagefolder import center_crop_arr

VERSION = "1"
SPLITS = {"train": 0, "val": 1}
IMAGENET_PREFIX = {"train": "imagenet1k-train-", "val": "imagenet1k-validation-"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
LAYOUT = "root/imagenet1k-{train,validation}-NNNN.tar (imagenet-1k-wds) or root/{train,val}/*.tar"
INDEX_FORMAT = "1"  # bump when the cached index's arrays change


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's naming: ``dir/base.ext.more`` -> (``dir/base``, ``ext.more``), ext lower-cased."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


def find_shards(root: Path, split: str) -> tuple[list[Path], str]:
    """The shards of a split in sorted order, and the layout's name."""
    imagenet = sorted(root.glob(f"{IMAGENET_PREFIX[split]}*.tar"))
    if imagenet:
        return imagenet, "imagenet-1k-wds"
    return sorted((root / split).glob("*.tar")), "split-folders"


# ---------------------------------------------------------------------------------------------
# The shard index


def scan_shard(path: Path) -> dict[str, np.ndarray]:
    """One shard's samples in tar order: ``key``, image ``offset``/``size``/``ext`` and ``label``."""
    keys: list[str] = []
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if not info.isreg():
                    continue
                key, ext = split_key(info.name)
                if not ext or key.startswith("__") or key.endswith("__"):
                    continue
                if key not in members:
                    keys.append(key)
                    members[key] = {}
                members[key][ext] = info
            labels = []
            for key in keys:
                cls = members[key].get("cls")
                if cls is None:
                    raise UserError(f"sample {key!r} of shard {str(path)!r} has no .cls member (the class index); "
                                    f"dataset 'webdataset' expects <key>.jpg + <key>.cls per sample")
                text = tf.extractfile(cls).read().decode("ascii", "replace").strip()
                if not re.fullmatch(r"\d+", text):
                    raise UserError(f"{key}.cls of shard {str(path)!r} holds {text[:20]!r}, not a class index; fix or re-create the shard")
                labels.append(int(text))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read shard {str(path)!r} ({type(e).__name__}: {e}); it is truncated or not a tar file: re-download it") from None
    offsets, sizes, exts = [], [], []
    for key in keys:
        found = [e for e in IMAGE_EXTENSIONS if e in members[key]]
        if not found:
            raise UserError(f"sample {key!r} of shard {str(path)!r} has no image member ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"members: {sorted(members[key])}")
        info = members[key][found[0]]
        offsets.append(info.offset_data)
        sizes.append(info.size)
        exts.append(found[0])
    return {
        "key": np.array(keys, dtype=str), "offset": np.array(offsets, dtype=np.int64), "size": np.array(sizes, dtype=np.int64),
        "ext": np.array(exts, dtype=str), "label": np.array(labels, dtype=np.int64),
    }


def index_cache_dir() -> Path:
    return Path(os.environ.get("VFMBENCH_CACHE_DIR") or "~/.cache/vfmbench").expanduser() / "webdataset-index"


def shard_index(path: Path, cache_dir: Path | None) -> dict[str, np.ndarray]:
    """``scan_shard``, cached under the shard's absolute path, size and modification time."""
    st = path.stat()
    tag = hashlib.sha256(f"{INDEX_FORMAT}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:20]
    cached = cache_dir / f"{path.stem}-{tag}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):
            pass  # a damaged cache file: scan again
    index = scan_shard(path)
    if cached is not None:
        from vfmbench.checkpoint import atomic_write

        try:
            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    np.savez(f, **index)

            atomic_write(cached, write)
        except OSError:
            pass  # a read-only cache: index in memory only
    return index


# ---------------------------------------------------------------------------------------------
# Decoding (shared by indexed and streaming reads)


def decode_image(data: bytes, resolution: int, where: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = to_rgb(im)  # 16-bit and float images scaled, not clipped
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(where, f"{type(e).__name__}: {e}") from None
    arr = center_crop_arr(rgb, resolution)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _decode_sample(sample: dict[str, Any], resolution: int, keep: frozenset | None) -> dict[str, Any] | None:
    """WebDataset sample -> {"id", "image", "label"}, or {"id", "error"} when it cannot be decoded
    (the consumer raises or skips it: exceptions do not cross DataLoader workers cleanly)."""
    shard = Path(str(sample.get("__url__", ""))).name
    sid = f"{shard}/{sample['__key__']}"
    if keep is not None and sid not in keep:
        return None
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None or "cls" not in sample:
        return {"id": sid, "where": f"shard {shard!r} member {sample['__key__']!r}", "error": f"no image or .cls member (has {sorted(k for k in sample if not k.startswith('__'))})"}
    member = lambda e: f"shard {shard!r} member {sample['__key__'] + '.' + e!r}"  # noqa: E731
    try:
        image = decode_image(sample[ext], resolution, member(ext))
        label = int(bytes(sample["cls"]).decode("ascii").strip())
    except CorruptImageError as e:
        return {"id": sid, "where": e.where, "error": e.reason}
    except (ValueError, UnicodeDecodeError) as e:
        return {"id": sid, "where": member("cls"), "error": f"not a class index: {e}"}
    return {"id": sid, "image": image, "label": label}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if "error" not in s]
    return {
        "ids": [s["id"] for s in good],
        "images": torch.stack([s["image"] for s in good]) if good else None,
        "labels": torch.tensor([s["label"] for s in good], dtype=torch.long),
        "errors": [(s["where"], s["error"]) for s in samples if "error" in s],
    }


def _split_by_rank(src, rank: int, world: int):
    for i, item in enumerate(src):
        if i % world == rank:
            yield item


def _seeded_shuffle(src, bufsize: int, seed: tuple[int, ...]):
    import webdataset as wds

    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    state = int(np.random.SeedSequence([*seed, worker]).generate_state(1)[0])
    yield from wds.filters.shuffle(bufsize, initial=bufsize, seed=state)(src)


def _tar_error(exn: Exception):
    raise UserError(f"cannot read a webdataset shard ({type(exn).__name__}: {exn}); it is truncated or not a tar file: re-download it") from None


# ---------------------------------------------------------------------------------------------
# Dataset


class WebDatasetShards(Dataset):
    """``(uint8 [3, res, res] tensor, int label)`` pairs from tar shards; see the module docstring."""

    def __init__(self, root: str, split: str = "train", resolution: int = 256, max_images: int = 0, seed: int = 0,
                 cache_dir: Path | None | str = "default"):
        if split not in SPLITS:
            raise UserError(f"dataset 'webdataset' has no split {split!r}: {did_you_mean(split, SPLITS)}")
        if not root:
            raise UserError(f"dataset 'webdataset' needs a folder of shards laid out as {LAYOUT}: pass --set data.root=PATH")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise UserError(f"data.root {str(self.root)!r} is not a folder; pass --set data.root=PATH to a folder of shards laid out as {LAYOUT}")
        self.shards, self.layout = find_shards(self.root, split)
        if not self.shards:
            raise UserError(f"no {split} shards in {str(self.root)!r}: dataset 'webdataset' expects {LAYOUT}; check --set data.root=PATH")
        self.split, self.resolution, self.seed = split, int(resolution), int(seed)
        self.cache_dir = index_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        parts = self._index(self.shards)
        self.counts = np.array([len(p["key"]) for p in parts], dtype=np.int64)
        self.keys = [p["key"] for p in parts]
        self.shard_of = np.repeat(np.arange(len(parts)), self.counts)
        self.position = np.concatenate([np.arange(c) for c in self.counts]) if len(parts) else np.zeros(0, np.int64)
        self.offset = np.concatenate([p["offset"] for p in parts])
        self.size = np.concatenate([p["size"] for p in parts])
        self.ext = np.concatenate([p["ext"] for p in parts])
        self.labels = np.concatenate([p["label"] for p in parts])
        self.sample_count = len(self.labels)
        if self.sample_count == 0:
            raise UserError(f"the {split} shards in {str(self.root)!r} hold no samples; dataset 'webdataset' expects <key>.jpg + <key>.cls members")
        if max_images < 0:
            raise UserError(f"data.{split}_images must be >= 0, got {max_images}")
        if max_images > self.sample_count:
            raise UserError(f"data.{split}_images={max_images} but the {split} shards hold {self.sample_count} samples; lower it or set it to 0 for all")
        self.subset = np.sort(np.random.default_rng([self.seed, SPLITS[split]]).permutation(self.sample_count)[:max_images]) if max_images else None
        if self.layout == "imagenet-1k-wds":
            self.num_classes = 1000
        else:
            ref = self.labels
            if split != "train":
                train, _ = find_shards(self.root, "train")
                if train:
                    ref = np.concatenate([p["label"] for p in self._index(train)])
            self.num_classes = int(ref.max()) + 1
        if self.labels.max() >= self.num_classes:
            raise UserError(f"the {split} shards hold class index {int(self.labels.max())} but the dataset has {self.num_classes} classes")
        listing = hashlib.sha256("\n".join(f"{p.name}:{c}" for p, c in zip(self.shards, self.counts)).encode()).hexdigest()[:12]
        subset = f":subset-seed={self.seed}" if max_images else ""
        self.cache_id = (
            f"webdataset:v{VERSION}:root={self.root}:split={split}:res={self.resolution}:n={len(self)}:"
            f"samples={self.sample_count}:shards={listing}{subset}"
        )
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def _index(self, shards: list[Path]) -> list[dict[str, np.ndarray]]:
        with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
            return list(pool.map(functools.partial(shard_index, cache_dir=self.cache_dir), shards))

    def __len__(self) -> int:
        return self.sample_count if self.subset is None else len(self.subset)

    def _global(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        return int(self.subset[index]) if self.subset is not None else index

    def where(self, index: int) -> str:
        """``shard 'NAME.tar' member 'KEY.jpg'``: how errors name sample ``index``."""
        g = self._global(index)
        s = int(self.shard_of[g])
        return f"shard {self.shards[s].name!r} member {str(self.keys[s][self.position[g]]) + '.' + str(self.ext[g])!r}"

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked DataLoader worker: its own file handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], "rb")
        return f

    def read_bytes(self, index: int) -> bytes:
        g = self._global(index)
        s, size = int(self.shard_of[g]), int(self.size[g])
        try:
            f = self._file(s)
            f.seek(int(self.offset[g]))
            data = f.read(size)
        except OSError as e:
            raise CorruptImageError(self.where(index), f"{type(e).__name__}: {e}") from None
        if len(data) != size:
            raise CorruptImageError(self.where(index), f"the shard ends after {len(data)} of {size} bytes (truncated download)")
        return data

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = decode_image(self.read_bytes(index), self.resolution, self.where(index))
        return image, int(self.labels[self._global(index)])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # read in file order (sequential within a shard), return in the requested order
        order = sorted(range(len(indices)), key=lambda k: (int(self.shard_of[self._global(indices[k])]), int(self.offset[self._global(indices[k])])))
        data: dict[int, bytes] = {k: self.read_bytes(indices[k]) for k in order}
        return [(decode_image(data[k], self.resolution, self.where(i)), int(self.labels[self._global(i)])) for k, i in enumerate(indices)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    # -- streaming ------------------------------------------------------------------------------
    def shard_order(self, seed: int, epoch: int) -> list[Path]:
        """The shards of an epoch, permuted by (seed, split, epoch)."""
        perm = np.random.default_rng([seed, SPLITS[self.split], epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def pipeline(self, rank: int = 0, world: int = 1, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 0, batch_size: int = 64):
        """The ``webdataset.WebDataset`` pipeline of one rank (an IterableDataset: iterate it, or wrap
        it in a DataLoader whose workers split its shards). It yields dicts of ``ids``, ``images``
        ``[B, 3, R, R]``, ``labels`` and ``errors`` (``(where, reason)`` of undecodable samples)."""
        import webdataset as wds

        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        if len(self.shards) < world:
            raise UserError(f"{len(self.shards)} {self.split} shards cannot be split over {world} ranks: every rank needs a shard; "
                            "use fewer ranks or re-shard the data into more (smaller) tar files")
        keep = None
        if self.subset is not None:
            keep = frozenset(f"{self.shards[self.shard_of[g]].name}/{self.keys[self.shard_of[g]][self.position[g]]}" for g in self.subset)
        urls = [str(p) for p in self.shard_order(seed, epoch)]
        ds = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=functools.partial(_split_by_rank, rank=rank, world=world),
            workersplitter=wds.split_by_worker, empty_check=False, handler=_tar_error, seed=seed,
        )
        if shuffle_buffer > 0:
            ds = ds.compose(functools.partial(_seeded_shuffle, bufsize=shuffle_buffer, seed=(seed, SPLITS[self.split], epoch, rank)))
        ds = ds.map(functools.partial(_decode_sample, resolution=self.resolution, keep=keep))
        return ds.batched(batch_size, collation_fn=_collate, partial=True)

    def stream(self, rank: int = 0, world: int = 1, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 0, num_workers: int = 0,
               batch_size: int = 64, skip_corrupt: bool = False, skips: SkipCounter | None = None) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
        """Read this rank's share of the split once: ``(ids, uint8 images [B, 3, R, R], labels [B])``
        batches (ids are ``shard.tar/key``), decoded by ``num_workers`` DataLoader workers. Over
        ranks ``0..world-1`` every sample appears exactly once. A corrupt image raises
        ``CorruptImageError``, or with ``skip_corrupt`` is left out (and recorded in ``skips``)."""
        from torch.utils.data import DataLoader

        pipe = self.pipeline(rank, world, seed, epoch, shuffle_buffer, batch_size)
        batches = pipe if num_workers == 0 else DataLoader(pipe, batch_size=None, num_workers=num_workers)
        for b in batches:
            for where, reason in b["errors"]:
                if not skip_corrupt:
                    raise CorruptImageError(where, reason)
                if skips is not None:
                    skips.record(self.split, where, reason)
            if b["ids"]:
                yield b["ids"], b["images"], b["labels"]


def factory(cfg: DataConfig, split: str) -> WebDatasetShards:
    n = cfg.train_images if split == "train" else cfg.val_images
    return WebDatasetShards(cfg.root, split=split, resolution=cfg.resolution, max_images=n, seed=cfg.seed)


def stream_split(cfg: DataConfig, split: str, epoch: int = 0, skips: SkipCounter | None = None, batch_size: int = 64):
    """``stream`` of a split in batches of ``batch_size`` with the run's data settings (rank and world from
    ``vfmbench.dist``, ``data.seed``, ``data.shuffle_buffer``, ``data.num_workers``, ``data.skip_corrupt``)."""
    from vfmbench import dist

    return factory(cfg, split).stream(
        rank=dist.rank(), world=dist.world(), seed=cfg.seed, epoch=epoch, shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.num_workers, batch_size=batch_size, skip_corrupt=cfg.skip_corrupt, skips=skips,
    )


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name="webdataset",
            description=f"labelled images in WebDataset tar shards ({LAYOUT}), indexed or streamed, ADM centre crop",
            factory=factory,
            version=VERSION,
            source="local shards (data.root), e.g. timm/imagenet-1k-wds",
            license="that of the images",
            num_classes=0,  # from the layout or the labels
            splits=tuple(SPLITS),
            needs_root=True,
        )
    )
