"""The standard metrics plugin: registered specs are complete, and their stages compute the library values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vfmbench.metrics.frechet import StatsAccumulator, frechet_distance
from vfmbench.metrics.kid import kernel_inception_distance
from vfmbench.metrics.precision_recall import precision_recall
from vfmbench.metrics.probe import ProbeRecipe
from vfmbench.plugins import get_plugin_manager

NAMES = {"rfid", "gfid", "is", "kid", "precision", "recall", "sfid", "psnr", "ssim", "lpips", "probe-top1", "probe-top5"}


@pytest.fixture(scope="module")
def metrics():
    host = get_plugin_manager()
    assert host.metrics.owner("rfid") == "metrics-standard"
    return {n: host.metrics.get(n) for n in NAMES}


def test_specs_are_complete(metrics):
    for name, spec in metrics.items():
        assert spec.family in {"reconstruction", "generation", "representation"}, name
        assert spec.inputs in {"pairs", "distribution", "single", "latents"}, name
        assert spec.description and spec.paper and spec.license and spec.source and spec.version == "1", name
        assert spec.extractor and spec.feature and spec.protocol_fields, name
        assert callable(spec.stats) and callable(spec.value), name
    assert [n for n, s in metrics.items() if s.higher_is_better] and not metrics["rfid"].higher_is_better
    assert (metrics["sfid"].feature, metrics["is"].feature, metrics["gfid"].feature) == ("spatial", "logits", "pool")
    assert "guidance" in metrics["gfid"].protocol_fields and "extractor_weights" in metrics["rfid"].protocol_fields


def test_distribution_stages(metrics):
    rng = np.random.default_rng(0)
    ref, cand = rng.normal(size=(60, 6)), rng.normal(size=(50, 6)) * 1.2 + 0.3
    fid = metrics["rfid"]
    ref_stats = fid.stats(ref)
    acc = StatsAccumulator().update(cand[:17]).update(cand[17:])
    value = fid.value(fid.stats(acc), ref_stats)
    assert value == pytest.approx(frechet_distance(cand.mean(0), np.cov(cand, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False)).value, rel=1e-10)
    kid = metrics["kid"]
    k = kid.value(kid.stats(cand), kid.stats(ref))
    assert k["value"] == pytest.approx(kernel_inception_distance(ref, cand, 100, 50)[0], rel=1e-12)
    assert (k["subsets"], k["subset_size"]) == (100, 50)  # min(1000, N_ref=60, N=50)
    p, r = precision_recall(ref, cand)
    pspec, rspec = metrics["precision"], metrics["recall"]
    pv, rv = pspec.value(pspec.stats(cand), pspec.stats(ref)), rspec.value(rspec.stats(cand), rspec.stats(ref))
    assert pv["value"] == p and rv["value"] == r
    assert pv["k"] == rv["k"] == 3 and pv["reference_images"] == rv["reference_images"] == 60
    with pytest.raises(ValueError):
        fid.value(fid.stats(cand), None)


def test_frechet_stats_carry_a_low_rank_factor_only_when_it_helps(metrics):
    from vfmbench.metrics.frechet import frechet_distance

    rng = np.random.default_rng(2)
    few, many = metrics["gfid"].stats(rng.normal(size=(6, 8))), metrics["gfid"].stats(rng.normal(size=(30, 8)) + 1)
    assert few["factor"].shape == (5, 8) and "factor" not in many  # rank N - 1
    value = metrics["gfid"].value(few, many)
    assert isinstance(value, float)
    assert value == pytest.approx(frechet_distance(few["mu"], few["sigma"], many["mu"], many["sigma"]).value, rel=1e-7)


def test_single_pair_and_probe_stages(metrics):
    logits = np.random.default_rng(1).normal(size=(40, 10))
    st = metrics["is"].stats(logits)
    v = metrics["is"].value(st, None)
    assert v["value"] == pytest.approx(float(st["mean"])) and st["mean"] > 1.0 and v["splits"] == 10
    assert "RandomState(2020)" in v["split_order"]
    scores = np.array([20.0, 30.0, 40.0])
    assert metrics["psnr"].value(metrics["psnr"].stats(scores), None) == 30.0
    g = torch.Generator().manual_seed(0)
    y = torch.arange(6).repeat_interleave(10)
    z = torch.nn.functional.one_hot(y, 6).float()[:, :, None, None] * 3 + 0.3 * torch.randn(60, 6, 1, 1, generator=g)
    feats = {"train_latents": z, "train_labels": y, "val_latents": z, "val_labels": y,
             "recipe": ProbeRecipe(epochs=10, lr=0.05, batch_size=16), "num_classes": 6}
    st = metrics["probe-top1"].stats(feats)
    assert metrics["probe-top1"].value(st, None) > 90.0 and metrics["probe-top5"].value(st, None) == 100.0
