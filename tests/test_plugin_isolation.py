"""Failure isolation and plugin selection: a plugin that fails to import or register is reported by
`vfmbench plugins` (the rest still listed) and fails only the commands that need it, with exit 2
naming it; allow/deny lists accept distribution names and warn about names matching nothing; a
disabled plugin's component is reported as disabled; --plugins-dir obeys the allow-list; a metric
whose extractor/feature pair no extractor gives is rejected when plugins load."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from vfmbench.cli import main
from vfmbench.errors import UserError
from vfmbench.hookspecs import hookimpl
from vfmbench.plugins import get_plugin_manager
from vfmbench.specs import ExtractorSpec, MetricSpec, TokenizerSpec

TOKENIZER_PLUGIN = """
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import TokenizerSpec
{before}

@hookimpl
def register_tokenizers(register):
    register(TokenizerSpec(name="{name}", description="toy", factory=lambda args, ctx: None))
    {after}
"""


def _write(folder: Path, stem: str, name: str, before: str = "", after: str = "") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"{stem}.py").write_text(TOKENIZER_PLUGIN.format(name=name, before=before, after=after))
    return folder


def _fake_distribution(site: Path, dist: str, ep_name: str, module: str, name: str) -> None:
    """An installed distribution (dist-info + module) with one entry point in the vfmbench group."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[vfmbench]\n{ep_name} = {module}\n")
    (site / f"{module}.py").write_text(TOKENIZER_PLUGIN.format(name=name, before="", after=""))


def test_import_failure_is_reported_and_only_breaks_what_needs_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "good,broken")
    plugins = _write(tmp_path / "p", "good", "good-tok")
    _write(plugins, "broken", "broken-tok", before="import a_module_that_does_not_exist  # noqa")
    assert main(["--plugins-dir", str(plugins), "plugins", "--json"]) == 0
    listing = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listing["broken"]["status"] == "failed" and "ModuleNotFoundError" in listing["broken"]["error"]
    assert listing["good"]["status"] == "loaded" and listing["good"]["components"] == {"tokenizers": ["good-tok"]}
    assert listing["tokenizer-vfm-vae"]["status"] == "loaded"
    # commands that do not need it work (with a warning); the ones that do exit 2 naming it
    assert main(["--plugins-dir", str(plugins), "list", "tokenizers"]) == 0
    out = capsys.readouterr()
    assert "good-tok" in out.out and "plugin 'broken'" in out.err and "vfmbench plugins" in out.err
    out_dir = tmp_path / "runs"
    assert main(["--plugins-dir", str(plugins), "run", "--tokenizer", "broken-tok", "--out", str(out_dir), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown tokenizer 'broken-tok'" in err and "plugin 'broken'" in err and "failed to load" in err and "Traceback" not in err
    assert not out_dir.exists()


def test_registration_failure_rolls_back_and_names_the_plugin(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "half")
    plugins = _write(tmp_path / "p", "half", "half-tok", after="raise RuntimeError('half-registered')")
    h = get_plugin_manager(local_plugins=[("half", plugins / "half.py")])
    assert "half-tok" not in h.tokenizers and "RuntimeError: half-registered" in h.failed["half"].error
    with pytest.raises(UserError, match="plugin 'half' .* failed to load and may provide it: registration failed: RuntimeError"):
        h.tokenizers.get("half-tok")
    assert "vfm-vae" in h.tokenizers and "half" not in h.plugins and h.pm.get_plugin("half") is None


def test_disabled_component_is_reported_as_disabled(monkeypatch):
    monkeypatch.setenv("VFMBENCH_DISABLE_PLUGINS", "tokenizer-kl-vae")
    h = get_plugin_manager()
    with pytest.raises(UserError, match="tokenizer 'kl-vae' belongs to plugin 'tokenizer-kl-vae' .* disabled .*VFMBENCH_DISABLE_PLUGINS"):
        h.tokenizers.get("kl-vae")
    assert h.disabled["tokenizer-kl-vae"].components == {"tokenizers": ["kl-vae"]}


def test_allow_and_deny_lists_take_distribution_names_and_warn_about_strays(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    _fake_distribution(site, "acme-vfmbench-tools", "acme", "acme_vfmbench_plugin", "acme-tok")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "Acme_VFMBench-Tools,acme-typo")  # a distribution name, as pip spells it or not
    h = get_plugin_manager()
    assert "acme-tok" in h.tokenizers and h.plugins["acme"].distribution == "acme-vfmbench-tools"
    err = capsys.readouterr().err
    assert "VFMBENCH_LOAD_PLUGINS names 'acme-typo', which matches no plugin" in err and "Acme_VFMBench" not in err
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "")
    h = get_plugin_manager()
    with pytest.raises(UserError, match="belongs to plugin 'acme' \\(acme-vfmbench-tools\\), which is disabled .*VFMBENCH_LOAD_PLUGINS"):
        h.tokenizers.get("acme-tok")
    monkeypatch.delenv("VFMBENCH_LOAD_PLUGINS")
    monkeypatch.setenv("VFMBENCH_DISABLE_PLUGINS", "acme-vfmbench-tools,tokenizer-nope")
    h = get_plugin_manager()
    assert "acme-tok" not in h.tokenizers and "acme" in h.disabled
    assert "VFMBENCH_DISABLE_PLUGINS names 'tokenizer-nope'" in capsys.readouterr().err


def test_plugins_dir_obeys_the_allow_list(tmp_path, monkeypatch, capsys):
    plugins = _write(tmp_path / "p", "local_tok", "local-tok")
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "")
    assert main(["--plugins-dir", str(plugins), "plugins", "--json"]) == 0
    listing = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listing["local-tok"]["status"] == "disabled" and "VFMBENCH_LOAD_PLUGINS" in listing["local-tok"]["error"]
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "local-tok")
    assert main(["--plugins-dir", str(plugins), "list", "tokenizers"]) == 0
    assert "local-tok" in capsys.readouterr().out


