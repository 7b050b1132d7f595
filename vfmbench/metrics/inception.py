"""The Inception-v3 feature extractor of FID, IS and sFID: torch-fidelity's ``inception-v3-compat``
(a port of the TF 2015-12-05 graph the ADM evaluator and the original FID use, including TF1's
bilinear resize to 299).

Outputs per image (float64 numpy):

* ``pool``    [2048]  pool_3 features (FID, KID, precision/recall);
* ``logits``  [1008]  ``logits_unbiased``, the fc layer without its bias (IS, as torch-fidelity);
* ``spatial`` [2023]  the ADM evaluator's sFID features: TF tensor ``mixed_6/conv:0`` is the ReLU
  output of the 1x1 branch of the 5th 17x17 block, ``Mixed_6d.branch1x1`` in torch-fidelity's
  module names (its weight converter maps ``mixed_6/conv`` there); the first 7 of its 192 channels,
  flattened in TF's NHWC order (17 * 17 * 7 = 2023). It is captured by a forward hook.

Weights: ``resolve_inception_weights`` looks at an explicit path, then torch hub's cache
(``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``). Without either, a
smoke run (``run.smoke``) generates once a deterministic He-initialised file; anything else is a
``MissingWeightsError``. Random weights give numbers that only test the plumbing: they are labelled
by ``is_official = False`` (the official file's sha256 starts with 6726825d, its name says so).
The file is read by vfmbench without running code (``safe_state_buffer``) and handed to
torch-fidelity's extractor as an in-memory state dict; torch-fidelity never opens the user's file.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import MissingWeightsError
from .cache import atomic_write, file_sha256

OFFICIAL_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
OFFICIAL_SHA256_PREFIX = "6726825d"
OFFICIAL_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + OFFICIAL_FILENAME
SMOKE_SEED = 0
SMOKE_FILENAME = f"inception-smoke-he-seed{SMOKE_SEED}.pth"
FEATURES = ("pool", "logits", "spatial")
SPATIAL_CHANNELS = 7


def hub_weights_path() -> Path:
    """Where torch hub (and so torch-fidelity) caches the official weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / OFFICIAL_FILENAME


def is_official_sha256(sha256: str) -> bool:
    return sha256.lower().startswith(OFFICIAL_SHA256_PREFIX)


def _skeleton_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        """The same architecture and state-dict keys; loading a state dict is skipped."""

        def load_state_dict(self, state_dict, *args, **kwargs):  # noqa: D401
            return None

    return _Skeleton


def make_smoke_inception_weights(dest: str | Path, seed: int = SMOKE_SEED) -> Path:
    """Write a random-init Inception state dict for smoke runs: He-normal convs (fan_in, relu) and
    N(0, 0.01) fc weights with zero bias. PyTorch's default init makes activations vanish through
    the ~90 conv layers (every FID would be 0), hence He init. Deterministic for a seed; atomic."""
    dest = Path(dest)
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _skeleton_class()("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(mod, torch.nn.Linear):
                torch.nn.init.normal_(mod.weight, std=0.01)
                torch.nn.init.zeros_(mod.bias)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    atomic_write(dest, lambda f: torch.save(state, f))
    return dest


def safe_state_buffer(path: str | Path) -> io.BytesIO:
    """The Inception state dict of ``path`` read by vfmbench without running code (safetensors, or
    ``torch.load(weights_only=True)``), re-serialised in memory as a plain dict of tensors: what
    torch-fidelity's extractor reads instead of the user's file (its own loader unpickles freely)."""
    from ..checkpoint import UnreadableFileError, load_torch

    state = load_torch(path, "cpu", what="Inception weights")
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UnreadableFileError(
            f"Inception weights file {str(path)!r} does not hold a state dict of tensors; "
            f"download {OFFICIAL_URL} and pass its path with --set metrics.inception_weights=PATH"
        )
    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in state.items()}, buf)
    buf.seek(0)
    return buf


def resolve_inception_weights(path: str, smoke: bool, cache_dir: Path) -> tuple[Path, str, bool]:
    """(weights file, weights id = first 16 hex of its sha256, is the official file)."""
    cache_dir = Path(cache_dir)
    looked = []
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingWeightsError(
                f"Inception weights file {str(p)!r} (metrics.inception_weights) does not exist; "
                f"download {OFFICIAL_URL} and pass its path with --set metrics.inception_weights=PATH"
            )
        chosen = p
    else:
        hub = hub_weights_path()
        looked.append(str(hub))
        if hub.is_file():
            chosen = hub
        elif smoke:
            chosen = cache_dir / SMOKE_FILENAME
            if not chosen.is_file():
                make_smoke_inception_weights(chosen)
        else:
            raise MissingWeightsError(
                f"Inception weights for FID/IS/sFID were not found (looked at: metrics.inception_weights, empty; "
                f"{', '.join(looked)}). Download {OFFICIAL_URL} and either put it at {hub} or pass "
                "--set metrics.inception_weights=PATH; for a CPU smoke test, --set run.smoke=true uses random "
                "weights (its numbers are labelled smoke)"
            )
    sha = file_sha256(chosen, cache_dir)
    return chosen, sha[:16], is_official_sha256(sha)


class InceptionFeatures:
    """Batched, gradient-free Inception features of uint8 NCHW images -> dict of float64 arrays."""

    def __init__(
        self,
        weights_path: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        features: Sequence[str] = FEATURES,
        weights_id: str = "",
        is_official: bool = False,
    ):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        unknown = [f for f in features if f not in FEATURES]
        if unknown or not features:
            raise ValueError(f"unknown Inception features {unknown}; choose from {FEATURES}")
        self.features = tuple(features)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.weights_path = Path(weights_path)
        self.weights_id = weights_id
        self.is_official = is_official
        inner = []
        if "pool" in self.features:
            inner.append("2048")
        if "logits" in self.features:
            inner.append("logits_unbiased")
        if not inner:  # spatial only: stop the forward pass right after the 17x17 blocks
            inner.append("768")
        self._inner = inner
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", inner, feature_extractor_weights_path=safe_state_buffer(weights_path))
        self.model.to(self.device).eval()
        self._spatial: torch.Tensor | None = None
        if "spatial" in self.features:
            self.model.Mixed_6d.branch1x1.register_forward_hook(self._capture)

    @classmethod
    def from_config(cls, weights: str, smoke: bool, cache_dir: Path, device: str | torch.device = "cpu",
                    batch_size: int = 64, features: Sequence[str] = FEATURES) -> "InceptionFeatures":
        path, wid, official = resolve_inception_weights(weights, smoke, cache_dir)
        return cls(path, device, batch_size, features, weights_id=wid, is_official=official)

    def _capture(self, module, inputs, output) -> None:
        # [B, 192, 17, 17] -> first 7 channels in NHWC order, flattened: [B, 2023]
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).double()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise TypeError(f"images must be a uint8 N x 3 x H x W tensor, got {getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
        out: dict[str, list[np.ndarray]] = {f: [] for f in self.features}
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device)
            self._spatial = None
            res = dict(zip(self._inner, self.model(x)))
            if "pool" in out:
                out["pool"].append(res["2048"].double().cpu().numpy())
            if "logits" in out:
                out["logits"].append(res["logits_unbiased"].double().cpu().numpy())
            if "spatial" in out:
                out["spatial"].append(self._spatial.cpu().numpy())
        dims = {"pool": 2048, "logits": 1008, "spatial": 17 * 17 * SPATIAL_CHANNELS}
        return {f: (np.concatenate(v) if v else np.zeros((0, dims[f]))) for f, v in out.items()}
