import json
import re
from pathlib import Path

import pytest

from vfmbench import hookspecs
from vfmbench.errors import UserError
from vfmbench.hookspecs import hookimpl
from vfmbench.plugins import REGISTRATION_HOOKS, get_plugin_manager
from vfmbench.specs import DecoderSpec, TokenizerSpec


class _Dup:
    @hookimpl
    def register_tokenizers(self, register):
        register(TokenizerSpec(name="vfm-vae", description="clash", factory=lambda a, c: None))


class _BadName:
    @hookimpl
    def register_decoders(self, register):
        register(DecoderSpec(name="My_Decoder", description="bad", factory=lambda *a: None))


class _WrongKind:
    @hookimpl
    def register_decoders(self, register):
        register(TokenizerSpec(name="sneaky", description="wrong kind", factory=lambda *a: None))


def test_builtins_register_every_kind(host):
    for kind in ("tokenizers", "vfms", "decoders", "diffusion", "datasets", "metrics", "presets"):
        assert len(host[kind]) > 0, kind
    assert "vfm-vae" in host.tokenizers and "smoke" in host.presets
    assert all(p.builtin for p in host.plugins.values())


def test_duplicate_name_names_both_plugins():
    # the clashing plugin fails to register (reported, with both names); the built-in keeps its name
    h = get_plugin_manager(extra_plugins=[("dup-plugin", _Dup())])
    err = h.failed["dup-plugin"].error
    assert "tokenizer-vfm-vae" in err and "dup-plugin" in err and "ValueError" in err
    assert h.tokenizers.owner("vfm-vae") == "tokenizer-vfm-vae" and "dup-plugin" not in h.plugins


def test_invalid_name_and_wrong_kind_rejected():
    h = get_plugin_manager(extra_plugins=[("bad", _BadName()), ("wrong", _WrongKind())])
    assert "ValueError" in h.failed["bad"].error and "lowercase" in h.failed["bad"].error
    assert "TypeError" in h.failed["wrong"].error and "DecoderSpec" in h.failed["wrong"].error
    assert "sneaky" not in h.tokenizers and "sneaky" not in h.decoders and "my-decoder" not in h.decoders


def test_unknown_name_did_you_mean(host):
    with pytest.raises(UserError, match="did you mean 'vfm-vae'"):
        host.tokenizers.get("vfm-vea")
    assert host.tokenizers.canonical("vfm-vae") == "vfm-vae"


def test_disable_plugins_env(monkeypatch):
    monkeypatch.setenv("VFMBENCH_DISABLE_PLUGINS", "tokenizer-kl-vae")
    h = get_plugin_manager()
    assert "kl-vae" not in h.tokenizers and "tokenizer-kl-vae" not in h.plugins
    assert "vfm-vae" in h.tokenizers


def test_load_plugins_allow_list_keeps_builtins(monkeypatch):
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "")
    h = get_plugin_manager()
    assert "vfm-vae" in h.tokenizers
    assert all(p.builtin for p in h.plugins.values())


def test_every_hook_is_documented():
    """docs/plugins.md has a heading with each hook's exact signature, and a docstring in hookspecs."""
    import inspect

    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    headings = set(re.findall(r"^### (.+)$", doc, flags=re.M))
    names = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "vfmbench_spec")]
    assert set(REGISTRATION_HOOKS) <= set(names)
    for name in names:
        fn = getattr(hookspecs, name)
        sig = f"{name}({', '.join(inspect.signature(fn).parameters)})"
        assert sig in headings, f"docs/plugins.md lacks a '### {sig}' heading"
        assert (fn.__doc__ or "").strip(), f"hookspec {name} has no docstring"


def test_plugins_json_lists_builtins(capsys):
    from vfmbench.cli import main

    assert main(["plugins", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    names = {p["name"]: p for p in items}
    assert names["tokenizer-vfm-vae"]["components"] == {"tokenizers": ["vfm-vae"]}
    assert "register_tokenizers" in names["tokenizer-vfm-vae"]["hooks"]
