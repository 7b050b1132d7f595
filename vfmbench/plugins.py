"""The plugin host: builds a pluggy manager from the ``vfmbench`` entry-point group and one
registry per kind of component. Nothing happens at import time; callers build a ``Host`` and pass
it down.

Built-in plugins (entry points of the ``vfmbench`` distribution itself) always load, unless named
in ``VFMBENCH_DISABLE_PLUGINS``. Third-party plugins (installed, or files of ``--plugins-dir``) load
when ``VFMBENCH_LOAD_PLUGINS`` is unset, or when it names them (comma-separated; an empty value loads
none beyond the built-ins). Both variables take entry-point names or distribution names; a name that
matches nothing is warned about.

Failure isolation: a plugin that fails to import or to register (an exception in its hook, an
invalid or duplicate name, a spec of the wrong kind) is recorded in ``Host.failed`` with the error,
and none of its components are registered; the others load. ``vfmbench plugins`` lists it; a
command that needs one of its components fails with exit 2 naming it (``Registry.canonical``).
Components of disabled plugins are known by name (``Registry.disabled``), so that asking for one
says that its plugin is disabled rather than that the name is unknown.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any, Callable

import pluggy

from . import hookspecs
from .registry import Registry
from .specs import KINDS, Spec

ENTRY_POINT_GROUP = "vfmbench"
BUILTIN_DIST = "vfmbench"

# hook name -> registry kind
REGISTRATION_HOOKS = {
    "register_tokenizers": "tokenizers",
    "register_vfms": "vfms",
    "register_decoders": "decoders",
    "register_diffusion_models": "diffusion",
    "register_datasets": "datasets",
    "register_extractors": "extractors",
    "register_metrics": "metrics",
    "register_presets": "presets",
    "register_stages": "stages",
}


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str
    version: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    status: str = "loaded"  # loaded | failed | disabled
    error: str = ""  # failed: what went wrong (exception type and message); disabled: why


@dataclass
class Host:
    """The plugin manager, its plugins' metadata and the registries they filled."""

    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo]
    registries: dict[str, Registry]
    failed: dict[str, PluginInfo] = field(default_factory=dict)
    disabled: dict[str, PluginInfo] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> Registry:
        return self.registries[kind]

    @property
    def tokenizers(self) -> Registry:
        return self.registries["tokenizers"]

    @property
    def vfms(self) -> Registry:
        return self.registries["vfms"]

    @property
    def decoders(self) -> Registry:
        return self.registries["decoders"]

    @property
    def diffusion(self) -> Registry:
        return self.registries["diffusion"]

    @property
    def datasets(self) -> Registry:
        return self.registries["datasets"]

    @property
    def extractors(self) -> Registry:
        return self.registries["extractors"]

    @property
    def metrics(self) -> Registry:
        return self.registries["metrics"]

    @property
    def presets(self) -> Registry:
        return self.registries["presets"]

    @property
    def stages(self) -> Registry:
        return self.registries["stages"]

    def versions(self) -> dict[str, str]:
        return {n: p.version for n, p in sorted(self.plugins.items())}


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {x.strip() for x in raw.split(",") if x.strip()}


def _norm(name: str) -> str:
    """Distribution names compare as PyPI does: case-insensitive, '-', '_' and '.' alike."""
    return name.lower().replace("_", "-").replace(".", "-")


def _matches(names: set[str], plugin: str, dist: str) -> bool:
    return plugin in names or _norm(dist) in {_norm(n) for n in names}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def warn(msg: str) -> None:
    print(f"[vfmbench] warning: {msg}", file=sys.stderr, flush=True)


@dataclass
class _Candidate:
    info: PluginInfo
    load: Callable[[], Any]  # imports the module (or returns the object)


