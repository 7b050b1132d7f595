"""ADM-format .npz files and the statistics cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vfmbench.errors import UserError
from vfmbench.metrics.adm import load_reference_batch, read_samples_npz, write_reference_batch, write_samples_npz
from vfmbench.metrics.cache import StatsCache
from vfmbench.metrics.frechet import frechet_distance, gaussian_stats


def _images(seed, n=24, size=8, high=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _features(images):
    """A cheap deterministic stand-in extractor: 2x2-average-pooled pixels, [N, 48]."""
    return torch.nn.functional.avg_pool2d(images.double(), 2).flatten(1).numpy()


def test_reference_npz_stats_equal_stats_from_its_images(tmp_path):
    ref_images = _images(0)
    mu, sigma = gaussian_stats(_features(ref_images))
    path = write_reference_batch(tmp_path / "ref.npz", ref_images, mu=mu, sigma=sigma, mu_s=mu[:5], sigma_s=sigma[:5, :5])
    with np.load(path) as raw:  # the ADM layout, readable without vfmbench
        assert raw["arr_0"].dtype == np.uint8 and raw["arr_0"].shape == (24, 8, 8, 3)
        assert set(raw.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s"}
    ref = load_reference_batch(path)
    assert torch.equal(ref.images_nchw(), ref_images)
    np.testing.assert_array_equal(ref.spatial_stats()[1], sigma[:5, :5])
    cand = _features(_images(1, high=200))
    mu_c, sigma_c = gaussian_stats(cand)
    from_npz = frechet_distance(mu_c, sigma_c, *ref.pool_stats()).value
    from_images = frechet_distance(mu_c, sigma_c, *gaussian_stats(_features(ref.images_nchw()))).value
    assert from_npz == pytest.approx(from_images, rel=1e-12) and from_npz > 1.0
    light = load_reference_batch(path, images=False)
    assert light.images is None and light.pool_stats() is not None
    with pytest.raises(UserError):
        light.images_nchw()


def test_samples_roundtrip_and_errors(tmp_path):
    images = _images(2, n=5, size=6)
    write_samples_npz(tmp_path / "samples.npz", images)
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # atomic: no temporary left
    with np.load(tmp_path / "samples.npz") as raw:
        np.testing.assert_array_equal(raw["arr_0"], images.permute(0, 2, 3, 1).numpy())
    back = read_samples_npz(tmp_path / "samples.npz")
    assert back.dtype == torch.uint8 and torch.equal(back, images)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(UserError, match="uint8"):
        read_samples_npz(tmp_path / "float.npz")
    with pytest.raises(UserError, match="does not exist"):
        load_reference_batch(tmp_path / "missing.npz")
    np.savez(tmp_path / "half.npz", mu=np.zeros(3))
    with pytest.raises(UserError, match="covariance"):
        load_reference_batch(tmp_path / "half.npz")
    with pytest.raises(ValueError):
        write_samples_npz(tmp_path / "bad.npz", images.permute(0, 2, 3, 1))


def test_stats_cache_keys_and_roundtrip(tmp_path):
    k = StatsCache.key(a=1, b="x")
    assert k == StatsCache.key(b="x", a=1) and len(k) == 64
    assert k != StatsCache.key(a=2, b="x")
    fields = dict(dataset="imagenet", split="val", resolution=256, preprocessing="center-crop", num_images=50000,
                  extractor="inception-v3-compat/pool", weights="6726825d0123abcd", metric_version="1")
    rk = StatsCache.reference_key(**fields)
    assert rk != StatsCache.reference_key(**{**fields, "weights": "1f0d8b950dd42a47"})
    assert rk != StatsCache.reference_key(**{**fields, "num_images": 10000})
    with pytest.raises(TypeError):
        StatsCache.reference_key(**{k: v for k, v in fields.items() if k != "split"})
    cache = StatsCache(tmp_path / "stats")
    assert cache.get(rk) is None
    arrays = {"mu": np.arange(3.0), "sigma": np.eye(3)}
    cache.put(rk, arrays, {"fields": fields})
    got = cache.get(rk)
    assert set(got) == {"mu", "sigma"} and all(np.array_equal(got[n], arrays[n]) for n in arrays)
    assert cache.meta(rk)["fields"]["num_images"] == 50000
    assert sorted(p.suffix for p in (tmp_path / "stats").iterdir()) == [".json", ".npz"]
    (tmp_path / "stats" / f"{rk}.json").unlink()  # an entry without its metadata is a miss
    assert cache.get(rk) is None
    with pytest.raises(ValueError):
        cache.get("../escape")
