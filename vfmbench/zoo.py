"""The released-tokenizer zoo: where a release's weights are, and the protocol its rows carry.

A zoo entry is a tokenizer spec with a non-empty ``release`` (``TokenizerSpec`` metadata). Its
weights are a local folder (or file), found in this order:

1. ``tokenizer.weights=PATH``;
2. ``zoo.root=ROOT``: the folder ``ROOT/<tokenizer name>`` (the sweep convention, docs/zoo.md).

Anything else is a ``MissingWeightsError`` naming the release and the command that fetches it,
raised in the run's preflight (seconds, before any run directory is written).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MissingWeightsError
from .specs import TokenizerSpec

# Bump when anything below changes a measured value: it is written into every zoo row's protocol.
ZOO_PROTOCOL = "zoo-v1"


def is_release(spec: TokenizerSpec) -> bool:
    return bool(getattr(spec, "release", ""))


def release_path(spec: TokenizerSpec, cfg) -> Path:
    """The local weights of the zoo entry ``spec`` under run config ``cfg`` (see the module docstring)."""
    fetch = f"Fetch it with `{spec.fetch}`" if spec.fetch else "Fetch it from its release page"
    if cfg.tokenizer.weights:
        path, how = Path(cfg.tokenizer.weights).expanduser(), f"tokenizer.weights={cfg.tokenizer.weights!r}"
    elif cfg.zoo.root:
        path, how = Path(cfg.zoo.root).expanduser() / spec.name, f"zoo.root={cfg.zoo.root!r} (folder ROOT/{spec.name})"
    else:
        raise MissingWeightsError(
            f"tokenizer {spec.name!r} is the released {spec.release!r} and needs its weights: pass --set tokenizer.weights=DIR "
            f"or --set zoo.root=ROOT (with the release in ROOT/{spec.name}). {fetch}."
        )
    if not path.exists():
        where = f"with DIR={path}" if not cfg.tokenizer.weights else "and pass --set tokenizer.weights=DIR"
        raise MissingWeightsError(f"weights of {spec.name!r} (release {spec.release!r}) not found: {how} does not exist. {fetch} {where}.")
    return path


def release_protocol(posterior: str) -> dict[str, Any]:
    """Protocol fields every zoo row carries (equal for all entries, so that they share one table).

    Preprocessing (the dataset's ADM centre crop to ``data.resolution``), the uint8 round trip of
    reconstructions, per-image PSNR, SSIM, LPIPS and rFID against the val split's cached statistics
    are the evaluator's and are written by it; the native resolution of each release is spec data
    (``vfmbench list tokenizers``, the zoo leaderboard), not part of the protocol.
    """
    return {"zoo": ZOO_PROTOCOL, "posterior": posterior}
