"""The zoo end to end through the CLI (slow: ~1-3 min per run on a 2-core CPU): one smoke run of
the eval-only stages per loading family, ``vfmbench eval reconstruction`` of a release folder, and
the zoo sweep over a folder of random-init releases writing the zoo leaderboard."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_cli_e2e import ROOT, results, vfmbench

SMALL = ["--set", "data.train_images=64", "--set", "data.val_images=32", "--set", "metrics.recon_images=32",
         "--set", "metrics.probe.epochs=5", "--set", "metrics.names=[rfid, psnr, ssim, lpips, probe-top1]"]
# one entry per loading family (AutoencoderKL diffusers / original layout, DC, FLUX.2, one-frame video, RAE)
FAMILIES = ["sd-vae-ft-ema", "va-vae-f16d32", "dc-ae-f32c32-in", "flux2-vae", "wan21-vae", "rae-dinov2-b"]


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo-root")
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "vfmbench_plugins.tokenizers.released", str(root), *FAMILIES], check=True, cwd=ROOT)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_smoke_eval_only_run_of_each_family(zoo_root, tmp_path, name):
    p = vfmbench("run", "--preset", "smoke", "--tokenizer", name, "--set", f"tokenizer.weights={zoo_root / name}",
                 "--stages", "recon-eval,latents,probe,results", "--out", str(tmp_path), *SMALL)
    run_dir = Path(p.stdout.strip().splitlines()[-1])
    rows = results(run_dir)
    assert {"rfid", "psnr", "ssim", "lpips", "probe-top1"} <= {r["metric"] for r in rows}
    for r in rows:
        assert r["label"] == "smoke" and r["tokenizer"] == name
        assert r["protocol"]["zoo"] == "zoo-v1" and r["protocol"]["posterior"] == "mean"
    assert not (run_dir / "tokenizer").exists()  # nothing trained, nothing saved
    stats = (run_dir / "latents" / "stats.pt")
    assert stats.is_file()  # per-channel statistics recomputed the same way for every release


@pytest.mark.slow
def test_eval_reconstruction_of_a_release_folder(zoo_root, tmp_path):
    p = vfmbench("eval", "reconstruction", "--preset", "smoke", "--tokenizer", "dc-ae-f32c32-in", "--weights",
                 str(zoo_root / "dc-ae-f32c32-in"), "--out", str(tmp_path), *SMALL)
    run_dir = Path(p.stdout.strip().splitlines()[-1])
    done = json.loads((run_dir / "tokenizer" / "done.json").read_text())
    assert done["release"] == "mit-han-lab/dc-ae-f32c32-in-1.0-diffusers" and "stages" not in done  # loaded, not trained
    assert not (run_dir / "tokenizer" / "model.pt").exists()
    assert {r["metric"] for r in results(run_dir)} >= {"rfid", "psnr"}


@pytest.mark.slow
def test_zoo_sweep_writes_the_zoo_leaderboard(zoo_root, tmp_path):
    spec = yaml.safe_load((ROOT / "sweeps" / "zoo.yaml").read_text())
    spec["matrix"]["tokenizer"] = ["sd-vae-ft-ema", "dc-ae-f32c32-in"]  # two families of the same file, for time
    spec["set"] += SMALL[1::2]
    spec["leaderboard"] = {"out": str(tmp_path / "zoo.md"), "published": str(ROOT / "leaderboards" / "zoo-published.yaml")}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(spec))
    vfmbench("sweep", str(tmp_path / "zoo.yaml"), "--set", f"zoo.root={zoo_root}", "--out", str(tmp_path / "runs"))
    text = (tmp_path / "zoo.md").read_text()
    measured, published = text.split("## Reported by the authors")
    assert "`smoke`" in measured and "| sd-vae-ft-ema" in measured and "| dc-ae-f32c32-in" in measured
    assert measured.count("## Measured") == 1  # one protocol, one table
    assert "0.692" in published and "0.692" not in measured
