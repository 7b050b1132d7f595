"""Protocol fields that change a metric's value reach every row of that metric (through the
evaluator), and the leaderboard never ranks rows of different protocols together."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vfmbench.config import resolve
from vfmbench.evaluate import Evaluator, Reference
from vfmbench.leaderboard import render
from vfmbench.plugins import get_plugin_manager


@pytest.fixture(scope="module")
def host():
    return get_plugin_manager()


def _finish(host, tmp_path, names, splits, reference_rows=40, candidate_rows=32, ref_id="t:val:40"):
    """Evaluator.finish on stand-in Inception features (no network involved: features are given)."""
    cfg = resolve([{"metrics": {"names": names, "isc_splits": splits}, "run": {"smoke": True, "cache_dir": str(tmp_path)}}])
    ev = Evaluator(host, cfg, torch.device("cpu"), tmp_path / "cache")
    rng = np.random.default_rng(0)
    ev._features["inception/logits"].append(rng.normal(size=(candidate_rows, 1008)))
    ev._features["inception/pool"].append(rng.normal(size=(candidate_rows, 16)))
    ref_feats = {"inception/pool": rng.normal(size=(reference_rows, 16)) + 0.2}
    return ev.finish("generation", Reference(ref_id, lambda: ref_feats), extra_protocol={"sampler": "euler"})


def _gen_row(r, run):
    return {"run_id": run, "label": "smoke", "family": r["family"], "dataset": "t", "split": "val", "resolution": 32,
            "metric": r["metric"], "value": r["value"], "higher_is_better": r["higher_is_better"], "protocol": r["protocol"],
            "tokenizer": "x", "tokenizer_version": "1", "vfm": "", "vfm_version": "", "decoder": "", "decoder_version": "",
            "diffusion": "", "diffusion_version": "", "images": {}}


def test_rows_carry_their_metrics_protocol_fields(host, tmp_path):
    rows = {r["metric"]: r for r in _finish(host, tmp_path, ["is", "kid", "precision", "recall", "gfid"], 4)}
    assert set(rows) == {"is", "kid", "precision", "recall", "gfid"}
    assert rows["is"]["protocol"]["splits"] == 4 and "RandomState(2020)" in rows["is"]["protocol"]["split_order"]
    assert rows["kid"]["protocol"]["subsets"] == 100 and rows["kid"]["protocol"]["subset_size"] == 32  # min(1000, 40, 32)
    for m in ("precision", "recall"):
        assert rows[m]["protocol"]["k"] == 3 and rows[m]["protocol"]["reference_images"] == 40
    for r in rows.values():
        assert r["protocol"]["reference"] == "t:val:40" and r["protocol"]["sampler"] == "euler"
    # every field the spec declares as protocol is in its row (those of the run, e.g. dataset, come from the runner)
    runner_fields = {"dataset", "split", "resolution", "extractor", "extractor_weights", "steps", "guidance", "cfg_scale",
                     "cfg_interval", "timestep_shift", "label_sampling", "sample_precision", "diffusion_images"}
    for name, r in rows.items():
        missing = set(host.metrics.get(name).protocol_fields) - set(r["protocol"]) - runner_fields
        assert not missing, (name, missing)


def test_is_at_4_and_10_splits_never_share_a_table(host, tmp_path):
    four = _finish(host, tmp_path / "a", ["is", "gfid"], 4)
    ten = _finish(host, tmp_path / "b", ["is", "gfid"], 10)
    is4, is10 = (next(r for r in rows if r["metric"] == "is") for rows in (four, ten))
    assert is4["protocol"]["splits"] == 4 and is10["protocol"]["splits"] == 10 and is4["value"] != is10["value"]
    text = render([_gen_row(r, "four") for r in four] + [_gen_row(r, "ten") for r in ten])
    tables = text.split("## ")[1:]
    is_tables = [t for t in tables if "| is ↑" in t]
    assert len(is_tables) == 2 and all(("| four " in t) != ("| ten " in t) for t in is_tables)
    # gFID's protocol is the same in both runs: one table ranks them together
    gfid_tables = [t for t in tables if "gfid ↓" in t]
    assert len(gfid_tables) == 1 and "| four " in gfid_tables[0] and "| ten " in gfid_tables[0]


def test_another_reference_set_is_another_table(host, tmp_path):
    """gFID against the ADM batch and against a dataset split: the reference id is in the protocol."""
    adm = _finish(host, tmp_path / "a", ["gfid"], 4, ref_id="adm:VIRTUAL_imagenet256_labeled.npz:0123")
    split = _finish(host, tmp_path / "b", ["gfid"], 4)
    text = render([_gen_row(r, "adm") for r in adm] + [_gen_row(r, "split") for r in split])
    assert text.count("gfid ↓") == 2


def _adm_inception_score(logits, split_size):
    """The ADM evaluator's IS, from its description: softmax, consecutive chunks of split_size, mean only."""
    x = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i : i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def test_is_split_order_adm_and_torch_fidelity(host, tmp_path):
    """metrics.isc_split_order=consecutive gives the ADM evaluator's IS; the order is in the protocol."""
    spec = host.metrics.get("is")
    logits = np.random.default_rng(3).normal(size=(100, 30)) * 3
    adm = spec.value(spec.stats(logits, splits=10, split_order="consecutive"))
    tf = spec.value(spec.stats(logits, splits=10))
    assert adm["value"] == pytest.approx(_adm_inception_score(logits, 10), rel=1e-12)
    assert abs(tf["value"] - adm["value"]) > 1e-6 and adm["split_order"] != tf["split_order"]
    with pytest.raises(ValueError, match="split order"):
        spec.stats(logits, split_order="random")
    cfg_rows = []
    for order in ("shuffled", "consecutive"):
        cfg = resolve([{"metrics": {"names": ["is"], "isc_splits": 4, "isc_split_order": order}, "run": {"smoke": True}}])
        ev = Evaluator(host, cfg, torch.device("cpu"), tmp_path / order)
        ev._features["inception/logits"].append(np.random.default_rng(0).normal(size=(32, 1008)))
        cfg_rows.append(ev.finish("generation", Reference("t:val:40", None)))
    assert "RandomState(2020)" in cfg_rows[0][0]["protocol"]["split_order"]  # the default: torch-fidelity
    assert cfg_rows[1][0]["protocol"]["split_order"] == "consecutive chunks, not shuffled"
    text = render([_gen_row(r[0], o) for r, o in zip(cfg_rows, ("s", "c"))])
    assert text.count("| is ↑") == 2