# -- metrics and their extractors -------------------------------------------------------------------


def _pair_metric(name, extractor, feature, inputs="pairs"):
    return MetricSpec(name=name, description=name, family="reconstruction", inputs=inputs, extractor=extractor, feature=feature,
                      stats=lambda x: float(x.mean()), value=lambda s, r: s)


class _Metrics:
    def __init__(self, *specs):
        self.specs = specs

    @hookimpl
    def register_metrics(self, register):
        for s in self.specs:
            register(s)


class _Extractor:
    @hookimpl
    def register_extractors(self, register):
        register(ExtractorSpec(name="toy-net", description="toy", factory=lambda cfg, feats, device, cache: None,
                               inputs="images", features=("pool",)))


@pytest.mark.parametrize("extractor, feature, inputs, why", [
    ("pixels", "mae", "pairs", "extractor 'pixels' gives only psnr, ssim"),
    ("nonet", "pool", "distribution", "no extractor 'nonet' is registered (known images features: inception/pool, inception/logits"),
    ("inception", "pool", "pairs", "extractor 'inception' takes images, not pairs"),
])
def test_metric_with_unknown_features_fails_its_plugin_at_load(extractor, feature, inputs, why):
    h = get_plugin_manager(extra_plugins=[("bad-metric", _Metrics(_pair_metric("toy-metric", extractor, feature, inputs)))])
    assert "toy-metric" not in h.metrics and why in h.failed["bad-metric"].error
    with pytest.raises(UserError, match="plugin 'bad-metric'"):
        h.metrics.get("toy-metric")
    assert "psnr" in h.metrics  # every other metric still runs


def test_metric_on_a_plugin_extractor_feature_named_pool_is_its_own(tmp_path):
    h = get_plugin_manager(extra_plugins=[("toy-net", _Extractor()), ("toy-fd", _Metrics(MetricSpec(
        name="toy-fd", description="FD on toy-net", family="generation", inputs="distribution", extractor="toy-net", feature="pool",
        stats=lambda x: x, value=lambda s, r: 0.0)))])
    assert "toy-fd" in h.metrics and not h.failed
    from vfmbench.config import RunConfig
    from vfmbench.evaluate import Evaluator

    cfg = RunConfig()
    cfg.metrics.names.extend(["gfid", "toy-fd"])
    ev = Evaluator(h, cfg, "cpu", tmp_path)
    assert ev.features_needed("images") == {"inception": ("pool",), "toy-net": ("pool",)}  # two feature sets, not one


def test_unknown_metric_feature_is_exit_2_in_dry_run(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "mae_metric.py").write_text(textwrap.dedent("""
        from vfmbench.hookspecs import hookimpl
        from vfmbench.specs import MetricSpec

        @hookimpl
        def register_metrics(register):
            register(MetricSpec(name="mae", description="mean absolute error", family="reconstruction", inputs="pairs",
                                extractor="pixels", feature="mae", stats=lambda x: float(x.mean()), value=lambda s, r: s))
    """))
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "mae-metric")
    out = tmp_path / "runs"
    assert main(["--plugins-dir", str(folder), "run", "--set", "metrics.names=[mae]", "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "plugin 'mae-metric'" in err and "pixels/mae" in err and "Traceback" not in err and not out.exists()
