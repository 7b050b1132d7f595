"""Inception extractor: weights resolution (smoke, official detection, missing), features, FID end to end."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from vfmbench.errors import MissingWeightsError, UserError
from vfmbench.metrics import inception as inc
from vfmbench.metrics.cache import file_sha256
from vfmbench.metrics.frechet import frechet_distance, gaussian_stats


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """The ~96 MB smoke weights, generated once per session through the resolver."""
    cache = tmp_path_factory.mktemp("inception-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(cache / "empty-torch-home"))
        path, wid, official = inc.resolve_inception_weights("", True, cache)
    return path, wid, official, cache


@pytest.fixture(scope="session")
def extractor(smoke):
    # one forward call per test set: under CPU contention each call has a large fixed cost
    return inc.InceptionFeatures(smoke[0], batch_size=8, weights_id=smoke[1], is_official=smoke[2])


def _images(seed, n, high=256, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_smoke_weights_are_deterministic_and_labelled(smoke, tmp_path):
    path, wid, official, cache = smoke
    assert path == cache / inc.SMOKE_FILENAME and not official
    assert wid == _sha(path)[:16]
    again = inc.make_smoke_inception_weights(tmp_path / "again.pth")
    assert _sha(again) == _sha(path)  # same bytes, so the same weights id on every machine
    # generated once: a second resolution reuses the file and its cached hash
    mtime = path.stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path / "still-empty"))
        assert inc.resolve_inception_weights("", True, cache) == (path, wid, False)
    assert path.stat().st_mtime_ns == mtime
    assert not list(cache.glob("*.tmp"))


def test_missing_weights_name_the_places_and_the_option(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(MissingWeightsError) as e:
        inc.resolve_inception_weights("", False, tmp_path / "cache")
    msg = str(e.value)
    assert "--set metrics.inception_weights=PATH" in msg and str(tmp_path / "th" / "hub" / "checkpoints" / inc.OFFICIAL_FILENAME) in msg
    assert isinstance(e.value, UserError) and e.value.exit_code == 2
    assert not (tmp_path / "cache").exists()  # nothing generated outside smoke runs
    with pytest.raises(MissingWeightsError, match="does not exist"):
        inc.resolve_inception_weights(str(tmp_path / "nope.pth"), True, tmp_path / "cache")


def test_official_file_is_detected_by_content_hash(smoke, tmp_path, monkeypatch):
    path, wid, _, _ = smoke
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    hub = tmp_path / "th" / "hub" / "checkpoints" / inc.OFFICIAL_FILENAME
    hub.parent.mkdir(parents=True)
    os.symlink(path, hub)
    # a file under the official name with other content is still not the official file
    assert inc.resolve_inception_weights("", False, tmp_path / "cache") == (hub, wid, False)
    assert inc.is_official_sha256("6726825D" + "0" * 56) and not inc.is_official_sha256("0" * 64)
    monkeypatch.setattr(inc, "OFFICIAL_SHA256_PREFIX", wid[:8])
    assert inc.resolve_inception_weights("", False, tmp_path / "cache") == (hub, wid, True)
    assert inc.resolve_inception_weights(str(path), False, tmp_path / "cache") == (path, wid, True)


def test_file_hash_is_cached_by_size_and_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    real = hashlib.sha256(b"abc").hexdigest()
    assert file_sha256(f) == real
    side = tmp_path / "w.bin.sha256.json"
    rec = json.loads(side.read_text())
    side.write_text(json.dumps({**rec, "sha256": "f" * 64}))
    assert file_sha256(f) == "f" * 64  # read from the cache, not recomputed
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_sha256(f) == real  # stale entry: recomputed


def test_features_shapes_spatial_and_logits(extractor):
    x = _images(0, 4)
    f = extractor(x)
    assert {k: v.shape for k, v in f.items()} == {"pool": (4, 2048), "logits": (4, 1008), "spatial": (4, 2023)}
    assert all(v.dtype == np.float64 for v in f.values())
    m = extractor.model
    with torch.no_grad():
        # independent forward to the ADM evaluator's mixed_6/conv (= Mixed_6d.branch1x1), first 7 channels, NHWC
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        h = interpolate_bilinear_2d_like_tensorflow1x(x[:1].float(), size=(299, 299), align_corners=False)
        h = (h - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            h = getattr(m, name)(h)
        s = m.Mixed_6d.branch1x1(h)[:, :7].permute(0, 2, 3, 1).reshape(1, -1)
    np.testing.assert_allclose(f["spatial"][:1], s.double().numpy(), rtol=1e-4, atol=1e-5)
    # logits_unbiased = pool features times the fc weight, no bias
    np.testing.assert_allclose(f["logits"], f["pool"] @ m.fc.weight.double().numpy().T, rtol=1e-4, atol=1e-5)
    only = inc.InceptionFeatures(extractor.weights_path, batch_size=2, features=("spatial",))(x[:3])
    assert set(only) == {"spatial"} and only["spatial"].shape == (3, 2023)
    np.testing.assert_allclose(only["spatial"], f["spatial"][:3], rtol=1e-4, atol=1e-5)  # batches 2+1 vs 4
    with pytest.raises(TypeError):
        extractor(x.float())


def test_fid_through_the_real_extractor(extractor):
    # one 2048-d sqrtm costs ~10 s on 2 cores, so only the A-vs-B distance takes that path
    images_a = _images(1, 8, high=256)
    a = extractor(images_a)["pool"]
    b = extractor(_images(2, 8, high=128))["pool"]
    mu_a, s_a = gaussian_stats(a)
    mu_b, s_b = gaussian_stats(b)
    again = gaussian_stats(extractor(images_a)["pool"])
    assert frechet_distance(mu_a, s_a, *again).value == 0.0  # deterministic features: the same set gives 0
    diff = frechet_distance(mu_a, s_a, mu_b, s_b)
    # He-init weights separate the sets (PyTorch's default init would give 0 here); FD >= |mu_a - mu_b|^2
    assert diff.value > 1e-3 * np.trace(s_a) and diff.value >= ((mu_a - mu_b) ** 2).sum() * (1 - 1e-9)