def test_bad_metric_settings_stop_before_any_work(tmp_path, capsys):
    from vfmbench.cli import main

    out = tmp_path / "runs"
    for setting, words in (("metrics.isc_split_order=random", "isc_split_order"), ("metrics.isc_splits=0", "isc_splits"),
                           ("metrics.ssim_range=[0,255]", "ssim_range")):
        assert main(["run", "--preset", "smoke", "--dry-run", "--set", f"run.out={out}", "--set", setting]) == 2
        assert words in capsys.readouterr().err and not out.exists()


def test_pixel_metric_rows_carry_their_declared_fields(host, tmp_path):
    cfg = resolve([{"metrics": {"names": ["psnr", "ssim"], "ssim_range": "[0, 1]"}, "run": {"smoke": True}}])
    ev = Evaluator(host, cfg, torch.device("cpu"), tmp_path / "cache")
    ev._pairs["pixels/psnr"].append(np.array([20.0, 30.0]))
    ev._pairs["pixels/ssim"].append(np.array([0.5, 0.7]))
    rows = {r["metric"]: r for r in ev.finish("reconstruction", Reference("t:val:2", None))}
    assert rows["psnr"]["value"] == 25.0 and rows["ssim"]["value"] == pytest.approx(0.6)
    assert rows["ssim"]["protocol"]["ssim_range"] == "[0, 1]"
    for name, r in rows.items():
        missing = set(host.metrics.get(name).protocol_fields) - set(r["protocol"]) - {"dataset", "split", "resolution"}
        assert not missing, (name, missing)
