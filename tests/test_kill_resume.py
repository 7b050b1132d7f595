"""Exact resume: a run killed with SIGKILL at random points inside several stages, re-run with the
same command until it finishes, ends with the same results as an uninterrupted run, bitwise (CPU,
one thread), and with the same training logs (no line lost or written twice)."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from vfmbench.checkpoint import checkpoint_history
from vfmbench.interfaces import Phase
from vfmbench.train import train_loop

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "run", "--preset", "smoke",
    "--set", "run.num_threads=1", "--set", "data.train_images=128", "--set", "data.val_images=16",
    "--set", "tokenizer.train.images=128", "--set", "tokenizer.train.ckpt_every_images=32", "--set", "tokenizer.train.log_every_images=32",
    # two recipe stages: generator + projected discriminator (spectral-norm buffers), then + PatchGAN
    "--set", "component_args.vfm-vae.stages=[{name: strong-alignment, images: 64, lpips: 1.0, vf: 5.0}, "
             "{name: patchgan-finetune, images: 64, train: [decoder-high], l1: 0.0, lpips: 0.0, kl: 0.0, vf: 0.0, "
             "patchgan: 1.0, feature_matching: 10.0, equivariance: false}]",
    "--set", "diffusion.train.images=512", "--set", "diffusion.train.batch_size=32", "--set", "diffusion.train.ckpt_every_images=64",
    "--set", "diffusion.train.log_every_images=32",
    "--set", "diffusion.sample.num_images=20", "--set", "diffusion.sample.batch_size=8", "--set", "diffusion.sample.steps=2",
    "--set", "metrics.recon_images=12", "--set", "metrics.batch_size=8", "--set", "metrics.isc_splits=2", "--set", "metrics.probe.epochs=5",
    "--set", "metrics.names=[psnr, ssim, kid, is, probe-top1]",
]
# (stage to kill in, what starts the clock: its log line or a file of the run, longest random delay
# in seconds), in run order; the tokenizer is killed after its first checkpoint, so that it resumes
TARGETS = [("tokenizer", "*/tokenizer/ckpt-*.pt", 4.0), ("diffusion", None, 1.2), ("gen-eval", None, 2.0)]
LINE = re.compile(r"\[vfmbench\] (\S+): (running|finished|done, skipped)")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _command(out: Path) -> list[str]:
    # each run its own cache folder: the killed run recomputes everything (features, latents, references)
    # instead of reading what the uninterrupted run cached, so equal results mean equal computations
    return [sys.executable, "-m", "vfmbench.cli", *ARGS, "--out", str(out), "--set", f"run.cache_dir={out}-cache"]


def _running(log: str) -> str | None:
    """The stage a run was in when its stderr ended (None between stages)."""
    current = None
    for stage, what in LINE.findall(log):
        current = stage if what == "running" else (None if stage == current else current)
    return current


def _finish(out: Path) -> Path:
    p = subprocess.run(_command(out), capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    return Path(p.stdout.strip().splitlines()[-1])


def _values(run_dir: Path) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())}


def _logs(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted(run_dir.glob("*/train_log*.jsonl"))}


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_gives_the_same_results(tmp_path):
    reference = _finish(tmp_path / "uninterrupted")
    rng = random.Random(20251129)
    out = tmp_path / "killed"
    killed = []
    for target, trigger, max_delay in TARGETS:
        log = tmp_path / f"stderr-{target}.txt"
        with open(log, "w") as err:
            proc = subprocess.Popen(_command(out), stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=ROOT)
            deadline = time.time() + 300
            def started() -> bool:
                return any(out.glob(trigger)) if trigger else f"[vfmbench] {target}: running" in log.read_text()

            while proc.poll() is None and not started() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.1, max_delay))
            if proc.poll() is None:
                stage = _running(log.read_text())
                proc.kill()  # SIGKILL: no handler, no cleanup
                proc.wait()
                killed.append(stage)
    run_dir = _finish(out)
    assert run_dir.name == reference.name
    assert len({s for s in killed if s}) >= 3, killed  # killed inside at least three different stages
    for stage in killed:
        assert json.loads((run_dir / stage / "done.json").read_text())["stage"] == stage
    tok = json.loads((run_dir / "tokenizer" / "done.json").read_text())["stages"]
    assert any(st.get("resumed_from", 0) > 0 for st in tok), tok  # continued from a checkpoint, not from scratch
    values = _values(reference)
    assert {"psnr", "ssim", "kid", "is", "probe-top1"} <= set(values)
    assert _values(run_dir) == values  # bitwise: floats compared with ==
    assert _logs(run_dir) == _logs(reference) and len(_logs(reference)) >= 2
    for ckpts in (sorted((run_dir / "diffusion").glob("ckpt*.pt")), sorted((run_dir / "tokenizer").glob("ckpt-stage1-*.pt"))):
        assert len(ckpts) == 2, ckpts  # the last two checkpoints are kept


# -- checkpoint retention and fallback (train_loop on a toy, fast) ---------------------------------


class Noisy(nn.Module):
    """Linear regression whose loss draws from the global RNG (as diffusion losses do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)

    def phase_loss(self, phase, x, y, nimg):
        return ((self.lin(x) + 0.1 * torch.randn(x.shape[0], 1) - y) ** 2).mean(), {}


X = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
Y = X.sum(1, keepdim=True)


def _train(tmp: Path, total: int, keep: int = 2):
    tmp.mkdir(exist_ok=True)
    model = Noisy()
    res = train_loop(model, [Phase("g", list(model.parameters()), 0.05)], lambda idx: (X[idx], Y[idx]), 40, total_images=total,
                     batch_size=8, ckpt_path=tmp / "ckpt.pt", seed=3, ema_halflife_images=16, ckpt_every_images=16,
                     log_every_images=8, log_path=tmp / "log.jsonl", keep_checkpoints=keep)
    return model, res


def test_last_checkpoints_kept_and_a_corrupt_newest_falls_back(tmp_path, capsys):
    full, _ = _train(tmp_path / "full", 96)
    part = tmp_path / "part"
    _train(part, 64)
    assert [n for n, _ in checkpoint_history(part / "ckpt.pt")] == [48]  # ckpt.pt (64) and the one before it
    assert torch.load(part / "ckpt.pt", weights_only=False)["nimg"] == 64
    (part / "ckpt.pt").write_bytes((part / "ckpt.pt").read_bytes()[:100])  # a torn write
    with open(part / "log.jsonl", "a") as f:
        f.write('{"nimg": 999, "step": 1, "g/loss"')  # a line cut short by a kill
    resumed, res = _train(part, 96)
    assert res.resumed_from == 48 and "unreadable" in capsys.readouterr().err
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # bitwise the uninterrupted run
    assert (part / "log.jsonl").read_text() == (tmp_path / "full" / "log.jsonl").read_text()  # no duplicated or torn lines
    assert [n for n, _ in checkpoint_history(part / "ckpt.pt")] == [80]
    _train(tmp_path / "one", 48, keep=1)
    assert checkpoint_history(tmp_path / "one" / "ckpt.pt") == [] and (tmp_path / "one" / "ckpt.pt").exists()
