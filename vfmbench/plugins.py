"""The plugin host: builds a pluggy manager from the ``vfmbench`` entry-point group and one
registry per kind of component. Nothing happens at import time; callers build a ``Host`` and pass
it down.

Built-in plugins (entry points of the ``vfmbench`` distribution itself) always load, unless named
in ``VFMBENCH_DISABLE_PLUGINS``. Third-party plugins load when ``VFMBENCH_LOAD_PLUGINS`` is unset,
or when it names them (comma-separated; an empty value loads none beyond the built-ins).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

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


@dataclass
class Host:
    """The plugin manager, its plugins' metadata and the registries they filled."""

    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo]
    registries: dict[str, Registry]

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


def get_plugin_manager(extra_plugins: list[tuple[str, Any]] | None = None) -> Host:
    """Build a fresh plugin manager and fill the registries.

    ``extra_plugins`` are ``(name, module_or_object)`` pairs registered after the entry points
    (tests use this for toy plugins; ``--plugins-dir`` uses it for one-off files).
    """
    pm = pluggy.PluginManager("vfmbench")
    pm.add_hookspecs(hookspecs)
    allow = _env_list("VFMBENCH_LOAD_PLUGINS")
    deny = _env_list("VFMBENCH_DISABLE_PLUGINS") or set()
    plugins: dict[str, PluginInfo] = {}
    eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    if not any(ep.dist is not None and ep.dist.name == BUILTIN_DIST for ep in eps):
        raise RuntimeError(
            "no built-in vfmbench plugins found in the 'vfmbench' entry-point group: "
            "install the package (pip install -e .) so that its entry points are registered"
        )
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else "?"
        builtin = dist == BUILTIN_DIST
        if ep.name in deny:
            continue
        if not builtin and allow is not None and ep.name not in allow:
            continue
        module = ep.load()
        if pm.is_registered(module) or pm.get_plugin(ep.name) is not None:
            raise RuntimeError(f"plugin name {ep.name!r} is declared twice in the 'vfmbench' entry-point group")
        pm.register(module, name=ep.name)
        plugins[ep.name] = PluginInfo(
            name=ep.name,
            module=ep.value,
            distribution=dist,
            version=ep.dist.version if ep.dist is not None else "?",
            builtin=builtin,
        )
    for name, obj in extra_plugins or []:
        if name in deny:
            continue
        pm.register(obj, name=name)
        mod = obj.__name__ if isinstance(obj, ModuleType) else type(obj).__name__
        plugins[name] = PluginInfo(name=name, module=mod, distribution="(local)", version=getattr(obj, "__version__", "0"), builtin=False)
    pm.check_pending()

    registries = {kind: Registry(kind, spec_type) for kind, spec_type in KINDS.items()}
    for hook_name, kind in REGISTRATION_HOOKS.items():
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(spec: Spec, _plugin=plugin_name, _kind=kind) -> None:
                registries[_kind].add(spec, _plugin)
                plugins[_plugin].components.setdefault(_kind, []).append(spec.name)

            impl.function(register=register)
    for name, info in plugins.items():
        plugin = pm.get_plugin(name)
        info.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
    return Host(pm=pm, plugins=plugins, registries=registries)
