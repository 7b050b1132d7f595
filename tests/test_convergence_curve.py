"""The convergence curve of the diffusion stage: segments, rows, plot, and resumption after an
interruption giving the same weights and values as an uninterrupted run. A REG SiT is trained so
that the alignment wiring of the runner (targets of the image or its flip) is exercised too. The
metric stage is a stand-in (a statistic of the decoded samples): the real gFID path is the
Evaluator's and is tested with it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vfmbench.checkpoint import load_torch
from vfmbench.cli import resolve_run_config
from vfmbench.convergence import ConvergenceCurve, eval_points, plot_curve
from vfmbench.results import read_rows
from vfmbench.runner import Run

FLAGS = {"tokenizer": "kl-vae", "vfm": None, "decoder": None, "diffusion": "sit", "dataset": None}
SETS = [
    "data.train_images=32", "data.val_images=8", "metrics.batch_size=16",
    "tokenizer.train.images=0", "run.stages=[tokenizer,latents,diffusion]",
    "diffusion.train.images=96", "diffusion.train.batch_size=16", "diffusion.train.ckpt_every_images=16",
    "diffusion.train.ema_halflife_images=32", "diffusion.train.lr=1e-3", "diffusion.sample.batch_size=8",
    "diffusion.args.width=32", "diffusion.args.depth=2", "diffusion.args.heads=2", "diffusion.args.align=reg",
    "diffusion.args.align_depth=1", "diffusion.args.projector_dim=32", "diffusion.args.eval_every_images=32",
    "diffusion.args.eval_num_images=8", "diffusion.args.eval_steps=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


class StandInEvaluator:
    """The Evaluator's add_samples/reference/finish, with the mean pixel value as 'gfid'."""

    def __init__(self, fail_at: int | None = None):
        self.images, self.fail_at, self.calls = [], fail_at, []

    def add_samples(self, images):
        self.images.append(images)

    def dataset_reference(self, key, batches):
        return key

    def finish(self, family, reference, extra_protocol=None):
        images, self.images = torch.cat(self.images), []
        self.calls.append(extra_protocol["diffusion_images"])
        if extra_protocol["diffusion_images"] == self.fail_at:
            raise KeyboardInterrupt("interrupted during the evaluation")
        protocol = {"num_images": int(images.shape[0]), **extra_protocol}
        return [{"metric": "gfid", "metric_version": "1", "family": family, "value": float(images.float().mean()),
                 "higher_is_better": False, "protocol": protocol, "smoke": True}]


def execute(host, out: Path, evaluator: StandInEvaluator, monkeypatch) -> Path:
    monkeypatch.setattr(ConvergenceCurve, "evaluator", lambda self: evaluator)
    cfg = resolve_run_config(host, "smoke", None, SETS, {**FLAGS, "out": str(out)})
    return Run.prepare(host, cfg).execute()


def test_eval_points():
    assert eval_points(96, 32) == [32, 64, 96]
    assert eval_points(100, 32) == [32, 64, 96, 100]
    assert eval_points(96, 0) == [96] and eval_points(96, 200) == [96]


def test_curve_rows_plot_and_resume_after_interruption(host, tmp_path, monkeypatch):
    full = StandInEvaluator()
    run_a = execute(host, tmp_path / "a", full, monkeypatch)
    assert full.calls == [32, 64, 96]
    rows = read_rows(run_a / "diffusion" / "convergence.jsonl")
    assert [r["protocol"]["diffusion_images"] for r in rows] == [32, 64, 96]
    for r in rows:
        p = r["protocol"]
        assert r["metric"] == "gfid" and r["diffusion"] == "sit" and r["label"] == "smoke" and r["family"] == "generation"
        assert p["evaluation"] == "convergence" and p["weights"] == "ema" and p["num_images"] == 8 and p["steps"] == 2
        assert p["diffusion_epochs"] == p["diffusion_images"] / 32 and p["guidance"] == "none"
        assert (run_a / r["images"]["samples"]).stat().st_size > 500
    assert len({r["value"] for r in rows}) == 3  # the model changes between points
    assert (run_a / "diffusion" / "convergence.png").stat().st_size > 5000
    done = json.loads((run_a / "diffusion" / "done.json").read_text())
    assert done["images"] == 96 and done["steps"] == 6 and set(done["convergence_gfid"]) == {"32", "64", "96"}
    assert done["vfm_feature_cache"]["misses"] + done["vfm_feature_cache"]["hits"] == 2  # image and flip targets
    log = [json.loads(line) for line in (run_a / "diffusion" / "train_log.jsonl").read_text().splitlines()]
    assert [e["nimg"] for e in log] == [16, 32, 48, 64, 80, 96]
    assert all({"diffusion/denoise", "diffusion/proj", "diffusion/cls"} <= set(e) for e in log)

    # Interrupted in the evaluation at 64 images, then the same command again.
    broken = StandInEvaluator(fail_at=64)
    with pytest.raises(KeyboardInterrupt):
        execute(host, tmp_path / "b", broken, monkeypatch)
    run_b = next(p for p in (tmp_path / "b").iterdir() if p.is_dir())
    assert not (run_b / "diffusion" / "done.json").exists()
    assert [r["protocol"]["diffusion_images"] for r in read_rows(run_b / "diffusion" / "convergence.jsonl")] == [32]
    resumed = StandInEvaluator()
    assert execute(host, tmp_path / "b", resumed, monkeypatch) == run_b
    assert resumed.calls == [64, 96]  # 32 is not evaluated again
    done_b = json.loads((run_b / "diffusion" / "done.json").read_text())
    assert done_b["resumed_from"] == 64 and done_b["steps"] == 6
    rows_b = read_rows(run_b / "diffusion" / "convergence.jsonl")
    assert [(r["protocol"]["diffusion_images"], r["value"]) for r in rows_b] == [(r["protocol"]["diffusion_images"], r["value"]) for r in rows]
    a, b = load_torch(run_a / "diffusion" / "model.safetensors"), load_torch(run_b / "diffusion" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plot_curve(tmp_path):
    rows = [{"metric": "gfid", "value": v, "protocol": {"diffusion_images": n}} for n, v in ((100, 50.0), (200, 30.0), (300, 25.0))]
    rows.append({"metric": "is", "value": 3.0, "protocol": {"diffusion_images": 100}})
    assert plot_curve(rows, tmp_path / "c.png", images_per_epoch=100, title="t").stat().st_size > 5000
    assert plot_curve(rows[-1:], tmp_path / "d.png", images_per_epoch=100) is None
