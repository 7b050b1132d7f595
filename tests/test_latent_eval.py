"""The latent-eval stage: rows from the metric plugins, masks in the ImageNet-S layout, and
`vfmbench eval latents` end to end on a tiny kl-vae (bad input first: exit 2, nothing written)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vfmbench.cli import main
from vfmbench.config import LatentMetricsConfig
from vfmbench.latent_eval import latent_rows, selected_specs, settings
from vfmbench.metrics.latent import standardise, viv_per_class
from vfmbench.metrics.latent_spatial import load_masks

TIER1 = {"viv", "lnc", "sec-0.25", "sec-0.5", "lds", "cds", "twonn-id"}


def _latents(seed=0, n=96, classes=4):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n // classes)
    z = rng.standard_normal((n, 4, 8, 8)) + 2.0 * y[:, None, None, None] * rng.standard_normal((1, 4, 1, 1))
    return 5.0 * z + 3.0, y


def test_rows_of_every_latent_only_metric_with_their_protocol(host):
    lc = LatentMetricsConfig()
    specs = selected_specs(list(host.metrics), lc)
    assert not any(s.name.startswith("uniformity") for s in specs)  # off by default
    z, y = _latents()
    rows, info = latent_rows(specs, z, y, settings(lc, 0))
    by = {r["metric"]: r for r in rows}
    assert set(by) == TIER1
    assert info["skipped"]["srss"].startswith("SRSS needs foreground masks")
    assert "equivariance-rotation" in info["skipped"]
    zs = standardise(z)[0]
    assert by["viv"]["value"] == pytest.approx(viv_per_class(zs, y)["viv"].mean())
    p = by["viv"]["protocol"]
    assert p["viv_convention"] == "per-dimension mean" and p["num_images"] == 96 and p["classes"] == 4 and p["k"] == 10
    assert info["mu"] == pytest.approx(list(z.mean(axis=(0, 2, 3))))
    assert len({json.dumps(r["protocol"], sort_keys=True) for r in rows}) == 1  # one table in the leaderboard
    assert by["lnc"]["higher_is_better"] and not by["viv"]["higher_is_better"]


def test_masks_add_srss_and_foreground_pooling(host):
    lc = LatentMetricsConfig(uniformity=True, uniformity_points=200, uniformity_repeats=1)
    specs = [s for s in selected_specs(list(host.metrics), lc) if s.name in ("srss", "lnc", "uniformity-gini")]
    z, y = _latents(n=40)
    masks = np.zeros((40, 8, 8), dtype=bool)
    masks[:, 2:6, 2:6] = True
    st = settings(lc, 0) | {"srss_min_fraction": 0.25}
    rows, info = latent_rows(specs, z, y, st, masks=masks)
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"srss", "lnc", "uniformity-gini"}
    assert by["lnc"]["protocol"]["lnc_pooling"] == "foreground (masks)"
    assert by["srss"]["protocol"]["srss_min_fg"] == 16


def test_imagenet_s_masks_follow_the_image_geometry(tmp_path):
    from vfmbench_plugins.datasets.imagefolder import ImageFolderDataset

    for split in ("train", "val"):
        (tmp_path / "data" / split / "n01").mkdir(parents=True)
        Image.new("RGB", (64, 32)).save(tmp_path / "data" / split / "n01" / "a.JPEG")
    ids = np.zeros((32, 64, 3), dtype=np.uint8)
    ids[:, 32:48, 0] = 7  # class 7 in the centre-right quarter
    ids[:, 48:, 0], ids[:, 48:, 1] = 1000 % 256, 1000 // 256  # 'ignore' (1000) is not foreground
    (tmp_path / "masks" / "n01").mkdir(parents=True)
    Image.fromarray(ids).save(tmp_path / "masks" / "n01" / "a.png")
    ds = ImageFolderDataset(str(tmp_path / "data"), "val", resolution=16)
    cells, present = load_masks(ds, tmp_path / "masks", 4)
    assert present.tolist() == [True]
    # resize 64x32 -> 32x16, centre crop columns 8..24: foreground columns 16..24 -> cells 2, 3
    assert cells[0].any(axis=0).tolist() == [False, False, True, True]


def _weights(tmp_path):
    base = ["--set", "data.train_images=64", "--set", "data.val_images=48", "--set", "tokenizer.train.images=0", "--set", "metrics.batch_size=16"]
    assert main(["run", "--tokenizer", "kl-vae", "--stages", "tokenizer", "--out", str(tmp_path / "w"), *base]) == 0
    return next((tmp_path / "w").glob("*/tokenizer/model.safetensors")), base


def test_eval_latents_end_to_end(tmp_path, capsys):
    weights, base = _weights(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "latents", "--tokenizer", "kl-vae", "--out", str(out), *base]) == 2  # no --weights
    assert main(["eval", "latents", "--tokenizer", "kl-vae", "--weights", str(weights), "--out", str(out), *base,
                 "--set", f"metrics.latent.masks={tmp_path / 'nowhere'}"]) == 2
    assert "metrics.latent.masks" in capsys.readouterr().err and not out.exists()
    names = "[viv, lnc, sec-0.25, sec-0.5, lds, cds, twonn-id, equivariance-rotation, equivariance-scale]"
    args = ["eval", "latents", "--tokenizer", "kl-vae", "--weights", str(weights), "--out", str(out), *base,
            "--set", f"metrics.names={names}", "--set", "metrics.latent.equivariance_images=8"]
    assert main(args) == 0
    run_dir = next(out.iterdir())
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert {r["metric"] for r in rows} == TIER1 | {"equivariance-rotation", "equivariance-scale"}
    assert all(r["family"] == "latent" and r["label"] == "smoke" and np.isfinite(r["value"]) for r in rows)
    eq = next(r for r in rows if r["metric"] == "equivariance-rotation")
    assert eq["protocol"]["num_images"] == 8 and eq["value"] > 0  # a random-init conv encoder is not rotation-equivariant
    done = json.loads((run_dir / "latent-eval" / "done.json").read_text())
    assert isinstance(done["seconds"], float) and set(done["metric_seconds"]) >= TIER1  # the stage's seconds, then per metric
    std = json.loads((run_dir / "latent-eval" / "standardisation.json").read_text())
    saved = torch.load(run_dir / "latent-eval" / "val_means.pt")
    assert saved["means"].shape[0] == 48 and std["mu"] == pytest.approx(saved["means"].double().mean(dim=(0, 2, 3)).tolist())
    # an interrupted stage resumes from the saved posterior means and gives the same rows
    (run_dir / "latent-eval" / "done.json").unlink()
    first = {r["metric"]: r["value"] for r in rows}
    assert main(args) == 0
    again = {json.loads(line)["metric"]: json.loads(line)["value"] for line in (run_dir / "results.jsonl").read_text().splitlines()}
    assert again == first


@pytest.mark.slow
def test_eval_latents_on_two_ranks_equals_one_process(tmp_path):
    """Posterior means, equivariance errors and iFID's decoded interpolations sharded over 2 ranks
    and gathered on rank 0 give exactly the one-process values."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    weights, base = _weights(tmp_path)
    names = "[viv, lnc, sec-0.5, lds, twonn-id, equivariance-rotation, equivariance-scale, ifid]"
    args = ["eval", "latents", "--tokenizer", "kl-vae", "--weights", str(weights), *base, "--set", f"metrics.names={names}",
            "--set", "metrics.latent.equivariance_images=20", "--set", "metrics.cache_image_features=false"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    values = []
    for nproc, out in ((1, "one"), (2, "two")):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if nproc == 2 else [sys.executable]
        p = subprocess.run([*launcher, "-m", "vfmbench.cli", *args, "--out", str(tmp_path / out)], capture_output=True, text=True,
                           timeout=900, env=env, cwd=root)
        assert p.returncode == 0, p.stderr[-3000:]
        run_dir = next((tmp_path / out).iterdir())
        assert json.loads((run_dir / "latent-eval" / "done.json").read_text())["world_size"] == nproc
        values.append({json.loads(line)["metric"]: json.loads(line)["value"] for line in (run_dir / "results.jsonl").read_text().splitlines()})
    assert len(values[0]) == 8 and values[0] == values[1]


def test_too_few_latents_skip_rows_with_the_reason(host):
    specs = selected_specs(list(host.metrics), LatentMetricsConfig())
    z, y = _latents(n=8, classes=8)  # 8 singleton classes, fewer latents than LNC's 10 neighbours
    rows, info = latent_rows(specs, z, y, settings(LatentMetricsConfig(), 0))
    assert {"viv", "lnc"} <= set(info["skipped"]) and "10 neighbours" in info["skipped"]["lnc"]
    assert {r["metric"] for r in rows} >= {"sec-0.5", "lds", "twonn-id"}
