"""Contract checks for plugin authors: call them from your own tests (the built-ins run the same).

Each ``check_*`` takes a spec (or a registered name and the ``Host`` holding it), exercises the
component at tiny size on CPU and raises ``AssertionError`` naming what breaks the contract:
spec metadata, the factory at tiny size, shapes and dtypes across the interface (uint8 NCHW
pixels), determinism, the state-dict round trip, the parameter count against
``published_params``, and that nothing (weights) was written into the working folder.

    from vfmbench.testing import check_plugin
    def test_my_plugin():
        check_plugin(my_plugin_module)      # registers it, then checks every component it adds
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .specs import NAME_RE, DecoderSpec, ExtractorSpec, MetricSpec, Spec, StageSpec, TokenizerSpec, VfmSpec

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".onnx")
FAMILIES = ("reconstruction", "generation", "representation", "latent")
METRIC_INPUTS = ("pairs", "distribution", "single", "latents", "encoder")


def _images(n: int, res: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, res, res), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@contextlib.contextmanager
def no_weights_written(folder: str | Path | None = None) -> Iterator[None]:
    """Asserts that no weight-like file (``.pt``, ``.safetensors``, ...) appears under ``folder``
    (default: the working folder, i.e. the repository a test runs in) while the block runs."""
    root = Path(folder or os.getcwd())

    def weights() -> set[Path]:
        return {p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and ".git" not in p.parts and ".venv" not in p.parts}

    before = weights()
    yield
    new = sorted(weights() - before)
    assert not new, f"weights were written into {root}: {[str(p) for p in new[:5]]}; write into cache_dir or a temporary folder"


def check_spec(spec: Spec) -> None:
    """Metadata: a valid name and aliases, a description, a version; a config dataclass if any."""
    import dataclasses

    for key in (spec.name, *spec.aliases):
        assert NAME_RE.match(key), f"{spec.kind} name {key!r} is not lowercase-hyphenated (e.g. 'my-model')"
    assert spec.description.strip(), f"{spec.kind} {spec.name!r} has no description"
    assert str(spec.version).strip(), f"{spec.kind} {spec.name!r} has no version"
    assert spec.config is None or dataclasses.is_dataclass(spec.config), f"{spec.name!r}: config must be a dataclass"
    assert callable(spec.factory), f"{spec.kind} {spec.name!r}: factory is not callable"


def _host(spec: Spec | None = None, host=None):
    from .plugins import get_plugin_manager

    return host if host is not None else get_plugin_manager()


def _config(host, **sections: dict[str, Any]):
    """The smoke preset's config (tiny components, random init, CPU) with ``sections`` merged over it."""
    from .config import resolve

    layers = [dict(host.presets.get("smoke").values), {"run": {"device": "cpu"}}, sections]
    return resolve(layers, host.stages.names())


