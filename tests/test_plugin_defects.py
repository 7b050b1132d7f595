"""Defects a new plugin author ran into (issue 15), each with a test that failed before its fix:
BatchNorm's 0-dim buffer in the VFM weights hash, the one-width rule of VFM taps, a run folder left
behind by a tokenizer factory's bad-input error, and one leaderboard row label for a random-init and
a real-weights VFM."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vfmbench.config import VfmConfig
from vfmbench.errors import UserError
from vfmbench.interfaces import Vfm, VfmTokens
from vfmbench.specs import VfmSpec
from vfmbench.vfm import build_vfm, state_dict_id


def test_state_dict_id_hashes_batchnorm_buffers():
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert bn.state_dict()["1.num_batches_tracked"].dim() == 0
    a = state_dict_id(bn)  # raised before: a 0-dim tensor cannot be viewed as bytes
    # an independent reference: sha256 over (name|shape|dtype, raw bytes) of every entry, sorted by name
    h = hashlib.sha256()
    for name, t in sorted(bn.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    assert a == h.hexdigest()[:12]
    bn[1].num_batches_tracked += 1
    assert state_dict_id(bn) != a


class _TwoWidths(Vfm):
    """A CNN-like VFM whose taps have the widths of its stages (8 and 16): against the rule."""

    def __init__(self, spec, widths):
        super().__init__()
        self.spec, self.widths = spec, widths
        self.embed_dim, self.patch_size, self.num_blocks = widths[-1], 8, len(widths)
        self.default_layers = tuple(range(1, len(widths) + 1))
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, images, layers=(-1,), scale=None):
        b, g = images.shape[0], images.shape[-1] // 8
        return VfmTokens(layers={i: torch.zeros(b, g * g, self.widths[i - 1]) for i in layers}, grid=(g, g))


def _spec(widths):
    return VfmSpec(name="two-widths", description="toy", factory=lambda spec, cfg, cache: _TwoWidths(spec, widths), resolution=32)


def test_build_vfm_checks_the_one_width_rule():
    with pytest.raises(UserError, match="one-width rule.*embed_dim=16"):
        build_vfm(_spec((8, 16)), VfmConfig(name="two-widths"))
    vfm = build_vfm(_spec((16, 16)), VfmConfig(name="two-widths"))
    assert vfm.embed_dim == 16


def test_bad_tokenizer_arguments_write_no_run_folder(tmp_path, monkeypatch, capsys):
    """A tokenizer factory's UserError (here: a part's weights that do not exist) stops the run
    before config.json or any stage folder is written."""
    from vfmbench.cli import main

    plugins = tmp_path / "p"
    plugins.mkdir()
    (plugins / "picky_tok.py").write_text(
        "from vfmbench.errors import UserError\n"
        "from vfmbench.hookspecs import hookimpl\n"
        "from vfmbench.specs import TokenizerSpec\n\n"
        "def build(args, ctx):\n"
        "    raise UserError('picky-tok: discriminator weights /nowhere.pt do not exist; pass tokenizer.args.disc_weights')\n\n"
        "@hookimpl\n"
        "def register_tokenizers(register):\n"
        "    register(TokenizerSpec(name='picky-tok', description='toy', factory=build, uses_decoder=False))\n")
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "picky-tok")
    out = tmp_path / "runs"
    assert main(["--plugins-dir", str(plugins), "run", "--tokenizer", "picky-tok", "--out", str(out),
                 "--set", "data.resolution=32", "--stages", "tokenizer,results"]) == 2
    assert "disc_weights" in capsys.readouterr().err
    assert not out.exists()


def test_leaderboard_rows_show_the_vfm_weights():
    from vfmbench.leaderboard import render

    def row(run, weights, value):
        return {"run_id": run, "label": "smoke", "family": "reconstruction", "dataset": "shapes", "split": "val", "resolution": 64,
                "metric": "rfid", "value": value, "higher_is_better": False, "protocol": {"num_images": 8},
                "tokenizer": "vfm-vae", "tokenizer_version": "1", "vfm": "dinov2-s", "vfm_version": "1", "vfm_weights": weights,
                "decoder": "", "decoder_version": "", "diffusion": "", "diffusion_version": "", "images": {}}

    text = render([row("a", "random-init-0123456789ab", 3.0), row("b", "5f1e2d3c4b5a6978", 2.0)])
    assert "dinov2-s v1 (random-init-0123456789ab)" in text and "dinov2-s v1 (5f1e2d3c4b5a6978)" in text
