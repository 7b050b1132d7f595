"""`vfmbench eval generation`: ADM reference batches and folders give the same gFID."""
import json
import math

import numpy as np
import torch
from PIL import Image

from vfmbench.cli import main
from vfmbench.metrics.adm import write_reference_batch, write_samples_npz
from vfmbench.metrics.frechet import gaussian_stats
from vfmbench.metrics.inception import InceptionFeatures


def _images(seed, n=12, size=32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return base


def _folder(path, images):
    path.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(path / f"{i:03d}.png")
    return path


def _rows(path):
    return {r["metric"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_adm_reference_equals_folder_reference(tmp_path, session_cache):
    ref_images, samples = _images(0), (_images(1) // 2)
    ref_dir = _folder(tmp_path / "ref", ref_images)
    sample_dir = _folder(tmp_path / "samples", samples)
    inc = InceptionFeatures.from_config("", smoke=True, cache_dir=session_cache, features=("pool", "spatial"))
    feats = inc(ref_images)
    mu, sigma = gaussian_stats(feats["pool"])
    mu_s, sigma_s = gaussian_stats(feats["spatial"])  # written as an ADM batch carries them
    write_reference_batch(tmp_path / "ref.npz", images=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    write_samples_npz(tmp_path / "samples.npz", samples)
    # sfid works the same way (mu_s/sigma_s); left out to keep the suite fast (one sqrtm of 2023x2023 each)
    sets = ["--set", "metrics.names=[gfid, kid, precision, recall]", "--smoke"]
    assert main(["eval", "generation", str(sample_dir), "--reference", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "a.jsonl"), *sets]) == 0
    assert main(["eval", "generation", str(tmp_path / "samples.npz"), "--reference", str(ref_dir), "--out", str(tmp_path / "b.jsonl"), *sets]) == 0
    a, b = _rows(tmp_path / "a.jsonl"), _rows(tmp_path / "b.jsonl")
    assert set(a) == set(b) == {"gfid", "kid", "precision", "recall"}
    for m in a:
        assert math.isclose(a[m]["value"], b[m]["value"], rel_tol=1e-6, abs_tol=1e-9), m
    assert a["gfid"]["value"] > 0 and a["gfid"]["label"] == "smoke"
    assert a["gfid"]["protocol"]["reference"].startswith("adm:ref.npz") and b["gfid"]["protocol"]["reference"].startswith("folder:ref")


def test_eval_generation_bad_input(tmp_path, capsys):
    assert main(["eval", "generation", str(tmp_path / "nope"), "--reference", str(tmp_path), "--smoke"]) == 2
    assert "neither a folder of images nor an .npz" in capsys.readouterr().err


def test_a_prefix_reference_reads_the_whole_split_cache(host, tmp_path, session_cache):
    """rFID's reference (the first n val images) and gFID's (the whole split) share one cached
    Inception pass: the prefix is the first rows of the whole split's features."""
    from vfmbench.config import resolve
    from vfmbench.evaluate import Evaluator

    cfg = resolve([dict(host.presets.get("smoke").values), {"metrics": {"names": ["gfid"], "batch_size": 4}, "run": {"cache_dir": str(session_cache)}}])
    ev = Evaluator(host, cfg, torch.device("cpu"), tmp_path / "cache")
    images = _images(3, n=10)
    passes = []

    def batches():
        passes.append(1)
        return (images[i : i + 4] for i in range(0, 10, 4))

    key = {"dataset": "t", "split": "val", "resolution": 32, "num_images": 10}
    small = ev.dataset_reference(key, batches, take=6)
    full = ev.dataset_reference(key, batches)
    assert small.id == "t:val:6" and full.id == "t:val:10"
    a, b = small.get_features(), full.get_features()
    assert len(passes) == 1 and ev.reference_cache_hits == 1
    assert a["inception/pool"].shape[0] == 6 and b["inception/pool"].shape[0] == 10
    np.testing.assert_array_equal(a["inception/pool"], b["inception/pool"][:6])
    direct = ev.inception()(images[:6])["pool"]
    np.testing.assert_allclose(a["inception/pool"], direct, rtol=1e-5, atol=1e-6)


def test_candidate_features_are_cached_by_their_pixels(host, tmp_path, session_cache):
    """A second evaluation of the same pixels (a rerun that reproduces the same reconstructions or
    samples) reads their Inception features from the cache; other pixels do not."""
    from vfmbench.config import resolve
    from vfmbench.evaluate import Evaluator

    def evaluator(**metrics):
        cfg = resolve([dict(host.presets.get("smoke").values), {"metrics": {"names": ["gfid"], **metrics}, "run": {"cache_dir": str(session_cache)}}])
        return Evaluator(host, cfg, torch.device("cpu"), tmp_path / "cache")

    images = _images(5, n=6)
    first, second = evaluator(), evaluator()
    first.add_samples(images)
    second.add_samples(images)
    assert first.image_feature_cache == {"hits": 0, "misses": 1} and second.image_feature_cache == {"hits": 1, "misses": 0}
    np.testing.assert_array_equal(first._features["inception/pool"][0], second._features["inception/pool"][0])
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel, one bit
    second.add_samples(changed)
    assert second.image_feature_cache == {"hits": 1, "misses": 1}
    off = evaluator(cache_image_features=False)
    off.add_samples(images)
    assert off.image_feature_cache == {"hits": 0, "misses": 0}
    np.testing.assert_array_equal(off._features["inception/pool"][0], first._features["inception/pool"][0])