def _same_state(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> bool:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    same = lambda x, y: torch.equal(x, y) if torch.is_tensor(x) and torch.is_tensor(y) else x == y  # noqa: E731 - _extra_state
    return sa.keys() == sb.keys() and all(same(sa[k], sb[k]) for k in sa)


def check_tokenizer(name: str, host=None, resolution: int = 64, **sections: dict[str, Any]) -> None:
    """The registered tokenizer ``name`` at the smoke preset's tiny size (``sections`` override the
    config, e.g. ``component_args={"my-tok": {...}}``): encode/decode shapes and dtypes, the latent
    shape of its spec, decode_uint8, determinism of the factory (seeded) and of the posterior mean,
    the weights round trip through ``weights_state``, and no weights written."""
    from .build import BuildContext, build_tokenizer
    from .interfaces import DiagonalGaussian, Tokenizer

    host = _host(host=host)
    spec = host.tokenizers.get(name)
    check_spec(spec)
    assert isinstance(spec, TokenizerSpec)
    cfg = _config(host, tokenizer={"name": spec.name, **sections.pop("tokenizer", {})}, data={"resolution": resolution}, **sections)

    def build() -> Tokenizer:
        torch.manual_seed(cfg.run.seed)
        return build_tokenizer(BuildContext(host=host, config=cfg)).eval()

    with no_weights_written():
        tok, again = build(), build()
    assert isinstance(tok, Tokenizer), f"tokenizer {name!r}: the factory returned {type(tok).__name__}, not a Tokenizer"
    assert _same_state(tok, again), f"tokenizer {name!r}: two builds under one seed differ (the factory must be deterministic)"
    x = _images(2, resolution)
    with torch.no_grad():
        post = tok.encode(x)
        assert isinstance(post, DiagonalGaussian), f"tokenizer {name!r}: encode must return a DiagonalGaussian"
        want = (2, *tok.latent_shape(resolution))
        assert tuple(post.mean.shape) == want, f"tokenizer {name!r}: latents {tuple(post.mean.shape)}, latent_shape says {want}"
        assert post.mean.dtype == torch.float32 and post.std.shape == post.mean.shape
        assert torch.equal(post.mean, tok.encode(x).mean), f"tokenizer {name!r}: encode is not deterministic in eval mode"
        rec = tok.decode(post.mean)
        assert tuple(rec.shape) == (2, 3, resolution, resolution) and rec.is_floating_point(), f"decode gave {tuple(rec.shape)} {rec.dtype}"
        u8 = tok.decode_uint8(post.mean)
        assert u8.dtype == torch.uint8 and tuple(u8.shape) == (2, 3, resolution, resolution)
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in tok.weights_state().items()}
        assert not any(k.startswith(tok.frozen_prefixes) for k in state) if tok.frozen_prefixes else True
        torch.manual_seed(cfg.run.seed + 123)
        fresh = build_tokenizer(BuildContext(host=host, config=cfg)).eval()
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith(tok.frozen_prefixes) and not k.endswith("_extra_state")]
        assert not bad and not unexpected, f"tokenizer {name!r}: weights_state does not load back (missing {bad[:3]}, unexpected {unexpected[:3]})"
        assert torch.equal(fresh.encode(x).mean, post.mean), f"tokenizer {name!r}: a reloaded tokenizer encodes differently"


def check_vfm(spec: VfmSpec, size: str = "tiny", resolution: int | None = None, rtol_params: float = 0.1) -> None:
    """A VFM spec: metadata, the parameter count of the full architecture against
    ``published_params`` (within ``rtol_params``: papers round, and count the backbone without the
    pooling heads the libraries build, e.g. SigLIP B/16 '86M' vs 92.9M with its MAP head; a wrong
    width or depth is off by far more), the random-init model at ``size``: frozen,
    float32 ``[B, h*w, D]`` tokens of one width and grid at every default tap, deterministic
    (seeded init, same ``weights_id``), state-dict round trip; no weights written."""
    from .config import VfmConfig
    from .interfaces import Vfm
    from .vfm import build_vfm, vfm_param_count

    check_spec(spec)
    assert isinstance(spec, VfmSpec) and spec.library, f"vfm {spec.name!r}: library is required (named in missing-weights messages)"
    assert spec.resolution > 0 and spec.patch_size > 0 and len(spec.mean) == 3 and len(spec.std) == 3
    if spec.published_params:
        if spec.adapter is not None:
            n = vfm_param_count(spec, "full")
        else:  # no adapter to build on the meta device: the factory's full-size random init
            n = sum(p.numel() for p in build_vfm(spec, VfmConfig(name=spec.name, size="full", pretrained=False)).parameters())
        pub = spec.published_params
        digits = str(pub).rstrip("0")  # a rounded figure ("1.1B") is exact to half its last digit
        tol = max(rtol_params * pub, 0.5 * 10 ** (len(str(pub)) - len(digits)))
        assert abs(n - pub) <= tol, \
            f"vfm {spec.name!r}: {n:,} parameters, published {spec.published_params:,}"
    cfg = VfmConfig(name=spec.name, size=size, pretrained=False)
    with no_weights_written():
        vfm, again = build_vfm(spec, cfg), build_vfm(spec, cfg)
    assert isinstance(vfm, Vfm), f"vfm {spec.name!r}: the factory returned {type(vfm).__name__}"
    assert vfm.weights_id == again.weights_id and vfm.weights_id.startswith("random-init"), \
        f"vfm {spec.name!r}: random init must be seeded and named random-init-... ({vfm.weights_id!r}, {again.weights_id!r})"
    assert not any(p.requires_grad for p in vfm.parameters()), f"vfm {spec.name!r} has trainable parameters"
    res = resolution or vfm.spec.resolution
    x = _images(2, res)
    with torch.no_grad():
        tokens = vfm(x, layers=tuple(vfm.default_layers))
        h, w = tokens.grid
        for i, t in tokens.layers.items():
            assert t.dtype == torch.float32 and tuple(t.shape) == (2, h * w, vfm.embed_dim), \
                f"vfm {spec.name!r}: tap {i} gives {tuple(t.shape)} {t.dtype}, want (2, {h * w}, {vfm.embed_dim}) float32 (one width)"
        assert torch.equal(tokens.layers[vfm.default_layers[-1]], vfm(x, layers=tuple(vfm.default_layers)).layers[vfm.default_layers[-1]])
        assert _same_state(vfm, again), f"vfm {spec.name!r}: two random-init builds differ"


