"""The built-in plugins pass the same contract checks (``vfmbench.testing``) a plugin author runs,
and the checks catch what they claim to catch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vfmbench import testing
from vfmbench.plugins import get_plugin_manager
from vfmbench.specs import MetricSpec, StageSpec

HOST = get_plugin_manager()


@pytest.mark.parametrize("name", HOST.tokenizers.names())
def test_builtin_tokenizers(name, one_thread, tmp_path):
    from vfmbench.zoo import is_release

    spec = HOST.tokenizers.get(name)
    if not is_release(spec):
        testing.check_tokenizer(name, HOST)
        return
    # a released tokenizer has no random init: its weights are a random-init tiny copy of the release, in its own format
    from vfmbench_plugins.tokenizers.released import release_of, write_random_release

    folder = write_random_release(release_of(spec), tmp_path / name, tiny=True)
    testing.check_tokenizer(name, HOST, tokenizer={"weights": str(folder)})


@pytest.mark.parametrize("name", HOST.vfms.names())
def test_builtin_vfms(name, one_thread):
    testing.check_vfm(HOST.vfms.get(name))


@pytest.mark.parametrize("kind", ["extractors", "metrics", "stages"])
def test_builtin_extractors_metrics_stages(kind, one_thread):
    check = {"extractors": testing.check_extractor, "metrics": testing.check_metric, "stages": testing.check_stage}[kind]
    for spec in HOST[kind]:
        check(spec, HOST)


def test_builtin_decoders(one_thread):
    smoke = HOST.presets.get("smoke").values["component_args"]
    factor = {"sd-vae-decoder": 16, "sd-vae-msf-decoder": 16, "vit-decoder": 16, "vfm-vae-decoder": 16}  # the smoke sizes' downsampling
    for spec in HOST.decoders:
        testing.check_decoder(spec, latent_channels=8, downsample=factor.get(spec.name, 8), args=smoke.get(spec.name, {}))


def test_checks_catch_broken_components(tmp_path, monkeypatch):
    impure = {"n": 0}

    def value(stats, ref):
        impure["n"] += 1
        return float(stats) + impure["n"]  # global state: differs on every call

    with pytest.raises(AssertionError, match="not pure"):
        testing.check_metric(MetricSpec(name="drifting", description="d", family="reconstruction", inputs="pairs", extractor="pixels",
                                        feature="psnr", stats=lambda x: float(np.mean(x)), value=value), HOST)
    with pytest.raises(AssertionError, match="reads pixels/mae"):
        testing.check_metric(MetricSpec(name="mae", description="d", family="reconstruction", inputs="pairs", extractor="pixels",
                                        feature="mae", stats=lambda x: 0.0, value=lambda s, r: s), HOST)
    with pytest.raises(AssertionError, match="needs \\['ocr-model'\\]"):
        testing.check_stage(StageSpec(name="text-eval", description="d", needs=("ocr-model",), run=lambda ctx: {}), HOST)
    import dataclasses

    wrong = dataclasses.replace(HOST.vfms.get("dinov2-s14"), published_params=86_000_000)  # a ViT-B figure on a ViT-S
    with pytest.raises(AssertionError, match="published 86,000,000"):
        testing.check_vfm(wrong)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="weights were written"):
        with testing.no_weights_written():
            torch.save({}, tmp_path / "model.pt")
