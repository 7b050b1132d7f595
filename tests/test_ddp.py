"""torchrun --nproc_per_node=2 (gloo, CPU) gives the same training and the same evaluation as one
process with the same global batch: a toy through train_loop, then ``vfmbench run`` itself."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "ddp_train.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _run(out: Path, nproc: int, accum: int):
    out.mkdir()
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), str(out), str(accum)]
    else:
        cmd = [*TORCHRUN[:-1], str(nproc), str(SCRIPT), str(out), str(accum)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    losses = [json.loads(line)["g/loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    return torch.load(out / "result-rank0.pt"), losses


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    single, l1 = _run(tmp_path / "one", 1, 1)
    double, l2 = _run(tmp_path / "two", 2, 1)
    accum, l3 = _run(tmp_path / "accum", 1, 2)
    assert len(l1) == len(l2) == 16 and l1[0] != l1[-1]
    for a, b, c in zip(l1, l2, l3):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)) and abs(a - c) <= 1e-5 * max(1.0, abs(a))
    for k in single:
        torch.testing.assert_close(single[k], double[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single[k], accum[k], rtol=1e-5, atol=1e-6)
    rank1 = torch.load(tmp_path / "two" / "result-rank1.pt")
    for k in double:
        assert torch.equal(double[k], rank1[k])  # DDP keeps the replicas identical


@pytest.mark.parametrize("n,bs", [(20, 8), (7, 8), (64, 8), (100, 16)])
def test_shard_batches_cover_every_index_once_in_order(monkeypatch, n, bs):
    from vfmbench import dist

    for world in (1, 2, 3, 5):
        covered = []
        for r in range(world):
            monkeypatch.setattr(dist, "world", lambda: world)
            monkeypatch.setattr(dist, "rank", lambda: r)
            mine = dist.shard_batches(n, bs)
            assert all(stop - start == bs for _, start, stop in mine[:-1])
            covered += [(k, start, stop) for k, start, stop in mine]
        assert covered == [(k, k * bs, min(n, k * bs + bs)) for k in range(-(-n // bs))]  # the one-process batches


def test_global_batch_that_does_not_split_is_a_user_error(monkeypatch):
    from vfmbench import dist
    from vfmbench.errors import UserError

    monkeypatch.setattr(dist, "world", lambda: 2)
    assert dist.per_device_batch(32, 2, "diffusion.train") == 8
    with pytest.raises(UserError, match=r"diffusion.train.batch_size=30 .* world size 2 x diffusion.train.grad_accum=2.*multiple of 4"):
        dist.per_device_batch(30, 2, "diffusion.train")


@pytest.mark.slow
def test_ranks_with_different_configs_stop_with_a_clear_error(tmp_path):
    p = subprocess.run([*TORCHRUN, str(SCRIPTS / "ddp_config.py"), str(tmp_path)], capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    for r in (0, 1):
        same, different = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert same == "ok"
        # every rank stops, naming the rank that differs and the fix
        assert "disagree on the run config" in different and "ranks [1] differ from rank 0" in different and "same command" in different


# -- vfmbench run under torchrun ------------------------------------------------------------------

# A tiny smoke run: a two-stage VFM-VAE recipe (generator only, then generator and PatchGAN
# discriminator), a few steps of diffusion, few images for the metrics. The projected
# discriminator is off (gan: 0): its spectral norm updates a power-iteration buffer in every
# forward, which DDP then overwrites with rank 0's, so it follows one process only approximately. KID, IS,
# PSNR and SSIM read Inception features and pixel pairs without the cost of a 2048-d matrix root.
TINY = [
    "--preset", "smoke",
    "--set", "run.num_threads=1", "--set", "data.train_images=64", "--set", "data.val_images=16",
    "--set", "tokenizer.train.images=64", "--set", "tokenizer.train.batch_size=16", "--set", "tokenizer.train.log_every_images=16",
    "--set", "tokenizer.train.ckpt_every_images=16",
    "--set", "component_args.vfm-vae.stages=[{name: strong-alignment, images: 32, lpips: 1.0, vf: 5.0, gan: 0.0}, "
             "{name: patchgan-finetune, images: 32, train: [decoder-high], l1: 0.0, lpips: 0.0, kl: 0.0, vf: 0.0, gan: 0.0, "
             "patchgan: 1.0, feature_matching: 10.0, equivariance: false}]",
    "--set", "diffusion.train.images=128", "--set", "diffusion.train.batch_size=32", "--set", "diffusion.train.log_every_images=32",
    "--set", "diffusion.train.ckpt_every_images=64",
    "--set", "diffusion.sample.num_images=20", "--set", "diffusion.sample.batch_size=8", "--set", "diffusion.sample.steps=2",
    "--set", "metrics.recon_images=12", "--set", "metrics.batch_size=8", "--set", "metrics.isc_splits=2",
    "--set", "metrics.names=[psnr, ssim, kid, is]",
]


def vfmbench_run(out: Path, *args: str, nproc: int = 1) -> Path:
    cmd = [*(TORCHRUN if nproc == 2 else [sys.executable]), "-m", "vfmbench.cli", "run", "--out", str(out), *TINY, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    return Path(p.stdout.strip().splitlines()[-1])


def _losses(path: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in json.loads(line).items() if k.endswith("/loss") or k == "nimg"} for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_vfmbench_run_trains_the_same_on_two_ranks(tmp_path):
    """Tokenizer (generator, then generator and discriminator phases) and diffusion training: 2 ranks x 2
    accumulation steps reach the losses of 1 process x 4 accumulation steps (global batch 16 and
    32, 4 and 8 images per device in both)."""
    stages = ["--stages", "tokenizer,latents,diffusion"]
    two = vfmbench_run(tmp_path / "two", *stages, "--set", "tokenizer.train.grad_accum=2", "--set", "diffusion.train.grad_accum=2", nproc=2)
    one = vfmbench_run(tmp_path / "one", *stages, "--set", "tokenizer.train.grad_accum=4", "--set", "diffusion.train.grad_accum=4")
    assert json.loads((two / "diffusion" / "done.json").read_text())["world_size"] == 2
    logs = ["tokenizer/train_log-stage0-strong-alignment.jsonl", "tokenizer/train_log-stage1-patchgan-finetune.jsonl",
            "diffusion/train_log.jsonl"]
    for name in logs:
        a, b = _losses(one / name), _losses(two / name)
        assert len(a) == len(b) >= 2, name
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys() and len(ra) >= 2, (name, ra, rb)
            for k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (name, k, ra, rb)
    assert {"g/loss", "d/loss"} <= set(_losses(one / logs[1])[0])


def _rows(run_dir: Path) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_vfmbench_run_evaluates_the_same_on_two_ranks(tmp_path, session_cache):
    """Reconstruction, latent caching, sampling and metric features sharded over 2 ranks and
    gathered on rank 0 give exactly what one process gives, from the same trained models."""
    one = vfmbench_run(tmp_path / "one")
    ref_one = tmp_path / "reference-one"
    shutil.move(str(session_cache / "reference"), ref_one)  # the 2-rank run computes the reference features again
    shutil.move(str(session_cache / "latents"), tmp_path / "latents-one")  # ... and encodes the latents again
    shutil.move(str(session_cache / "image-features"), tmp_path / "image-features-one")  # ... and featurises its candidates again
    two = tmp_path / "two" / one.name
    two.parent.mkdir()
    shutil.copytree(one / "tokenizer", two / "tokenizer")
    shutil.copytree(one / "diffusion", two / "diffusion")
    assert vfmbench_run(tmp_path / "two", nproc=2) == two
    for stage in ("recon-eval", "latents", "sample", "gen-eval"):
        assert json.loads((two / stage / "done.json").read_text())["world_size"] == 2
    assert json.loads((two / "latents" / "done.json").read_text())["latent_cache"] == "miss"
    for stage in ("recon-eval", "gen-eval"):
        cache = json.loads((two / stage / "done.json").read_text())["image_feature_cache"]
        assert cache["hits"] == 0 and cache["misses"] >= 1, (stage, cache)
    for split in ("train", "val"):
        a, b = torch.load(one / "latents" / f"{split}.pt"), torch.load(two / "latents" / f"{split}.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), split
    assert a["latents"].shape[0] == 16
    sa, sb = np.load(one / "sample" / "samples.npz"), np.load(two / "sample" / "samples.npz")
    assert sa["arr_0"].shape[0] == 20 and np.array_equal(sa["arr_0"], sb["arr_0"])
    rows_one, rows_two = _rows(one), _rows(two)
    assert set(rows_one) == {"psnr", "ssim", "kid", "is"} and rows_one == rows_two
    # the reference statistics (Inception features of the val split, cached by rank 0) are the same
    ref_two = session_cache / "reference"
    files = sorted(p.name for p in ref_two.glob("*.npz"))  # what this run computed (ref_one may hold other tests' entries)
    assert files and set(files) <= {p.name for p in ref_one.glob("*.npz")}
    for f in files:
        a, b = np.load(ref_one / f), np.load(ref_two / f)
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
        assert a["pool"].shape == (16, 2048)  # each val image exactly once
        # hence the FID statistics (mu, sigma of pool_3) of the reference are the same too
        assert np.array_equal(a["pool"].mean(0), b["pool"].mean(0))
        assert np.array_equal(np.cov(a["pool"], rowvar=False), np.cov(b["pool"], rowvar=False))
