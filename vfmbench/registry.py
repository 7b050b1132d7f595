"""One registry per kind of component: validated names, no duplicates, did-you-mean lookups."""
from __future__ import annotations

from typing import Any, Generic, Iterator, TypeVar

from .errors import UserError, did_you_mean
from .specs import NAME_RE, Spec

T = TypeVar("T", bound=Spec)


class Registry(Generic[T]):
    """Specs of one kind keyed by name; aliases resolve to their spec's canonical name."""

    def __init__(self, kind: str, spec_type: type[T]):
        self.kind = kind
        self.spec_type = spec_type
        self._specs: dict[str, T] = {}
        self._owner: dict[str, str] = {}  # name or alias -> plugin that registered it
        self._alias: dict[str, str] = {}
        self.disabled: dict[str, Any] = {}  # name or alias -> PluginInfo of the disabled plugin that has it
        self.failed: dict[str, Any] = {}  # plugin name -> PluginInfo of every plugin that failed to load

    def add(self, spec: T, plugin: str) -> None:
        if not isinstance(spec, self.spec_type):
            raise TypeError(
                f"plugin {plugin!r} registered {type(spec).__name__} {getattr(spec, 'name', spec)!r} "
                f"through the {self.kind} hook, which takes {self.spec_type.__name__}"
            )
        for key in (spec.name, *spec.aliases):
            if not NAME_RE.match(key):
                raise ValueError(
                    f"plugin {plugin!r}: {self.kind} name {key!r} is invalid; names are lowercase "
                    "letters, digits and hyphens, optionally with one '.tag' (e.g. 'vfm-vae', 'dinov2-l')"
                )
            if key in self._owner:
                raise ValueError(
                    f"{self.kind} name {key!r} is registered twice: by plugin {self._owner[key]!r} "
                    f"and by plugin {plugin!r}; disable one with VFMBENCH_DISABLE_PLUGINS"
                )
        self._specs[spec.name] = spec
        self._owner[spec.name] = plugin
        for a in spec.aliases:
            self._owner[a] = plugin
            self._alias[a] = spec.name

    def discard_plugin(self, plugin: str) -> None:
        """Forget every spec a plugin registered (its registration failed part-way)."""
        for key in [k for k, p in self._owner.items() if p == plugin]:
            self._owner.pop(key)
            self._specs.pop(key, None)
            self._alias.pop(key, None)

    def canonical(self, name: str) -> str:
        if name in self._specs:
            return name
        if name in self._alias:
            return self._alias[name]
        what = f"{self.kind[:-1] if self.kind.endswith('s') else self.kind} {name!r}"
        if name in self.disabled:
            p = self.disabled[name]
            fix = ("remove it from VFMBENCH_DISABLE_PLUGINS" if "DISABLE" in p.error
                   else f"add {p.name!r} to VFMBENCH_LOAD_PLUGINS (or unset it)")
            raise UserError(f"{what} belongs to plugin {p.name!r} ({p.distribution}), which is disabled ({p.error}): {fix}")
        broken = "".join(f"; plugin {p.name!r} ({p.distribution}) failed to load and may provide it: {p.error}"
                         for p in self.failed.values() if name in p.components.get(self.kind, []) or not p.components)
        raise UserError(f"unknown {what}: {did_you_mean(name, self._owner)} (see `vfmbench list {self.kind}`){broken}")

    def get(self, name: str) -> T:
        return self._specs[self.canonical(name)]

    def owner(self, name: str) -> str:
        return self._owner[self.canonical(name)]

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs or name in self._alias

    def __iter__(self) -> Iterator[T]:
        return (self._specs[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._specs)
