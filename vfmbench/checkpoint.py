"""Atomic files: write to a temporary file in the same folder, fsync, rename, fsync the folder.

Training checkpoints (``save_checkpoint``/``load_latest_checkpoint``): the newest is always at the
path the caller names (``ckpt.pt``); up to ``keep - 1`` older ones are kept beside it as
``ckpt.<nimg>.pt``, and resuming falls back to them, newest first, when a file cannot be read.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_torch(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def load_torch(path: str | Path, map_location: Any = "cpu") -> Any:
    return torch.load(path, map_location=map_location, weights_only=False)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _numbered(path: Path, nimg: int) -> Path:
    return path.with_name(f"{path.stem}.{nimg:012d}{path.suffix}")


def checkpoint_history(path: str | Path) -> list[tuple[int, Path]]:
    """The older checkpoints kept beside ``path`` as (nimg, file), newest first."""
    path = Path(path)
    pattern = re.compile(re.escape(path.stem) + r"\.(\d{12})" + re.escape(path.suffix) + "$")
    found = []
    if path.parent.is_dir():
        for f in path.parent.iterdir():
            m = pattern.match(f.name)
            if m:
                found.append((int(m.group(1)), f))
    return sorted(found, reverse=True)


def save_checkpoint(state: Any, path: str | Path, nimg: int, previous_nimg: int | None, keep: int = 2) -> Path:
    """Write ``state`` atomically to ``path``, first moving the checkpoint already there (written at
    ``previous_nimg`` images; None = unknown, it is then replaced) to ``<stem>.<nimg>.pt``, and keep
    the newest ``keep`` checkpoints in all."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    if keep > 1 and previous_nimg is not None and previous_nimg != nimg and path.exists():
        os.replace(path, _numbered(path, previous_nimg))
    save_torch(state, path)
    for _, old in checkpoint_history(path)[keep - 1 :]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(path: str | Path, map_location: Any = "cpu") -> tuple[Any, Path | None]:
    """The newest readable checkpoint: ``path``, else the kept older ones, newest first.
    Returns (state, file) or (None, None) when there is none; unreadable files are reported and skipped."""
    path = Path(path)
    candidates = ([path] if path.exists() else []) + [f for _, f in checkpoint_history(path)]
    for f in candidates:
        try:
            return load_torch(f, map_location), f
        except Exception as e:  # a truncated or corrupt file: torch raises several types
            print(f"[vfmbench] checkpoint {f} is unreadable ({type(e).__name__}: {e}); trying an older one", file=sys.stderr, flush=True)
    return None, None
