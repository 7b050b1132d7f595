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
