"""Evaluation orchestration: feature extraction, reference statistics (cached), and the metric
specs' pure ``stats``/``value`` stages, producing protocol-complete rows.

Feature extractors are plugins (``register_extractors``; built-ins ``inception``, ``lpips-vgg``,
``pixels``): each selected metric names its extractor and feature, and features are keyed
``extractor/feature``. A feature set is computed once per image set and shared by every metric that
reads it (rFID, KID, precision/recall and sFID all read one Inception pass). Reference features of a dataset split
are cached on disk, keyed by (dataset id, split, resolution, number of images, extractor and its
weights hash), and reused across runs and combinations.

Under torchrun an evaluator with ``sharded=True`` is used by every rank together: each rank adds
the features of its own block of images (``vfmbench.dist.shard_batches``), reference features of a
cache miss are computed likewise from each rank's block, and ``finish`` gathers everything to rank 0
in rank order (= index order, each image once), where the metrics are computed and the reference
cached; the other ranks get no rows.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from . import dist
from .config import RunConfig
from .metrics.cache import StatsCache
from .plugins import Host
from .specs import MetricSpec

INCEPTION = "inception"
LPIPS = "lpips-vgg"
FEATURE_INPUTS = {"distribution": "images", "single": "images", "pairs": "pairs"}  # metric inputs -> extractor inputs


@dataclass
class Reference:
    """What candidates are compared with: an id for the protocol, lazily computed features, and
    precomputed statistics per feature (e.g. an ADM batch's mu/sigma) for 'gaussian' metrics; both
    keyed ``extractor/feature`` (``inception/pool``)."""

    id: str
    features: Callable[[], dict[str, np.ndarray]] | None
    stats_override: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    _cache: dict[str, np.ndarray] | None = None

    def get_features(self) -> dict[str, np.ndarray] | None:
        if self._cache is None and self.features is not None:
            self._cache = self.features()
        return self._cache


def _key(spec: MetricSpec) -> str:
    """Where a metric's features are kept: ``extractor/feature``."""
    return f"{spec.extractor}/{spec.feature}"


def _concat_parts(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-rank feature arrays joined in rank order (a rank without images contributes nothing)."""
    names = sorted({k for p in parts for k in p})
    return {k: np.concatenate([p[k] for p in parts if k in p]) for k in names}


class Evaluator:
    """Accumulates features of one candidate set, then computes every selected metric of a family."""

    def __init__(self, host: Host, cfg: RunConfig, device: torch.device, cache_dir: Path, sharded: bool = False):
        self.host, self.cfg, self.device, self.cache_dir = host, cfg, device, Path(cache_dir)
        # True: every rank calls add_*/finish together on its own block of images (see the module docstring)
        self.sharded = sharded
        names = cfg.metrics.names or host.metrics.names()
        self.specs: list[MetricSpec] = [host.metrics.get(n) for n in names]
        self._extractors: dict[str, Any] = {}
        self._features: dict[str, list[np.ndarray]] = defaultdict(list)
        self._pairs: dict[str, list[np.ndarray]] = defaultdict(list)
        self.cache = StatsCache(self.cache_dir / "reference")
        self.reference_cache_hits = 0
        self.image_feature_cache = {"hits": 0, "misses": 0}  # content-addressed candidate features

    # -- extractors -------------------------------------------------------------------------------
    def family_specs(self, family: str) -> list[MetricSpec]:
        return [s for s in self.specs if s.family == family]

    def features_needed(self, inputs: str, family: str | None = None) -> dict[str, tuple[str, ...]]:
        """Extractor name -> the features the selected metrics read from it (extractors taking ``inputs``)."""
        need: dict[str, set[str]] = defaultdict(set)
        for s in self.specs:
            if FEATURE_INPUTS.get(s.inputs) == inputs and (family is None or s.family == family):
                need[s.extractor].add(s.feature)
        return {k: tuple(sorted(v)) for k, v in sorted(need.items())}

    def check_weights(self) -> None:
        """Build every extractor the selected metrics need (resolving weights: raises
        MissingWeightsError with where it looked); pair extractors only when recon-eval runs."""
        for name in self.features_needed("images"):
            self.extractor(name)
        if "recon-eval" in self.cfg.run.stages:
            for name in self.features_needed("pairs"):
                self.extractor(name)

    def extractor(self, name: str):
        """The built extractor ``name`` (``ExtractorSpec.factory``), for the features the metrics read."""
        if name not in self._extractors:
            spec = self.host.extractors.get(name)
            feats = self.features_needed(spec.inputs).get(spec.name) or spec.features
            self._extractors[name] = spec.factory(self.cfg, feats, self.device, self.cache_dir)
        return self._extractors[name]

    def inception(self):
        return self.extractor(INCEPTION).net

    def lpips(self):
        return self.extractor(LPIPS).net

    # -- accumulation -----------------------------------------------------------------------------
    def _content_cached(self, kind: str, tensors: tuple[torch.Tensor, ...], compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``compute()``'s arrays for these exact pixels, from the on-disk cache when they were computed
        before (``metrics.cache_image_features``). The key is a hash of the uint8 bytes, their shapes and
        ``kind`` (extractor, weights id, feature names), so a second run that reproduces the same
        reconstructions or samples reads their features instead of running the extractor again."""
        if not self.cfg.metrics.cache_image_features:
            return compute()
        import hashlib
        import os

        h = hashlib.blake2b(digest_size=20)
        h.update(kind.encode())
        for t in tensors:
            x = t.detach().cpu().contiguous()
            h.update(f"{tuple(x.shape)}{x.dtype}".encode())
            h.update(x.numpy().tobytes())
        path = self.cache_dir / "image-features" / f"{h.hexdigest()}.npz"
        if path.exists():
            try:
                with np.load(path) as z:
                    out = {k: z[k] for k in z.files}
                self.image_feature_cache["hits"] += 1
                return out
            except (OSError, ValueError):  # torn or foreign file: compute again and overwrite
                pass
        out = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **out)
        os.replace(tmp, path)
        self.image_feature_cache["misses"] += 1
        return out

    def _extract(self, name: str, *tensors: torch.Tensor) -> dict[str, np.ndarray]:
        """One extractor's outputs of ``tensors`` (images, or images and reconstructions), read from
        the content cache when its ``cache_name`` is set."""
        ex = self.extractor(name)
        cache_name = getattr(ex, "cache_name", name)
        if not cache_name:
            return ex(*tensors)
        kind = f"{cache_name}:{ex.weights_id}:{','.join(ex.features)}"
        return self._content_cached(kind, tensors, lambda: ex(*tensors))

    def add_samples(self, images: torch.Tensor) -> None:
        for name, feats in self.features_needed("images").items():
            out = self._extract(name, images)
            for f in feats:
                self._features[f"{name}/{f}"].append(out[f])

    def add_pairs(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        self.add_samples(recon)
        for name, feats in self.features_needed("pairs", "reconstruction").items():
            out = self._extract(name, images, recon)
            for f in feats:
                self._pairs[f"{name}/{f}"].append(out[f])

    def dataset_reference(self, key: dict[str, Any], batches: Callable[[], Iterable[torch.Tensor]], take: int | None = None) -> "Reference":
        """A dataset split as the reference; its Inception features are cached on disk and reused.
        With ``sharded``, ``batches()`` yields this rank's block of the split only. ``take``: the
        reference is the first ``take`` of the ``key['num_images']`` images (one cached feature set
        then serves references of several sizes, e.g. rFID on a prefix and gFID on the whole split)."""
        n = key["num_images"] if take is None else min(int(take), key["num_images"])
        rid = f"{key['dataset']}:{key['split']}:{n}"
        if n == key["num_images"]:
            return Reference(rid, lambda: self._cached_features(key, batches))
        return Reference(rid, lambda: {k: v[:n] for k, v in self._cached_features(key, batches).items()})

    def images_reference(self, rid: str, images: torch.Tensor, key: dict[str, Any]) -> "Reference":
        """In-memory images (a folder, an npz) as the reference, cached under ``key``."""
        bs = self.cfg.metrics.batch_size

        def batches():
            if self._distributed():
                return (images[start:stop] for _, start, stop in dist.shard_batches(images.shape[0], bs))
            return (images[i : i + bs] for i in range(0, images.shape[0], bs))

        return Reference(rid, lambda: self._cached_features(key, batches))

    def adm_reference(self, path: str | Path) -> "Reference":
        """An ADM reference batch: its mu/sigma (and mu_s/sigma_s) stand in for FID/sFID reference
        statistics; its images (arr_0), when present, give the features of the other metrics."""
        from .metrics.adm import load_reference_batch
        from .metrics.cache import file_sha256

        ref = load_reference_batch(path)
        sha = file_sha256(path, self.cache_dir)[:16]
        override = {}
        if ref.pool_stats() is not None:
            override[f"{INCEPTION}/pool"] = dict(zip(("mu", "sigma"), ref.pool_stats()))
        if ref.spatial_stats() is not None:
            override[f"{INCEPTION}/spatial"] = dict(zip(("mu", "sigma"), ref.spatial_stats()))
        features = None
        if ref.images is not None:
            images = ref.images_nchw()
            features = self.images_reference("", images, {"adm_npz": sha, "num_images": int(images.shape[0])}).features
        return Reference(f"adm:{Path(path).name}:{sha}", features, override)

    def _cached_features(self, key: dict[str, Any], batches: Callable[[], Iterable[torch.Tensor]]) -> dict[str, np.ndarray]:
        """Every needed image extractor's features of a reference set, ``extractor/feature`` keyed;
        each extractor's are cached on disk under ``key`` plus its cache name, weights and features."""
        sharded = self._distributed()
        entries = []
        for name in self.features_needed("images"):
            ex = self.extractor(name)
            full_key = {**key, "extractor": getattr(ex, "cache_name", name) or name, "weights": ex.weights_id, "features": list(ex.features), "version": 1}
            k = self.cache.key(**full_key)
            entries.append((name, ex, full_key, k, self.cache.get(k) if dist.is_main() or not sharded else None))
        hits = [e[4] is not None for e in entries]
        if sharded:
            hits = dist.broadcast_object(hits)
        out: dict[str, np.ndarray] = {}
        for (name, _, _, _, hit), is_hit in zip(entries, hits):
            if is_hit:
                self.reference_cache_hits += 1
                out.update({f"{name}/{f}": v for f, v in (hit or {}).items()})
        todo = [e for e, is_hit in zip(entries, hits) if not is_hit]
        if todo:
            acc: dict[str, list[np.ndarray]] = defaultdict(list)
            for images in batches():
                images = images.to(self.device)
                for name, ex, *_ in todo:
                    for f, v in ex(images).items():
                        acc[f"{name}/{f}"].append(v)
            local = {k: np.concatenate(v) for k, v in acc.items()}
            parts = dist.gather_object(local) if sharded else [local]
            if parts is not None:
                arrays = _concat_parts(parts)
                for name, ex, full_key, k, _ in todo:
                    mine = {f: arrays[f"{name}/{f}"] for f in ex.features}
                    self.cache.put(k, mine, meta=full_key)
                    out.update({f"{name}/{f}": v for f, v in mine.items()})
        if sharded and not dist.is_main():
            return {}  # rank 0 holds the features
        return out

    def _distributed(self) -> bool:
        return self.sharded and dist.is_distributed()

    def _gather(self, reference: "Reference", needs_reference: bool) -> bool:
        """Sharded: bring every rank's features (and the reference's, on a cache miss) to rank 0 in
        rank order. Returns whether this rank computes the metrics."""
        if not self._distributed():
            return True
        local = ({k: np.concatenate(v) for k, v in self._features.items()}, {k: np.concatenate(v) for k, v in self._pairs.items()})
        self._features.clear()
        self._pairs.clear()
        parts = dist.gather_object(local)
        if needs_reference:
            reference.get_features()  # collective on a cache miss
        if parts is None:
            return False
        for target, merged in ((self._features, _concat_parts([f for f, _ in parts])), (self._pairs, _concat_parts([p for _, p in parts]))):
            for k, v in merged.items():
                target[k].append(v)
        return True

    # -- values -----------------------------------------------------------------------------------
    def finish(self, family: str, reference: "Reference", extra_protocol: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Compute the family's metrics on what was accumulated, then reset the accumulators.
        With ``sharded``, a collective: rank 0 gets the rows of every rank's images, the others []."""
        specs = [s for s in self.family_specs(family) if s.inputs in ("distribution", "single", "pairs")]
        needs_reference = reference.features is not None and any(
            s.inputs == "distribution" and not (s.stats_kind == "gaussian" and _key(s) in reference.stats_override) for s in specs)
        if not self._gather(reference, needs_reference):
            return []
        features = {k: np.concatenate(v) for k, v in self._features.items()}
        pairs = {k: np.concatenate(v) for k, v in self._pairs.items()}
        self._features.clear()
        self._pairs.clear()
        n = next((len(v) for v in features.values()), next((len(v) for v in pairs.values()), 0))
        protocol: dict[str, Any] = {"num_images": int(n), "reference": reference.id, "precision": self.cfg.run.precision}
        if self.cfg.run.tf32:
            protocol["tf32"] = True
        smoke = self.cfg.run.smoke
        for name in sorted({s.extractor for s in specs}):  # what each extractor the family read adds
            ex = self.extractor(name)
            protocol.update(getattr(ex, "protocol", {}))
            smoke = smoke or not ex.is_official
        protocol.update(extra_protocol or {})
        memo: dict[tuple, Any] = {}

        def stats(spec: MetricSpec, which: str, data: Any) -> Any:
            key = (spec.stats, spec.extractor, spec.feature, which)  # one stats pass per feature set
            if key not in memo:
                memo[key] = spec.stats(data, **self._stats_kwargs(spec))
            return memo[key]

        rows = []
        for s in specs:
            if s.inputs == "pairs":
                value = s.value(stats(s, "pairs", pairs[_key(s)]), None)
            elif s.inputs == "single":
                value = s.value(stats(s, "candidate", features[_key(s)]), None)
            else:
                if s.stats_kind == "gaussian" and _key(s) in reference.stats_override:
                    ref_stats = reference.stats_override[_key(s)]
                else:
                    ref_features = reference.get_features()
                    if ref_features is None:
                        continue  # e.g. KID against an ADM batch that carries statistics only
                    ref_stats = stats(s, "reference", ref_features[_key(s)])
                value = s.value(stats(s, "candidate", features[_key(s)]), ref_stats)
            rows.append(self._row(s, value, protocol, smoke))
        return rows

    def _stats_kwargs(self, spec: MetricSpec) -> dict[str, Any]:
        """Protocol settings a stats stage declares as keyword arguments (e.g. the IS split count)."""
        import inspect

        params = inspect.signature(spec.stats).parameters
        settings = {"splits": self.cfg.metrics.isc_splits, "split_order": self.cfg.metrics.isc_split_order}
        return {k: v for k, v in settings.items() if k in params}

    @staticmethod
    def _row(spec: MetricSpec, value: Any, protocol: dict[str, Any], smoke: bool) -> dict[str, Any]:
        extra = {}
        if isinstance(value, dict):  # e.g. FID with its regularisation note
            extra = {k: v for k, v in value.items() if k != "value"}
            value = value["value"]
        return {"metric": spec.name, "metric_version": spec.version, "family": spec.family, "value": float(value),
                "higher_is_better": spec.higher_is_better, "protocol": {**protocol, **extra}, "smoke": smoke}

    def probe(self, ztr: torch.Tensor, ytr: torch.Tensor, zva: torch.Tensor, yva: torch.Tensor, num_classes: int) -> list[dict[str, Any]]:
        from .metrics.probe import ProbeRecipe

        specs = [s for s in self.family_specs("representation") if s.inputs == "latents"]
        if not specs:
            return []
        recipe = ProbeRecipe.from_config(self.cfg.metrics.probe, seed=self.cfg.run.seed)
        features = {"train_latents": ztr, "train_labels": ytr, "val_latents": zva, "val_labels": yva,
                    "recipe": recipe, "num_classes": num_classes}
        protocol = {"num_images": int(zva.shape[0]), "train_images": int(ztr.shape[0]), "latents": "posterior sample", **recipe.protocol()}
        memo: dict[Any, Any] = {}
        rows = []
        for s in specs:
            if s.stats not in memo:  # top-1 and top-5 share one trained probe
                memo[s.stats] = s.stats(features)
            try:
                value = s.value(memo[s.stats], None)
            except ValueError:
                continue  # e.g. top-5 with 5 classes or fewer
            rows.append(self._row(s, value, protocol, self.cfg.run.smoke))
        return rows
