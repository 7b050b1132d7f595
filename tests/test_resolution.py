"""One resolution step: preset + YAML + flags + --set -> one validated, immutable ResolvedRun."""
from __future__ import annotations

import dataclasses

import pytest

from vfmbench.config import STAGES, parse_set
from vfmbench.errors import UserError
from vfmbench.resolution import ResolvedRun, resolve_run


def _layers(host, *sets):
    return [dict(host.presets.get("smoke").values), *[parse_set(s) for s in sets]]


def test_resolved_run_is_validated_and_read_only(host, tmp_path):
    r = resolve_run(host, _layers(host, f"run.out={tmp_path}", "tokenizer.name=kl-vae", "run.stages=[results, tokenizer]"))
    assert isinstance(r, ResolvedRun) and r.stages == ("tokenizer", "results") and list(r.cfg.run.stages) == ["tokenizer", "results"]
    assert r.run_dir == tmp_path / r.run_name and r.run_name.startswith("kl-vae-flow-dit-shapes64-")
    tok = r.components["tokenizer"]
    assert (tok.name, tok.args.base_channels, tok.args.downsample) == ("kl-vae", 32, 8)  # the preset's component_args, validated
    assert set(r.components) == {"tokenizer", "decoder", "diffusion", "dataset"}  # kl-vae has no VFM
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.cfg.run.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.cfg.data = r.cfg.data
    with pytest.raises(TypeError):
        r.components["vfm"] = tok
    # stages default to every registered stage in plan order; the same input resolves to the same plan
    assert resolve_run(host, _layers(host, f"run.out={tmp_path}")).stages == STAGES
    assert resolve_run(host, _layers(host, f"run.out={tmp_path}", "tokenizer.name=kl-vae", "run.stages=[results, tokenizer]")) == r


@pytest.mark.parametrize("item, message", [
    ("tokenizer.args.bogus=1", "unknown config key 'tokenizer.args.bogus'"),
    ("diffusion.sample.label_sampling=sorted", "label_sampling must be 'random' or 'balanced'"),
    ("run.stages=[tokeniser]", "did you mean 'tokenizer'"),
    ("tokenizer.name=vfm-vea", "did you mean 'vfm-vae'"),
])
def test_every_bad_input_is_caught_in_the_one_step(host, tmp_path, item, message):
    with pytest.raises(UserError, match=message):
        resolve_run(host, _layers(host, f"run.out={tmp_path}", item))
    assert not any(tmp_path.iterdir())
