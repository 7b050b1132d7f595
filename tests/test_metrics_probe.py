"""Linear probe: informative vs uninformative latents, determinism, pooling and recipe validation."""
from __future__ import annotations

import pytest
import torch

from vfmbench.config import ProbeConfig
from vfmbench.metrics.probe import ProbeRecipe, linear_probe, pool_latents

RECIPE = ProbeRecipe(pooling="mean", epochs=20, lr=5e-2, weight_decay=1e-4, batch_size=64, seed=0)


def _clusters(num_classes, per_class, seed, channels=8, grid=2, spread=1.0):
    """Gaussian class clusters in the channel means of [N, C, H, W] latents; balanced classes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, channels, generator=torch.Generator().manual_seed(123)) * 2.0
    y = torch.arange(num_classes).repeat_interleave(per_class)
    z = centres[y][:, :, None, None] + spread * torch.randn(len(y), channels, grid, grid, generator=g)
    return z, y


def test_probe_learns_informative_latents():
    c = 8
    ztr, ytr = _clusters(c, 40, seed=1)
    zva, yva = _clusters(c, 20, seed=2)
    res = linear_probe(ztr, ytr, zva, yva, RECIPE, num_classes=c)
    assert set(res) == {"top1", "top5", "train_top1"}
    assert res["top1"] > 80.0 > 100.0 / c  # chance is 12.5 %
    assert res["top5"] >= res["top1"] and res["train_top1"] > 80.0


def test_probe_is_at_chance_on_constant_latents():
    c = 8
    _, ytr = _clusters(c, 40, seed=3)
    _, yva = _clusters(c, 20, seed=4)
    res = linear_probe(torch.ones(len(ytr), 8, 2, 2), ytr, torch.ones(len(yva), 8, 2, 2), yva, RECIPE, num_classes=c)
    # one prediction for every image: exactly one class of a balanced val set is right
    assert res["top1"] == pytest.approx(100.0 / c)
    assert res["top5"] == pytest.approx(500.0 / c)


def test_probe_is_deterministic_and_top5_only_beyond_five_classes():
    ztr, ytr = _clusters(4, 30, seed=5)
    zva, yva = _clusters(4, 10, seed=6)
    recipe = ProbeRecipe(pooling="flatten", epochs=5, lr=1e-2, weight_decay=0.0, batch_size=16, seed=3)
    first = linear_probe(ztr, ytr, zva, yva, recipe)
    second = linear_probe(ztr, ytr, zva, yva, recipe)
    assert first == second and "top5" not in first


def test_pooling_and_recipe():
    z = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(pool_latents(z, "mean"), z.mean(dim=(2, 3)))
    assert pool_latents(z, "flatten").shape == (2, 12)
    with pytest.raises(ValueError):
        pool_latents(z[:, :, 0], "mean")
    with pytest.raises(ValueError):
        ProbeRecipe(pooling="max")
    r = ProbeRecipe.from_config(ProbeConfig(), seed=7)
    assert (r.pooling, r.epochs, r.lr, r.weight_decay, r.batch_size, r.seed) == ("mean", 100, 1e-2, 1e-4, 1024, 7)
    assert r.protocol()["optimizer"] == "adamw-cosine"
