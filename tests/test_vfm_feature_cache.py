"""The on-disk VFM token cache: computed once, reused by later calls, keyed, atomic."""
from __future__ import annotations

import json
import os
from importlib import metadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from vfmbench.config import VfmConfig
from vfmbench.feature_cache import CacheStats, cache_key, cached_tokens, entry_dir
from vfmbench.plugins import get_plugin_manager
from vfmbench.vfm import build_vfm

VFM_PLUGINS = ("vfm-clip", "vfm-dinov2", "vfm-eva-clip", "vfm-mae", "vfm-siglip")


@pytest.fixture(scope="module")
def vfm():
    others = [ep.name for ep in metadata.entry_points(group="vfmbench") if ep.name not in VFM_PLUGINS]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VFMBENCH_DISABLE_PLUGINS", ",".join(others))
        host = get_plugin_manager()
    return build_vfm(host.vfms.get("dinov2"), VfmConfig(name="dinov2", size="tiny", pretrained=False))


DATA = torch.randint(0, 256, (10, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
KEY = {"dataset": "shapes", "split": "train", "resolution": 64, "images": 10, "seed": 0}


class Batches:
    """A re-iterable batch source that counts how often it was asked for batches."""

    def __init__(self, data=DATA, batch=4):
        self.data, self.batch, self.calls = data, batch, 0

    def __call__(self):
        self.calls += 1
        return (self.data[i : i + self.batch] for i in range(0, len(self.data), self.batch))


class CountForward:
    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(lambda m, a: setattr(self, "n", self.n + 1))


def test_second_call_reads_the_cache_and_does_not_run_the_vfm(vfm, tmp_path):
    calls = CountForward(vfm.model)
    layers = [0, -1]
    first_stats, first_src = CacheStats(), Batches()
    first = cached_tokens(vfm, layers, KEY, first_src, tmp_path, shard_images=3, stats=first_stats)
    assert (first_stats.misses, first_stats.hits, first_stats.vfm_batches, first_stats.vfm_images) == (1, 0, 3, 10)
    assert first_src.calls == 1 and calls.n == 3
    direct = vfm(DATA, layers)
    for i in layers:
        assert first[i].shape == (10, 64, 64)
        torch.testing.assert_close(first[i], direct.layers[i], atol=1e-6, rtol=0)

    calls.n = 0
    stats, src = CacheStats(), Batches()
    second = cached_tokens(vfm, [-1, 0], KEY, src, tmp_path, shard_images=3, stats=stats)
    assert (stats.hits, stats.misses, stats.vfm_batches) == (1, 0, 0)
    assert src.calls == 0 and calls.n == 0
    for i in layers:
        assert torch.equal(second[i], first[i])

    entry = entry_dir(tmp_path, cache_key(vfm, layers, KEY))
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["images"] == 10 and meta["grid"] == [8, 8] and len(meta["shards"]) == 3  # 4 + 4 + 2 rows: a shard is written once >= 3 are pending
    assert meta["key"]["weights_id"] == vfm.weights_id and meta["key"]["fields"]["split"] == "train"
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".tmp")]


def test_key_separates_splits_layers_and_scales(vfm, tmp_path):
    stats = CacheStats()
    cached_tokens(vfm, [-1], KEY, Batches(), tmp_path, stats=stats)
    cached_tokens(vfm, [-1], {**KEY, "split": "val"}, Batches(), tmp_path, stats=stats)
    cached_tokens(vfm, [0, -1], KEY, Batches(), tmp_path, stats=stats)
    assert (stats.misses, stats.hits) == (3, 0)
    scaled = build_vfm(vfm.spec, VfmConfig(name="dinov2", size="tiny", pretrained=False, input_scale=0.5))
    out = cached_tokens(scaled, [-1], KEY, Batches(), tmp_path, stats=stats)
    assert stats.misses == 4 and out[-1].shape == (10, 16, 64)
    cached_tokens(vfm, [-1], KEY, Batches(), tmp_path, stats=stats)
    assert stats.hits == 1


def test_bad_keys_and_counts_leave_no_entry(vfm, tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        cached_tokens(vfm, [-1], {"dataset": "shapes", "split": "train", "images": 10}, Batches(), tmp_path)
    with pytest.raises(ValueError, match="images=12"):
        cached_tokens(vfm, [-1], {**KEY, "images": 12}, Batches(), tmp_path)
    assert not any(p.is_dir() for p in (tmp_path / vfm.spec.name).iterdir())


def test_half_precision_storage(vfm, tmp_path):
    out = cached_tokens(vfm, [-1], KEY, Batches(), tmp_path, dtype=torch.float16)
    again = cached_tokens(vfm, [-1], KEY, Batches(), tmp_path, dtype=torch.float16)
    assert out[-1].dtype == again[-1].dtype == torch.float16 and torch.equal(out[-1], again[-1])
