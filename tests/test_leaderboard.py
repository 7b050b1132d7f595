import json

import pytest

from vfmbench.errors import UserError
from vfmbench.leaderboard import collect_rows, render
from vfmbench.results import protocol_id, read_rows, write_rows


def row(run, metric, value, proto=None, label="smoke", family="reconstruction", hib=False):
    return {"run_id": run, "label": label, "family": family, "dataset": "shapes", "split": "val", "resolution": 64,
            "metric": metric, "value": value, "higher_is_better": hib, "protocol": proto or {"num_images": 128},
            "tokenizer": "vfm-vae", "tokenizer_version": "1", "vfm": "siglip2-l16-512", "vfm_version": "1",
            "decoder": "conv-decoder", "decoder_version": "1", "diffusion": "", "diffusion_version": "", "images": {}}


def test_rows_roundtrip(tmp_path):
    rows = [row("a", "rfid", 3.0), row("a", "psnr", 20.0, hib=True)]
    write_rows(tmp_path / "results.jsonl", rows)
    assert read_rows(tmp_path / "results.jsonl") == rows


def test_tables_split_by_protocol_and_ranked_by_direction():
    rows = [row("a", "rfid", 3.0), row("b", "rfid", 1.0), row("c", "rfid", 0.5, proto={"num_images": 50000})]
    text = render(rows)
    assert text.count("## Reconstruction") == 2  # c has another protocol: its own table
    first = text.split("## Reconstruction")[1]
    assert first.index("| b ") < first.index("| a ") and "| c " not in first
    assert "rfid ↓" in text and "> **smoke**" in text


def test_higher_is_better_sorts_descending():
    rows = [row("a", "probe-top1", 30.0, family="representation", hib=True), row("b", "probe-top1", 60.0, family="representation", hib=True)]
    text = render(rows)
    assert "probe-top1 ↑" in text and text.index("| b ") < text.index("| a ")


def test_render_is_deterministic_under_row_order():
    rows = [row("a", "rfid", 3.0), row("b", "rfid", 1.0), row("a", "psnr", 20.0, hib=True), row("b", "psnr", 25.0, hib=True)]
    assert render(rows) == render(list(reversed(rows)))


def test_protocol_id_depends_on_protocol_and_label():
    assert protocol_id(row("a", "rfid", 1.0)) == protocol_id(row("b", "rfid", 2.0))
    assert protocol_id(row("a", "rfid", 1.0)) != protocol_id(row("a", "rfid", 1.0, label="official"))
    assert protocol_id(row("a", "rfid", 1.0)) != protocol_id(row("a", "rfid", 1.0, proto={"num_images": 7}))


def test_smoke_and_official_never_share_a_table():
    text = render([row("a", "rfid", 3.0), row("b", "rfid", 1.0, label="official")])
    assert text.count("## Reconstruction") == 2
    assert text.index("`official`") < text.index("`smoke`")


def test_published_file_renders_with_citations(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rows = collect_rows([root / "leaderboards" / "published.yaml"])
    assert rows and all(r["citation"] for r in rows)
    text = render(rows, title="Published")
    assert "guidance=none" in text and "guidance=cfg" in text  # guided and unguided never in one table
    assert (root / "leaderboards" / "published.md").read_text() == render(rows, title="Published numbers (ImageNet 256×256)")


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="no results.jsonl"):
        collect_rows([tmp_path])
    with pytest.raises(UserError, match="no result rows"):
        render([])


def test_copy_images_makes_links_that_resolve(tmp_path, capsys):
    from vfmbench.cli import main

    run = tmp_path / "runs" / "a"
    (run / "sample").mkdir(parents=True)
    (run / "sample" / "samples.png").write_bytes(b"\x89PNG fake")
    r = row("a", "gfid", 3.0, family="generation")
    r["images"] = {"samples": "sample/samples.png"}
    write_rows(run / "results.jsonl", [r])
    out = tmp_path / "board" / "smoke.md"
    assert main(["leaderboard", str(tmp_path / "runs"), "--out", str(out), "--copy-images"]) == 0
    text = out.read_text()
    assert "[samples](smoke-images/a/samples.png)" in text
    assert (out.parent / "smoke-images" / "a" / "samples.png").read_bytes() == b"\x89PNG fake"
