"""Atomic files: write to a temporary file in the same folder, fsync, rename, fsync the folder.

Training checkpoints (``save_checkpoint``/``load_latest_checkpoint``): the newest is always at the
path the caller names (``ckpt.pt``); up to ``keep - 1`` older ones are kept beside it as
``ckpt.<nimg>.pt``, and resuming falls back to them, newest first, when a file cannot be read.

Reading is safe (docs/security.md): ``load_torch`` reads a safetensors file when the bytes are
one (whatever the name), else ``torch.load(weights_only=True)`` with only ``SAFE_GLOBALS``
allow-listed, so a file can hold tensors, primitive types and containers but can never run code.
A file that asks for anything else is refused (``UnsafeFileError``, exit 2); a truncated or empty
file is an ``UnreadableFileError`` (exit 2) naming it. Weights (flat name -> tensor mappings) are
written as safetensors by ``save_weights``; ``weights_file`` finds them, or the ``.pt`` file of a
run directory written before.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .errors import UserError

# Classes a project file may name besides tensors, primitive types and containers: none so far. A
# class added here must be a plain data holder whose unpickling runs no code of the file's choosing.
SAFE_GLOBALS: list[Any] = []
EXTRA_KEY = "vfmbench.extra_state"  # safetensors metadata: JSON of a state dict's non-tensor entries


class UnreadableFileError(UserError):
    """A weights or checkpoint file that is empty, truncated or not in a format vfmbench reads."""


class UnsafeFileError(UserError):
    """A pickle that names a class or function outside the allow-list: it is never unpickled."""


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


def is_safetensors(path: str | Path) -> bool:
    """Whether the file starts like safetensors: an 8-byte little-endian header length that fits the
    file, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + n <= size


def _describe(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return "cannot be read"
    if size == 0:
        return "is empty (0 bytes)"
    return f"is not a complete safetensors or torch file ({size} bytes; truncated or another format)"


def load_torch(path: str | Path, map_location: Any = "cpu", what: str = "") -> Any:
    """The contents of a safetensors file or a torch file, read without running code.

    ``what`` names where the file came from (e.g. ``tokenizer.weights``) in error messages."""
    path = Path(path)
    label = f"{what} file {str(path)!r}" if what else repr(str(path))
    if not path.is_file():
        raise UnreadableFileError(f"{label} does not exist or is not a file; pass an existing weights file")
    if is_safetensors(path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            out: dict[str, Any] = {k: v.to(map_location) for k, v in load_file(str(path), device="cpu").items()}
            with safe_open(str(path), framework="pt") as f:
                extra = (f.metadata() or {}).get(EXTRA_KEY)
            if extra:
                out.update(json.loads(extra))
            return out
        except Exception as e:
            raise UnreadableFileError(f"{label} is not a readable safetensors file ({type(e).__name__}: {e}); "
                                      "write it again (it may be truncated)") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text:
            detail = text[text.find("Unsupported global"):].split(" was not")[0] if "Unsupported global" in text else "a class or function"
            raise UnsafeFileError(
                f"{label} was refused: its pickle asks for {detail.replace('Unsupported global: GLOBAL ', '')!s}, and vfmbench "
                "loads only tensors, numbers, strings and containers (loading it could run code). Use a safetensors file "
                "or a torch state dict of tensors (see docs/security.md)"
            ) from None
        raise UnreadableFileError(f"{label} {_describe(path)} ({text.splitlines()[0][:160]}); write it again or pass another file") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, struct.error, KeyError, AttributeError, TypeError,
            _SafetensorError) as e:  # torch.load hands a *.safetensors name to safetensors
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UnreadableFileError(f"{label} {_describe(path)} ({type(e).__name__}: {msg}); write it again or pass another file") from None


try:
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # older safetensors
    from safetensors._safetensors_rust import SafetensorError as _SafetensorError


def save_weights(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write a state dict as safetensors, atomically. Tensors are copied (safetensors refuses
    tensors that share storage); other entries (a module's ``_extra_state``) must be JSON data and
    travel in the file's metadata, restored by ``load_torch``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    metadata = {EXTRA_KEY: json.dumps(extra, sort_keys=True)} if extra else None
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def weights_file(path: str | Path) -> Path:
    """The weights file of ``path`` (given with any suffix): ``<stem>.safetensors`` when it exists, else
    ``<stem>.pt`` written by an older vfmbench (when it exists), else the safetensors name (to write)."""
    path = Path(path)
    safe = path.with_suffix(".safetensors")
    if safe.exists():
        return safe
    legacy = path.with_suffix(".pt")
    return legacy if legacy.exists() else safe


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
        except UnsafeFileError:  # not a file this project wrote: never skipped over silently
            raise
        except UnreadableFileError as e:  # a truncated or corrupt file (a kill mid-write)
            print(f"[vfmbench] checkpoint {f} is unreadable ({e}); trying an older one", file=sys.stderr, flush=True)
    return None, None
