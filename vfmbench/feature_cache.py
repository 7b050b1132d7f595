"""VFM tokens of a dataset cached on disk, shared by every run and tokenizer that uses the same VFM.

An entry is a folder ``root/<vfm name>/<key hash>/`` holding ``meta.json`` (the full key, the
token grid and the image count) and safetensors shards ``shard-00000.safetensors``, ... with one
tensor per tapped layer (``layer.<index>``, [n, tokens, D]) and, for entries written with
``prefix=True`` (``cached_tokens_and_prefix``), the class/register tokens of each layer
(``prefix.<index>``, [n, P, D]). The key is the VFM's name, spec
version, weights id, size and input scale, the sorted layers, the storage dtype, whether prefix
tokens are stored, and the caller's ``key_fields`` (which must name the dataset, split, resolution and image count). An entry is
written into a temporary folder and renamed into place, so readers never see a partial one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .interfaces import Vfm

REQUIRED_KEY_FIELDS = ("dataset", "split", "resolution", "images")
FORMAT_VERSION = 1


@dataclass
class CacheStats:
    """Counters a caller can pass to ``cached_tokens`` to see what it did."""

    hits: int = 0  # entries read from disk
    misses: int = 0  # entries computed and written
    vfm_batches: int = 0  # batches run through the VFM
    vfm_images: int = 0


def cache_key(vfm: Vfm, layers: Sequence[int], key_fields: Mapping[str, Any], dtype: torch.dtype = torch.float32,
              prefix: bool = False) -> dict:
    """The full key of an entry (JSON-serialisable)."""
    missing = [k for k in REQUIRED_KEY_FIELDS if k not in key_fields]
    if missing:
        raise ValueError(f"key_fields must name {', '.join(REQUIRED_KEY_FIELDS)}; missing {', '.join(missing)}")
    key = {
        "format": FORMAT_VERSION,
        "vfm": vfm.spec.name,
        "vfm_version": vfm.spec.version,
        "weights_id": vfm.weights_id,
        "size": getattr(vfm, "size", "full"),
        "input_scale": float(getattr(vfm, "input_scale", vfm.spec.input_scale)),
        "layers": sorted(int(i) for i in set(layers)),
        "dtype": str(dtype).replace("torch.", ""),
        "fields": {str(k): key_fields[k] for k in sorted(key_fields)},
    }
    if prefix:  # absent otherwise, so that patch-token-only keys stay as they were
        key["prefix"] = True
    return key


def entry_dir(root: str | Path, key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(root) / key["vfm"] / digest


def _layer_name(i: int) -> str:
    return f"layer.{i}"


def _prefix_name(i: int) -> str:
    return f"prefix.{i}"


def _read(entry: Path, key: Mapping[str, Any]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    from safetensors.torch import load_file

    meta = json.loads((entry / "meta.json").read_text())
    if meta["key"] != json.loads(json.dumps(key, default=str)):
        raise RuntimeError(f"feature cache entry {entry} holds another key; delete the folder")
    names = [(i, _layer_name(i)) for i in key["layers"]]
    if key.get("prefix"):
        names += [(("prefix", i), _prefix_name(i)) for i in key["layers"]]
    parts: dict[Any, list[torch.Tensor]] = {k: [] for k, _ in names}
    for shard in meta["shards"]:
        tensors = load_file(str(entry / shard))
        for k, name in names:
            parts[k].append(tensors[name])
    out = {k: torch.cat(p) for k, p in parts.items()}
    n = next(iter(out.values())).shape[0] if out else 0
    if n != meta["images"]:
        raise RuntimeError(f"feature cache entry {entry} is inconsistent ({n} rows, meta says {meta['images']}); delete the folder")
    tokens = {k: v for k, v in out.items() if not isinstance(k, tuple)}
    prefix = {k[1]: v for k, v in out.items() if isinstance(k, tuple)}
    return tokens, prefix


def cached_tokens(
    vfm: Vfm,
    layers: Sequence[int],
    key_fields: Mapping[str, Any],
    batches: Callable[[], Iterable[torch.Tensor]],
    root: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    shard_images: int = 4096,
    stats: CacheStats | None = None,
) -> dict[int, torch.Tensor]:
    """Patch tokens of every image, {layer: [N, tokens, D]} on the CPU, from the cache or computed once.

    ``batches()`` yields uint8 NCHW image batches in a fixed order; it is called only on a miss.
    ``key_fields`` must hold ``dataset``, ``split``, ``resolution`` and ``images`` (the count,
    checked against what ``batches`` yields) plus anything else that changes the images.
    """
    return _cached(vfm, layers, key_fields, batches, root, dtype=dtype, shard_images=shard_images, stats=stats, prefix=False)[0]


def cached_tokens_and_prefix(
    vfm: Vfm,
    layers: Sequence[int],
    key_fields: Mapping[str, Any],
    batches: Callable[[], Iterable[torch.Tensor]],
    root: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    shard_images: int = 4096,
    stats: CacheStats | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """As ``cached_tokens``, plus the prefix (class/register) tokens: ({layer: [N, tokens, D]}, {layer: [N, P, D]})."""
    return _cached(vfm, layers, key_fields, batches, root, dtype=dtype, shard_images=shard_images, stats=stats, prefix=True)


def _cached(vfm, layers, key_fields, batches, root, *, dtype, shard_images, stats, prefix):
    key = cache_key(vfm, layers, key_fields, dtype, prefix=prefix)
    entry = entry_dir(root, key)
    if (entry / "meta.json").is_file():
        if stats is not None:
            stats.hits += 1
        return _read(entry, key)

    from safetensors.torch import save_file

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        device = next(vfm.parameters()).device
        wanted = key["layers"]
        slots = list(wanted) + ([("prefix", i) for i in wanted] if prefix else [])
        pending: dict[Any, list[torch.Tensor]] = {k: [] for k in slots}
        done: dict[Any, list[torch.Tensor]] = {k: [] for k in slots}
        shards: list[str] = []
        grid, n_pending, n_total = None, 0, 0

        def flush() -> None:
            nonlocal n_pending
            if not n_pending:
                return
            block = {k: torch.cat(pending[k]) for k in slots}
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({(_prefix_name(k[1]) if isinstance(k, tuple) else _layer_name(k)): t.contiguous() for k, t in block.items()},
                      str(tmp / name))
            shards.append(name)
            for k in slots:
                done[k].append(block[k])
                pending[k].clear()
            n_pending = 0

        for images in batches():
            tokens = vfm(images.to(device), wanted)
            grid = tokens.grid
            for i in wanted:
                pending[i].append(tokens.layers[i].detach().to("cpu", dtype))
                if prefix:
                    pending[("prefix", i)].append(tokens.prefix[i].detach().to("cpu", dtype))
            n_pending += images.shape[0]
            n_total += images.shape[0]
            if stats is not None:
                stats.vfm_batches += 1
                stats.vfm_images += images.shape[0]
            if n_pending >= shard_images:
                flush()
        flush()
        if n_total != key_fields["images"]:
            raise ValueError(f"key_fields says images={key_fields['images']} but the batches held {n_total} images")
        meta = {"key": key, "images": n_total, "grid": list(grid) if grid else None, "shards": shards}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not a concurrent writer that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if stats is not None:
        stats.misses += 1
    out = {k: torch.cat(done[k]) if done[k] else torch.empty(0) for k in slots}
    return {i: out[i] for i in wanted}, {i: out[("prefix", i)] for i in wanted} if prefix else {}