def check_decoder(spec: DecoderSpec, latent_channels: int = 4, downsample: int = 8, args: dict | None = None) -> None:
    """A decoder: ``factory(args, latent_channels, downsample)`` maps [B, C, h, w] to [B, 3, h*f, w*f] float."""
    from .config import validate_args

    check_spec(spec)
    with no_weights_written():
        dec = spec.factory(validate_args(spec.config, args or {}, "decoder.args"), latent_channels, downsample)
    out = dec(torch.randn(2, latent_channels, 4, 4))
    assert tuple(out.shape) == (2, 3, 4 * downsample, 4 * downsample) and out.is_floating_point(), f"decoder {spec.name!r}: {tuple(out.shape)}"


def check_extractor(spec: ExtractorSpec, host=None, resolution: int = 32) -> None:
    """An extractor built for smoke runs (random weights allowed): its outputs are the declared
    features, float arrays with one row (images) or one score (pairs) per image, deterministic; it
    carries ``weights_id``, ``is_official`` and a ``protocol`` dict."""
    host = _host(host=host)
    check_spec(spec)
    assert spec.inputs in ("images", "pairs") and spec.features, f"extractor {spec.name!r}: inputs images|pairs and features required"
    cfg = _config(host)
    with no_weights_written():
        ex = spec.factory(cfg, spec.features, torch.device("cpu"), Path(cfg.run.cache_dir or os.environ.get("VFMBENCH_CACHE_DIR", "~/.cache/vfmbench")).expanduser())
    for attr, typ in (("weights_id", str), ("is_official", bool), ("protocol", dict)):
        assert isinstance(getattr(ex, attr, None), typ), f"extractor {spec.name!r}: attribute {attr} ({typ.__name__}) missing"
    a, b = _images(3, resolution, 1), _images(3, resolution, 2)
    out = ex(a) if spec.inputs == "images" else ex(a, b)
    again = ex(a) if spec.inputs == "images" else ex(a, b)
    assert set(out) == set(spec.features), f"extractor {spec.name!r}: gave {sorted(out)}, declares {sorted(spec.features)}"
    for f, v in out.items():
        v = np.asarray(v)
        assert v.shape[0] == 3 and np.issubdtype(v.dtype, np.floating) and np.isfinite(v).all(), f"extractor {spec.name!r}: {f} {v.shape} {v.dtype}"
        assert spec.inputs == "images" or v.ndim == 1, f"extractor {spec.name!r}: pair scores must be [N], got {v.shape}"
        np.testing.assert_array_equal(v, np.asarray(again[f]), err_msg=f"extractor {spec.name!r}: {f} is not deterministic")