def _candidates(extra_plugins, local_plugins) -> list[_Candidate]:
    eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    if not any(ep.dist is not None and ep.dist.name == BUILTIN_DIST for ep in eps):
        raise RuntimeError(
            "no built-in vfmbench plugins found in the 'vfmbench' entry-point group: "
            "install the package (pip install -e .) so that its entry points are registered"
        )
    out = []
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else "?"
        info = PluginInfo(name=ep.name, module=ep.value, distribution=dist, version=ep.dist.version if ep.dist is not None else "?",
                          builtin=dist == BUILTIN_DIST)
        out.append(_Candidate(info, ep.load))
    for name, path in local_plugins or []:
        out.append(_Candidate(PluginInfo(name=name, module=str(path), distribution="(plugins-dir)", version="0", builtin=False),
                              lambda p=path, n=name: _import_file(n, p)))
    for name, obj in extra_plugins or []:
        mod = obj.__name__ if isinstance(obj, ModuleType) else type(obj).__name__
        out.append(_Candidate(PluginInfo(name=name, module=mod, distribution="(local)", version=getattr(obj, "__version__", "0"), builtin=False),
                              lambda o=obj: o))
    return out


def _import_file(name: str, path) -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"vfmbench_local_{name.replace('-', '_')}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _collect(pm: pluggy.PluginManager, plugin_name: str) -> list[tuple[str, Spec]]:
    """Every (kind, spec) a registered plugin's registration hooks register."""
    got: list[tuple[str, Spec]] = []
    for hook_name, kind in REGISTRATION_HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == plugin_name:
                impl.function(register=lambda spec, _k=kind: got.append((_k, spec)))
    return got


def get_plugin_manager(extra_plugins: list[tuple[str, Any]] | None = None, local_plugins: list[tuple[str, Any]] | None = None) -> Host:
    """Build a fresh plugin manager and fill the registries.

    ``extra_plugins`` are ``(name, module_or_object)`` pairs registered after the entry points, not
    subject to ``VFMBENCH_LOAD_PLUGINS`` (tests use this for toy plugins); ``local_plugins`` are
    ``(name, path)`` pairs of one-off files (``--plugins-dir``), third-party plugins like installed ones.
    """
    pm = pluggy.PluginManager("vfmbench")
    pm.add_hookspecs(hookspecs)
    allow = _env_list("VFMBENCH_LOAD_PLUGINS")
    deny = _env_list("VFMBENCH_DISABLE_PLUGINS") or set()
    registries = {kind: Registry(kind, spec_type) for kind, spec_type in KINDS.items()}
    plugins: dict[str, PluginInfo] = {}
    failed: dict[str, PluginInfo] = {}
    disabled: dict[str, PluginInfo] = {}
    candidates = _candidates(extra_plugins, local_plugins)
    for c in candidates:
        info, programmatic = c.info, c.info.distribution == "(local)"
        if _matches(deny, info.name, info.distribution):
            info.status, info.error = "disabled", "named in VFMBENCH_DISABLE_PLUGINS"
        elif not info.builtin and not programmatic and allow is not None and not _matches(allow, info.name, info.distribution):
            info.status, info.error = "disabled", "not named in VFMBENCH_LOAD_PLUGINS"
        if info.status == "disabled":
            disabled[info.name] = info
            _note_disabled(info, c, registries)
            continue
        try:
            module = c.load()
            if pm.get_plugin(info.name) is not None or pm.is_registered(module):
                raise ValueError(f"plugin name {info.name!r} is declared twice in the 'vfmbench' entry-point group")
            pm.register(module, name=info.name)
        except Exception as e:  # noqa: BLE001 - a broken plugin is reported, the others load
            info.status, info.error = "failed", f"import failed: {_error(e)}"
            failed[info.name] = info
            continue
        try:
            pm.check_pending()
            specs = _collect(pm, info.name)
            for kind, spec in specs:
                registries[kind].add(spec, info.name)
                info.components.setdefault(kind, []).append(spec.name)
        except Exception as e:  # noqa: BLE001
            for reg in registries.values():
                reg.discard_plugin(info.name)
            pm.unregister(name=info.name)
            info.status, info.error = "failed", f"registration failed: {_error(e)}"
            failed[info.name] = info
            continue
        info.hooks = sorted(h.name for h in pm.get_hookcallers(pm.get_plugin(info.name)) or [])
        plugins[info.name] = info
    _check_metric_features(pm, registries, plugins, failed)
    for reg in registries.values():
        reg.failed = failed
    _warn_unmatched(allow, deny, candidates)
    return Host(pm=pm, plugins=plugins, registries=registries, failed=failed, disabled=disabled)


