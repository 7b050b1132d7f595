"""End-to-end runs of the CLI on the embedded default (CPU, offline), as a user types them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The smoke preset, shortened further for the test suite's time budget.
FAST = [
    "--set", "data.train_images=256", "--set", "data.val_images=64",
    "--set", "tokenizer.train.images=256", "--set", "diffusion.train.images=512",
    "--set", "diffusion.sample.num_images=32", "--set", "diffusion.sample.steps=4",
    "--set", "metrics.recon_images=32", "--set", "metrics.isc_splits=2", "--set", "metrics.probe.epochs=20",
]
REQUIRED_METRICS = {"rfid", "gfid", "is", "psnr", "probe-top1"}


def vfmbench(*args: str, out: Path | None = None, env: dict | None = None, check: bool = True, timeout: int = 1800):
    cmd = [sys.executable, "-m", "vfmbench.cli", *args]
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=out or ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-4000:]}")
    return p


def results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    p = vfmbench("run", "--preset", "smoke", "--out", str(out), *FAST)
    return Path(p.stdout.strip().splitlines()[-1]), out


@pytest.mark.slow
def test_smoke_run_writes_results_and_pictures(smoke_run):
    run_dir, _ = smoke_run
    rows = results(run_dir)
    assert REQUIRED_METRICS <= {r["metric"] for r in rows}
    for r in rows:
        assert r["label"] == "smoke" and r["run_id"] == run_dir.name
        assert r["tokenizer"] == "vfm-vae" and r["vfm"].startswith("siglip")
        assert isinstance(r["value"], float) and r["protocol"]["num_images"] > 0
    gfid = next(r for r in rows if r["metric"] == "gfid")
    assert gfid["protocol"]["sampler"] == "euler" and gfid["protocol"]["steps"] == 4 and gfid["diffusion"] == "flow-dit"
    for png in ("tokenizer/reconstructions.png", "recon-eval/reconstructions.png", "sample/samples.png", "diffusion/curves.png"):
        assert (run_dir / png).stat().st_size > 1000, png
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["config"]["run"]["smoke"] is True and cfg["versions"]["plugins"]


@pytest.mark.slow
def test_same_command_finds_same_directory_and_skips_stages(smoke_run):
    run_dir, out = smoke_run
    p = vfmbench("run", "--preset", "smoke", "--out", str(out), *FAST)
    assert Path(p.stdout.strip().splitlines()[-1]) == run_dir
    assert "tokenizer: done, skipped" in p.stderr and "gen-eval: done, skipped" in p.stderr


@pytest.mark.slow
def test_leaderboard_is_deterministic(smoke_run, tmp_path):
    run_dir, out = smoke_run
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    vfmbench("leaderboard", str(out), "--out", str(a))
    vfmbench("leaderboard", str(out), "--out", str(b))
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    assert "rfid ↓" in text and "probe-top1 ↑" in text and run_dir.name in text and "smoke" in text


@pytest.mark.slow
@pytest.mark.parametrize("combo", [["--tokenizer", "kl-vae"], ["--vfm", "dinov2"], ["--vfm", "clip"]])
def test_other_combinations(combo, tmp_path):
    p = vfmbench("run", "--preset", "smoke", "--out", str(tmp_path), *combo, *FAST)
    run_dir = Path(p.stdout.strip().splitlines()[-1])
    rows = results(run_dir)
    assert REQUIRED_METRICS <= {r["metric"] for r in rows}
    if combo[0] == "--tokenizer":
        assert {r["tokenizer"] for r in rows} == {"kl-vae"} and {r["vfm"] for r in rows} == {""}
    else:
        assert all(r["vfm"].startswith(combo[1]) for r in rows)


def test_unknown_tokenizer_exits_2_with_suggestion(tmp_path):
    p = vfmbench("run", "--tokenizer", "vfm-vea", "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and "did you mean 'vfm-vae'" in p.stderr and "Traceback" not in p.stderr
    p = vfmbench("run", "--tokenizer", "nope", "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and "unknown tokenizer 'nope'" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_config_key_exits_2(tmp_path):
    p = vfmbench("run", "--set", "nonexistent.key=1", "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and "nonexistent" in p.stderr
    p = vfmbench("run", "--set", "tokenizer.args.latent_chanels=3", "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and "latent_channels" in p.stderr
    p = vfmbench("run", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and "missing.yaml" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_dry_run_json_reports_parameters(tmp_path):
    p = vfmbench("run", "--preset", "smoke", "--dry-run", "--json", "--out", str(tmp_path))
    report = json.loads(p.stdout)
    assert report["latent_shape"] == [8, 4, 4]
    comps = report["components"]
    assert comps["vfm"]["trainable"] == 0 and comps["vfm"]["total"] > 0
    assert 0 < comps["tokenizer"]["trainable"] < comps["tokenizer"]["total"]
    assert comps["diffusion"]["trainable"] == comps["diffusion"]["total"] > 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigkill_during_diffusion_resumes_without_retraining_tokenizer(tmp_path):
    args = ["run", "--preset", "smoke", "--out", str(tmp_path), *FAST,
            "--set", "diffusion.train.images=4096", "--set", "diffusion.train.ckpt_every_images=256"]
    proc = subprocess.Popen([sys.executable, "-m", "vfmbench.cli", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("*/diffusion/ckpt.pt"))
        if found:
            ckpt = found[0]
            time.sleep(1.0)
            break
        time.sleep(0.5)
    assert ckpt is not None, "diffusion training never checkpointed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = ckpt.parent.parent
    assert not (run_dir / "diffusion" / "done.json").exists()
    tok_mtime = (run_dir / "tokenizer" / "model.safetensors").stat().st_mtime
    p = vfmbench(*args)
    assert "tokenizer: done, skipped" in p.stderr
    assert (run_dir / "tokenizer" / "model.safetensors").stat().st_mtime == tok_mtime
    done = json.loads((run_dir / "diffusion" / "done.json").read_text())
    assert done["resumed_from"] > 0 and done["images"] >= 4096
    assert REQUIRED_METRICS <= {r["metric"] for r in results(run_dir)}


@pytest.mark.slow
def test_example_plugin_installs_and_runs(tmp_path):
    import shutil

    target, src = tmp_path / "site", tmp_path / "src"
    shutil.copytree(ROOT / "examples" / "vfmbench-example-plugin", src)  # the build leaves files next to the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
                    str(src)], check=True, capture_output=True)
    env = {"PYTHONPATH": str(target) + os.pathsep + os.environ.get("PYTHONPATH", ""), "VFMBENCH_LOAD_PLUGINS": "patch-ae"}
    listing = json.loads(vfmbench("plugins", "--json", env=env).stdout)
    ex = next(p for p in listing if p["name"] == "patch-ae")
    assert ex["distribution"] == "vfmbench-example-plugin" and ex["components"] == {"tokenizers": ["patch-ae"]}
    assert not ex["builtin"]
    hidden = json.loads(vfmbench("plugins", "--json", env={**env, "VFMBENCH_LOAD_PLUGINS": ""}).stdout)
    assert {p["name"]: p["status"] for p in hidden}.get("patch-ae") == "disabled"  # listed, not loaded
    p = vfmbench("run", "--preset", "smoke", "--tokenizer", "patch-ae", "--out", str(tmp_path / "runs"), *FAST, env=env)
    rows = results(Path(p.stdout.strip().splitlines()[-1]))
    assert {r["tokenizer"] for r in rows} == {"patch-ae"} and REQUIRED_METRICS <= {r["metric"] for r in rows}


def test_missing_vfm_weights_offline_fails_fast(tmp_path):
    t0 = time.time()
    p = vfmbench("run", "--vfm", "dinov2-l", "--set", "run.smoke=false", "--set", "vfm.size=full", "--set", "vfm.pretrained=true",
                 "--out", str(tmp_path), check=False, env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2, p.stderr
    assert time.time() - t0 < 10
    assert "facebook/dinov2-large" in p.stderr and "vfm.weights" in p.stderr and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_random_vfm_needs_smoke(tmp_path):
    p = vfmbench("run", "--set", "run.smoke=false", "--out", str(tmp_path), check=False)
    assert p.returncode == 2 and "smoke" in p.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_second_run_reads_cached_vfm_features_and_latents(smoke_run, tmp_path):
    """Another combination with the same tokenizer (here: another diffusion length) reuses the VFM
    tokens and the latents cached by the first run instead of running the VFM and encoder again."""
    run_dir, _ = smoke_run
    first = json.loads((run_dir / "latents" / "done.json").read_text())["vfm_feature_cache"]
    assert first["misses"] >= 1
    p = vfmbench("run", "--preset", "smoke", "--out", str(tmp_path), *FAST, "--set", "diffusion.train.images=256",
                 "--stages", "tokenizer,recon-eval,latents")
    second_dir = Path(p.stdout.strip().splitlines()[-1])
    assert second_dir != run_dir
    stats = json.loads((second_dir / "recon-eval" / "done.json").read_text())["vfm_feature_cache"]
    assert stats["misses"] == 0 and stats["hits"] >= 1 and stats["vfm_images"] == 0, stats
    # the same tokenizer weights on the same images: the latents come from the latent cache
    assert json.loads((run_dir / "latents" / "done.json").read_text())["latent_cache"] == "miss"
    latents = json.loads((second_dir / "latents" / "done.json").read_text())
    assert latents["latent_cache"] == "hit" and latents["vfm_feature_cache"]["vfm_images"] == 0
    for name in ("train.pt", "val.pt", "stats.pt"):
        a, b = torch.load(run_dir / "latents" / name), torch.load(second_dir / "latents" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor)), name


@pytest.mark.slow
def test_eval_alignment_table_and_plot(smoke_run):
    run_dir, _ = smoke_run
    vfmbench("eval", "alignment", str(run_dir), "--images", "48", "--topk", "5")
    report = json.loads((run_dir / "alignment" / "alignment.json").read_text())
    layers = [r["layer"] for r in report["rows"]]
    assert layers[0] == "tokenizer" and layers[1:] == [f"block {k}" for k in range(1, len(layers))] and len(layers) > 1
    tok = report["rows"][0]
    assert tok["se_cknna"] is not None and tok["num_transforms"] == 5 and tok["num_images"] == 48
    assert all(-1.0 <= r["cknna"] <= 1.0 for r in report["rows"]) and report["label"] == "smoke"
    assert (run_dir / "alignment" / "alignment.png").stat().st_size > 1000
