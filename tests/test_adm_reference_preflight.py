"""gFID in the paper presets is against the ADM reference batch: without the file a run stops
before any work (also --dry-run) with exit 2, naming the file and where to get it."""
from __future__ import annotations

import numpy as np
import pytest

from vfmbench.cli import main
from vfmbench.config import resolve
from vfmbench.errors import UserError
from vfmbench.metrics.adm import ADM_IMAGENET256, REFERENCE_BATCH_URLS, check_reference
from vfmbench.plugins import get_plugin_manager

URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"


def _generating_full_presets():
    host = get_plugin_manager()
    for name in host.presets.names():
        cfg = resolve([dict(host.presets.get(name).values)])
        if "gen-eval" in cfg.run.stages and not cfg.run.smoke:
            yield name, cfg


def test_every_full_generation_preset_uses_the_adm_batch():
    found = dict(_generating_full_presets())
    assert {"lightningdit-xl1-paper", "reg-sit-xl1-paper"} <= set(found)
    for name, cfg in found.items():
        assert cfg.metrics.reference == ADM_IMAGENET256, name
    assert REFERENCE_BATCH_URLS[ADM_IMAGENET256] == URL


@pytest.mark.parametrize("preset", ["lightningdit-xl1-paper", "reg-sit-xl1-paper"])
@pytest.mark.parametrize("dry", [True, False])
def test_missing_batch_stops_before_any_work(preset, dry, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the preset's relative file name is looked up here: absent
    out = tmp_path / "runs"
    argv = ["run", "--preset", preset, "--set", f"run.out={out}", "--set", f"data.root={tmp_path / 'imagenet'}"]
    assert main(argv + (["--dry-run", "--json"] if dry else [])) == 2
    captured = capsys.readouterr()
    assert ADM_IMAGENET256 in captured.err and URL in captured.err and "--set metrics.reference=PATH" in captured.err
    assert captured.out == "" and not out.exists() and list(tmp_path.iterdir()) == []


def test_check_reference_cases(tmp_path):
    check_reference("", ["gen-eval"])  # the val split
    check_reference(str(tmp_path / ADM_IMAGENET256), ["tokenizer", "recon-eval"])  # no stage uses it
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4))
    check_reference(str(stats), ["gen-eval"])
    bare = tmp_path / "other.npz"
    np.savez(bare, x=np.zeros(3))
    with pytest.raises(UserError, match="not an ADM reference batch"):
        check_reference(str(bare), ["diffusion"])
    text = tmp_path / "broken.npz"
    text.write_text("not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        check_reference(str(text), ["gen-eval"])
    with pytest.raises(UserError, match="ADM-format reference batch") as e:
        check_reference(str(tmp_path / "mine.npz"), ["gen-eval"])
    assert "val split" in str(e.value)


def test_the_preset_validates_once_the_batch_is_there(tmp_path):
    from vfmbench.runner import validate

    host = get_plugin_manager()
    ref = tmp_path / ADM_IMAGENET256
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4))
    cfg = resolve([dict(host.presets.get("lightningdit-xl1-paper").values), {"metrics": {"reference": str(ref)}}])
    try:
        validate(host, cfg)
    except UserError as e:  # later checks (e.g. the paper VFM's weights, absent offline) may stop it: not the batch
        assert ADM_IMAGENET256 not in str(e) and "metrics.reference" not in str(e), e
    with pytest.raises(UserError, match=ADM_IMAGENET256):
        validate(host, resolve([dict(host.presets.get("lightningdit-xl1-paper").values), {"metrics": {"reference": str(tmp_path / 'x' / ADM_IMAGENET256)}}]))
