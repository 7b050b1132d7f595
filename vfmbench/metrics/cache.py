"""On-disk cache of feature statistics (reference mu/sigma, radii, ...), keyed by what produced them.

A key is the sha256 of the sorted JSON of its fields. Reference statistics use
``reference_key``, whose fields are fixed: dataset, split, resolution, preprocessing, number of
images, extractor, extractor weights hash and metric version, so that a change in any of them is a
cache miss and never a silently reused statistic. Entries are ``<key>.npz`` (the arrays) plus
``<key>.json`` (the fields and any metadata), each written atomically (temporary file + rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(binary_file)`` on a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sidecar_candidates(path: Path, fallback_dir: Path | None) -> list[Path]:
    out = [path.with_name(path.name + ".sha256.json")]
    if fallback_dir is not None:
        tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        out.append(Path(fallback_dir) / "hashes" / f"{path.name}.{tag}.json")
    return out


def file_sha256(path: str | Path, fallback_dir: str | Path | None = None) -> str:
    """Hex sha256 of a file. The digest is cached in ``<file>.sha256.json`` (or, when that folder is
    read-only, under ``fallback_dir/hashes``) keyed by size and mtime, so it is computed once."""
    path = Path(path)
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    candidates = _sidecar_candidates(path, Path(fallback_dir) if fallback_dir else None)
    for side in candidates:
        try:
            rec = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("size") == stamp["size"] and rec.get("mtime_ns") == stamp["mtime_ns"] and isinstance(rec.get("sha256"), str):
            return rec["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    blob = json.dumps({**stamp, "sha256": digest}).encode()
    for side in candidates:
        try:
            atomic_write(side, lambda f: f.write(blob))
            break
        except OSError:
            continue
    return digest


class StatsCache:
    """Statistics under ``root``: ``get(key)`` -> dict of arrays or None; ``put(key, arrays, meta)``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(**fields: Any) -> str:
        if not fields:
            raise ValueError("a cache key needs at least one field")
        blob = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @staticmethod
    def reference_key(
        *, dataset: str, split: str, resolution: int, preprocessing: str, num_images: int,
        extractor: str, weights: str, metric_version: str,
    ) -> str:
        """The key of a reference statistic; every field is required."""
        return StatsCache.key(
            dataset=dataset, split=split, resolution=int(resolution), preprocessing=preprocessing,
            num_images=int(num_images), extractor=extractor, weights=weights, metric_version=str(metric_version),
        )

    def _paths(self, key: str) -> tuple[Path, Path]:
        if not key or any(ch in key for ch in "/\\") or key.startswith("."):
            raise ValueError(f"invalid cache key {key!r}")
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        npz, meta = self._paths(key)
        if not (npz.is_file() and meta.is_file()):
            return None
        with np.load(npz, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def meta(self, key: str) -> dict[str, Any] | None:
        _, meta = self._paths(key)
        return json.loads(meta.read_text()) if meta.is_file() else None

    def put(self, key: str, arrays: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Path:
        npz, meta_path = self._paths(key)
        arrs = {k: np.asarray(v) for k, v in arrays.items()}
        if any(a.dtype == object for a in arrs.values()):
            raise TypeError("cached statistics must be numeric arrays")
        atomic_write(npz, lambda f: np.savez(f, **arrs))
        blob = json.dumps({"key": key, "arrays": sorted(arrs), **dict(meta or {})}, sort_keys=True, indent=1, default=str)
        # the json is written last: get() needs both, so a crash between the two leaves a miss
        atomic_write(meta_path, lambda f: f.write(blob.encode()))
        return npz
