"""`vfmbench leaderboard --correlate`: coefficients against independent computations, pairing of
latent and target rows, and the CLI output (table and plots) on synthetic rows."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from vfmbench.cli import main
from vfmbench.correlate import correlations, pair_rows
from vfmbench.leaderboard import collect_rows
from vfmbench.results import write_rows

PUBLISHED = Path(__file__).resolve().parents[1] / "leaderboards" / "published-gfid-cross-family.yaml"


def _row(run, metric, value, family, tokenizer="kl-vae", label="smoke", hib=False, proto=None):
    return {"run_id": run, "label": label, "tokenizer": tokenizer, "tokenizer_version": "1", "vfm": "", "vfm_version": "", "decoder": "",
            "decoder_version": "", "diffusion": "", "diffusion_version": "", "dataset": "shapes", "split": "val", "resolution": 64,
            "metric": metric, "value": value, "family": family, "higher_is_better": hib, "protocol": proto or {"num_images": 128}, "images": {}}


def test_coefficients_match_independent_formulas():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 7.0])
    c = correlations(x, y, n_boot=200)
    assert c["n"] == 5
    assert c["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731  (no ties here)
    assert c["spearman"] == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    concordant = sum(np.sign(x[j] - x[i]) * np.sign(y[j] - y[i]) for i, j in pairs)
    assert c["kendall"] == pytest.approx(concordant / len(pairs))  # (8 - 2) / 10
    for name in ("pearson", "spearman", "kendall"):
        lo, hi = c[f"{name}_ci"]
        assert -1.0 <= lo <= hi <= 1.0


def test_monotone_predictor_has_rank_correlation_one():
    x = np.linspace(0.1, 2.0, 12)
    c = correlations(x, np.exp(3 * x), n_boot=100)
    assert c["spearman"] == pytest.approx(1.0) and c["kendall"] == pytest.approx(1.0)
    assert c["pearson"] < 0.95
    assert c["spearman_ci"] == pytest.approx((1.0, 1.0))


def test_pairs_by_run_and_published_numbers_by_tokenizer():
    rows = [_row("a", "viv", 1.0, "latent", "sd-vae-ft-ema"), _row("a", "gfid", 30.0, "generation", "sd-vae-ft-ema"),
            _row("b", "viv", 2.0, "latent", "eq-vae"), _row("b", "gfid", 40.0, "generation", "eq-vae"),
            _row("c", "viv", 5.0, "latent", "unknown")]  # no target: left out
    rows += collect_rows([PUBLISHED])
    groups = pair_rows(rows, "gfid")
    own = [g for g in groups if g.labels == {"smoke"}]
    assert len(own) == 1 and sorted(p[0] for p in own[0].points) == ["a", "b"]
    published = [g for g in groups if "paper" in g.labels and g.metric == "viv"]
    assert {p[2] for g in published for p in g.points} == {25.91, 46.74, 20.81, 37.81}  # SiT-XL and SiT-B targets of both
    ifid = [g for g in groups if g.metric == "ifid"]  # published iFID against published gFID, one group per gFID protocol
    assert sorted(len(g.points) for g in ifid) == [9, 10]


def test_published_ifid_predicts_published_gfid():
    groups = [g for g in pair_rows(collect_rows([PUBLISHED]), "gfid") if len(g.points) == 10]
    c = correlations([p[1] for p in groups[0].points], [p[2] for p in groups[0].points], n_boot=0)
    assert c["spearman"] > 0.8  # the iFID README's claim (≈0.85), recomputed from its table
    assert math.isnan(c["spearman_ci"][0])


def test_cli_writes_table_and_plots(tmp_path, capsys):
    rows = []
    for i in range(6):
        rows += [_row(f"run{i}", "viv", 1.0 + i, "latent"), _row(f"run{i}", "lnc", 0.9 - 0.1 * i, "latent", hib=True),
                 _row(f"run{i}", "rfid", 5.0 - i, "reconstruction"), _row(f"run{i}", "psnr", 20.0 + i, "reconstruction", hib=True),
                 _row(f"run{i}", "gfid", 10.0 + 3 * i + (i % 2), "generation")]
    write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "board" / "lb.md"
    assert main(["leaderboard", str(tmp_path / "rows.jsonl"), "--out", str(out), "--correlate", "gfid"]) == 0
    text = out.read_text()
    assert "## Latent metrics as predictors of gfid" in text and "`smoke`" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| viv"))
    assert "| 6 " in line and "+0.9" in line
    pngs = sorted((tmp_path / "board" / "lb-correlate").glob("*.png"))
    assert len(pngs) == 3 and all(p.stat().st_size > 1000 for p in pngs)  # viv, lnc and the rFID baseline (not psnr)
    assert "| rfid " in text
    assert "lb-correlate/" in text
    assert "Latent diffusability" in text  # the latent family's leaderboard table


def test_cli_bad_input(tmp_path, capsys):
    write_rows(tmp_path / "rows.jsonl", [_row("a", "viv", 1.0, "latent")])
    assert main(["leaderboard", str(tmp_path / "rows.jsonl"), "--correlate", "gfid"]) == 2  # no --out
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "lb.md"
    assert main(["leaderboard", str(tmp_path / "rows.jsonl"), "--out", str(out), "--correlate", "gfid"]) == 2
    assert "no result row has that metric" in capsys.readouterr().err
    assert not out.exists()