def check_metric(spec: MetricSpec, host=None) -> None:
    """A metric: metadata (family, inputs, direction), its extractor/feature known to the registered
    extractors, pure ``stats``/``value`` that give the same finite float twice on synthetic features."""
    from .plugins import metric_feature_problem

    host = _host(host=host)
    check_spec(spec)
    assert spec.family in FAMILIES, f"metric {spec.name!r}: family {spec.family!r} not in {FAMILIES}"
    assert spec.inputs in METRIC_INPUTS, f"metric {spec.name!r}: inputs {spec.inputs!r} not in {METRIC_INPUTS}"
    assert callable(spec.stats) and callable(spec.value), f"metric {spec.name!r}: stats and value must be callables"
    problem = metric_feature_problem(spec, host.extractors)
    assert not problem, problem
    if spec.inputs == "latents":
        return  # needs a trained probe: exercised by the latents/probe stages
    kwargs = {"splits": 2} if "splits" in inspect.signature(spec.stats).parameters else {}

    def data(seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        if spec.inputs == "pairs":
            return r.uniform(0.1, 1.0, 16)
        if spec.inputs == "encoder":  # per-image equivariance errors by transform group
            return {"rotation": r.uniform(0.1, 1.0, 16), "scale": r.uniform(0.1, 1.0, 16)}
        if spec.feature == "logits":
            return r.normal(size=(32, 10))
        return r.normal(size=(32, 6))

    ref = spec.stats(data(2), **kwargs) if spec.inputs == "distribution" else None
    values = [spec.value(spec.stats(data(1), **kwargs), ref) for _ in range(2)]
    values = [v["value"] if isinstance(v, dict) else v for v in values]
    assert all(isinstance(float(v), float) and math.isfinite(float(v)) for v in values), f"metric {spec.name!r}: values {values}"
    assert float(values[0]) == float(values[1]), f"metric {spec.name!r}: stats/value are not pure ({values})"


def check_stage(spec: StageSpec, host=None) -> None:
    """A stage: metadata, a ``run`` callable, artifact names, every need produced by some registered
    stage, and a place in the stage order (no cycle with the registered stages)."""
    from .planner import stage_order

    host = _host(host=host)
    check_spec(spec)
    assert callable(spec.run), f"stage {spec.name!r}: run(ctx) -> info is required"
    for a in (*spec.needs, *spec.produces, *spec.uses):
        assert NAME_RE.match(a), f"stage {spec.name!r}: artifact {a!r} is not lowercase-hyphenated"
    produced = {a for s in host.stages for a in s.produces}
    missing = [a for a in spec.needs if a not in produced]
    assert not missing, f"stage {spec.name!r} needs {missing}, which no registered stage produces"
    assert spec.name in stage_order(host), f"stage {spec.name!r} is not registered in this host"


def check_plugin(plugin: Any, name: str = "plugin-under-test", requires: list[tuple[str, Any]] = (), **tokenizer_sections: dict[str, Any]) -> dict[str, list[str]]:
    """Register ``plugin`` (a module or object with hook implementations) next to the built-ins and
    the ``(name, plugin)`` pairs it ``requires`` (e.g. the extractor a metric reads); it must load
    without failing; then every component it registers goes through its check. Returns what it registered."""
    from .plugins import get_plugin_manager

    host = get_plugin_manager(extra_plugins=[*requires, (name, plugin)])
    assert name not in host.failed, f"plugin failed to load: {host.failed[name].error if name in host.failed else ''}"
    components = host.plugins[name].components
    for kind, names in components.items():
        for n in names:
            spec = host[kind].get(n)
            if kind == "tokenizers":
                check_tokenizer(n, host, **tokenizer_sections)
            elif kind == "vfms":
                check_vfm(spec)
            elif kind == "decoders":
                check_decoder(spec)
            elif kind == "extractors":
                check_extractor(spec, host)
            elif kind == "metrics":
                check_metric(spec, host)
            elif kind == "stages":
                check_stage(spec, host)
            else:
                check_spec(spec)
    return components