# which extractor inputs a metric's inputs read
METRIC_EXTRACTOR_INPUTS = {"pairs": "pairs", "distribution": "images", "single": "images"}


def metric_feature_problem(metric, extractors: Registry) -> str:
    """Why ``metric`` cannot get its features from the registered extractors ('' when it can)."""
    want = METRIC_EXTRACTOR_INPUTS.get(metric.inputs)
    if want is None:
        return ""  # e.g. 'latents': the run's tokenizer provides them
    where = f"metric {metric.name!r} ({metric.inputs}) reads {metric.extractor or '?'}/{metric.feature or '?'}"
    if metric.extractor not in extractors:
        known = ", ".join(f"{e.name}/{f}" for e in extractors if e.inputs == want for f in e.features)
        return f"{where}, but no extractor {metric.extractor!r} is registered (known {want} features: {known})"
    ex = extractors.get(metric.extractor)
    if ex.inputs != want:
        return f"{where}, but extractor {ex.name!r} takes {ex.inputs}, not {want}"
    if metric.feature not in ex.features:
        return f"{where}, but extractor {ex.name!r} gives only {', '.join(ex.features)}"
    return ""


def _check_metric_features(pm, registries: dict[str, Registry], plugins: dict[str, PluginInfo], failed: dict[str, PluginInfo]) -> None:
    """A metric whose extractor/feature pair no extractor provides fails its plugin at load time
    (never after training); the plugin's other components go with it."""
    for metric in list(registries["metrics"]):
        owner = registries["metrics"].owner(metric.name) if metric.name in registries["metrics"] else None
        problem = metric_feature_problem(metric, registries["extractors"])
        if not problem or owner not in plugins:
            continue
        info = plugins.pop(owner)
        for reg in registries.values():
            reg.discard_plugin(owner)
        pm.unregister(name=owner)
        info.status, info.error = "failed", f"registration failed: {problem}"
        failed[owner] = info


def _note_disabled(info: PluginInfo, c: _Candidate, registries: dict[str, Registry]) -> None:
    """Names a disabled plugin would register, so that asking for one says it is disabled. Loading
    is attempted in a throw-away manager; a plugin that fails even that is only known by name."""
    pm = pluggy.PluginManager("vfmbench")
    pm.add_hookspecs(hookspecs)
    try:
        pm.register(c.load(), name=info.name)
        for kind, spec in _collect(pm, info.name):
            info.components.setdefault(kind, []).append(spec.name)
            for key in (spec.name, *spec.aliases):
                registries[kind].disabled.setdefault(key, info)
    except Exception:  # noqa: BLE001 - disabled: its errors do not matter
        pass


def _warn_unmatched(allow: set[str] | None, deny: set[str], candidates: list[_Candidate]) -> None:
    names = {c.info.name for c in candidates}
    dists = {_norm(c.info.distribution) for c in candidates}
    for var, given in (("VFMBENCH_LOAD_PLUGINS", allow or set()), ("VFMBENCH_DISABLE_PLUGINS", deny)):
        for n in sorted(given):
            if n not in names and _norm(n) not in dists:
                from .errors import did_you_mean

                warn(f"{var} names {n!r}, which matches no plugin (entry-point or distribution name): "
                     f"{did_you_mean(n, names | {c.info.distribution for c in candidates if not c.info.builtin})}")
