"""The released-tokenizer zoo (docs/zoo.md): every entry, through the user path.

For each release: a random-init copy in the release's own format (``save_pretrained`` folder from
its config, or an original-layout checkpoint) is loaded with ``tokenizer.weights=DIR``; the full
release config's encoder/decoder parameter counts (meta device) match the brief's published
counts; the latent shape at 256 px (meta device, full size) matches f/C; a tiny round trip runs;
the shipped normalisation matches a closed form; a wrong or missing key names the key.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from vfmbench.build import BuildContext, build_tokenizer
from vfmbench.config import resolve
from vfmbench.errors import MissingWeightsError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def releases(host):
    return [s for s in host.tokenizers if s.release]


def release_of(spec):
    return spec.factory.args[1]


def load(host, name, weights, **args):
    cfg = resolve([{"tokenizer": {"name": name, "weights": str(weights), "args": args}, "run": {"device": "cpu"}}])
    return build_tokenizer(BuildContext(host=host, config=cfg))


def zoo_names():
    from vfmbench.plugins import get_plugin_manager

    return sorted(s.name for s in get_plugin_manager().tokenizers if s.release)


ZOO = zoo_names()


def test_every_issue_entry_is_registered(host):
    # Issue 17's list, by loading family (names are the zoo's).
    wanted = {"sd-vae-ft-ema", "sd-vae-ft-mse", "sdxl-vae", "sd35-vae", "flux1-vae", "eq-vae", "eq-vae-ema",
              "va-vae-f16d32", "va-vae-f16d32-hf", "e2e-vavae", "mar-kl16"}
    assert wanted <= set(ZOO)
    for s in releases(host):
        assert s.release and s.fetch and s.license and s.encoder_params_m > 0 and s.decoder_params_m > 0, s.name
        assert s.input_range in ("[-1, 1]", "[0, 1]") and s.shipped_normalisation, s.name


@pytest.mark.parametrize("name", ZOO)
def test_full_size_counts_and_latent_shape(host, name):
    from vfmbench_plugins.tokenizers.released import build_model, param_split

    spec = host.tokenizers.get(name)
    rel = release_of(spec)
    model = build_model(rel, meta=True)
    enc, dec = param_split(rel, model)
    assert enc + dec == sum(p.numel() for p in model.parameters())  # nothing outside encoder and decoder
    # The brief gives 3 significant digits: within its rounding (0.05 M) plus 0.1 %.
    for got, published in ((enc, spec.encoder_params_m), (dec, spec.decoder_params_m)):
        assert abs(got / 1e6 - published) <= 0.05 + 1e-3 * published, (name, got, published)
    cls = spec.factory.args[0]
    tok = cls(rel, spec.config(), model, None)
    with torch.no_grad():
        z = tok.moments(torch.empty(1, 3, 256, 256, device="meta"))[0]
    assert tuple(z.shape[1:]) == spec.latent_shape(256), (name, z.shape)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """One random-init tiny copy of every release, in its own format: ROOT/<name>."""
    from vfmbench.plugins import get_plugin_manager
    from vfmbench_plugins.tokenizers.released import write_random_release

    root = tmp_path_factory.mktemp("zoo")
    for s in get_plugin_manager().tokenizers:
        if s.release:
            write_random_release(release_of(s), root / s.name, seed=len(s.name))
    return root


def _images(n=2, size=64, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("name", ZOO)
def test_tiny_release_loads_and_round_trips(host, tiny_root, name):
    spec = host.tokenizers.get(name)
    tok = load(host, name, tiny_root / name)
    assert tok.weights_id not in ("", "trained", "random-init", "meta")
    x = _images()
    with torch.no_grad():
        post = tok.encode(x)
        assert tuple(post.mean.shape) == (2, *spec.latent_shape(64))
        assert float(post.std.max()) < 1e-6  # posterior mean (the zoo protocol)
        rec = tok.decode(post.mean)
        # the decode path is the library model's own: same output as calling it directly
        assert rec.shape == (2, 3, 64, 64) and torch.isfinite(rec).all()
        assert tok.reconstruct(x).dtype == torch.uint8
        z = post.mean
        assert torch.allclose(tok.denormalize(tok.normalize(z)), z, atol=1e-5)
    if spec.deterministic:
        return
    sampled = load(host, name, tiny_root / name, posterior="sample")
    with torch.no_grad():
        assert float(sampled.encode(x).std.min()) > 1e-4  # a real posterior when asked for


def test_kl_round_trip_equals_diffusers(host, tiny_root):
    """The tokenizer is diffusers' model: encode mean + decode equal AutoencoderKL's own calls."""
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(str(tiny_root / "sd-vae-ft-ema")).eval()
    tok = load(host, "sd-vae-ft-ema", tiny_root / "sd-vae-ft-ema")
    x = _images()
    with torch.no_grad():
        want = ref.decode(ref.encode(x.float() / 127.5 - 1).latent_dist.mean).sample
        got = tok.decode(tok.encode(x).mean)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_shipped_normalisation_closed_forms(host, tiny_root):
    tok = load(host, "flux1-vae", tiny_root / "flux1-vae")  # (z - shift) * scale
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(tok.normalize(z), (z - 0.1159) * 0.3611, rtol=1e-5, atol=1e-6)
    tok = load(host, "mar-kl16", tiny_root / "mar-kl16")  # scale from the release data, not the config
    torch.testing.assert_close(tok.normalize(z), z * 0.2325, rtol=1e-5, atol=1e-6)
    tok = load(host, "va-vae-f16d32", tiny_root / "va-vae-f16d32")  # latents_stats.pt
    st = torch.load(tiny_root / "va-vae-f16d32" / "latents_stats.pt")
    z = torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(tok.normalize(z), (z - st["mean"]) / st["std"], rtol=1e-5, atol=1e-6)
    # per-channel mode: the runner's statistics replace the shipped ones
    tok = load(host, "sd-vae-ft-ema", tiny_root / "sd-vae-ft-ema", normalisation="per-channel")
    tok.set_latent_stats(torch.full((4,), 2.0), torch.full((4,), 4.0))
    torch.testing.assert_close(tok.normalize(torch.full((1, 4, 1, 1), 6.0)), torch.ones(1, 4, 1, 1))


def test_ldm_layout_writer_inverts_the_key_table():
    """The original-layout writer (independent inverse) and sd_vae's LDM_KEY_TABLE compose to the identity."""
    from vfmbench_plugins.tokenizers.released import build_model, to_ldm_layout
    from vfmbench_plugins.tokenizers.sd_vae import convert_ldm_state_dict
    from vfmbench_plugins.tokenizers.zoo_kl import RELEASES

    rel = next(r for r in RELEASES if r.name == "va-vae-f16d32")
    state = build_model(rel, {**rel.config, **rel.tiny}).state_dict()
    back, unmapped = convert_ldm_state_dict(to_ldm_layout(state, 5))
    assert not unmapped and set(back) == set(state)
    for k in state:
        torch.testing.assert_close(back[k], state[k])


def test_missing_or_wrong_key_is_named(host, tiny_root, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "sd"
    shutil.copytree(tiny_root / "sd-vae-ft-ema", bad)
    f = bad / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    state.pop("decoder.conv_in.bias")
    save_file(state, str(f))
    with pytest.raises(UserError, match=r"decoder\.conv_in\.bias"):
        load(host, "sd-vae-ft-ema", bad)
    state["decoder.conv_in.bias"] = torch.zeros(7)  # wrong shape
    save_file(state, str(f))
    with pytest.raises(UserError, match=r"decoder\.conv_in\.bias"):
        load(host, "sd-vae-ft-ema", bad)
    # original layout: a missing key of the checkpoint
    ck = tmp_path / "vavae"
    shutil.copytree(tiny_root / "va-vae-f16d32", ck)
    path = ck / "va-vae-f16d32.ckpt"
    obj = torch.load(path)
    obj["state_dict"].pop("encoder.down.4.attn.0.q.weight")
    torch.save(obj, path)
    with pytest.raises(UserError, match=r"encoder\.down_blocks\.4\.attentions\.0\.to_q\.weight"):
        load(host, "va-vae-f16d32", ck)
    # a config of another class
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderDC"}))
    with pytest.raises(UserError, match="AutoencoderDC"):
        load(host, "sd-vae-ft-ema", bad)


def test_missing_weights_name_release_and_fetch_command(host, tmp_path):
    import time

    from vfmbench.runner import validate

    t0 = time.time()
    cfg = resolve([{"tokenizer": {"name": "flux1-vae"}}])
    with pytest.raises(MissingWeightsError, match=r"black-forest-labs/FLUX\.1-schnell.*hf download black-forest-labs/FLUX\.1-schnell"):
        validate(host, cfg)
    cfg = resolve([{"tokenizer": {"name": "flux1-vae"}, "zoo": {"root": str(tmp_path)}}])
    with pytest.raises(MissingWeightsError, match=r"flux1-vae.*does not exist.*hf download"):
        validate(host, cfg)
    assert time.time() - t0 < 5


def test_flux2_patchify_and_batchnorm_match_the_pipeline(host, tiny_root):
    from diffusers import AutoencoderKLFlux2
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    ref = AutoencoderKLFlux2.from_pretrained(str(tiny_root / "flux2-vae")).eval()
    tok = load(host, "flux2-vae", tiny_root / "flux2-vae")
    x = _images()
    with torch.no_grad():
        z = tok.encode(x).mean
        want = Flux2Pipeline._patchify_latents(ref.encode(x.float() / 127.5 - 1).latent_dist.mean)
        torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4)
        bn_mean, bn_var = ref.bn.running_mean.view(1, -1, 1, 1), ref.bn.running_var.view(1, -1, 1, 1)
        assert float(bn_var.std()) > 0.01  # the random release has non-trivial statistics
        torch.testing.assert_close(tok.normalize(z), (z - bn_mean) / torch.sqrt(bn_var + 1e-4), rtol=1e-5, atol=1e-5)
        rec = tok.decode(z)
        torch.testing.assert_close(rec, ref.decode(Flux2Pipeline._unpatchify_latents(want)).sample, rtol=1e-4, atol=1e-4)


def test_rae_and_video_shipped_statistics(host, tiny_root):
    cfg = json.loads((tiny_root / "rae-dinov2-b" / "config.json").read_text())
    mean, std = torch.tensor(cfg["latents_mean"]), torch.tensor(cfg["latents_std"])
    tok = load(host, "rae-dinov2-b", tiny_root / "rae-dinov2-b")
    z = torch.randn(1, 768, 4, 4)
    torch.testing.assert_close(tok.normalize(z), (z - mean) / (std + 1e-5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.denormalize(tok.normalize(z)), z, rtol=1e-4, atol=1e-4)
    x = _images()
    with torch.no_grad():  # raw latent = the class's latent before its own per-position normalisation
        from diffusers import AutoencoderRAE

        ref = AutoencoderRAE.from_pretrained(str(tiny_root / "rae-dinov2-b")).eval()
        torch.testing.assert_close(tok.normalize(tok.encode(x).mean), ref.encode(x.float() / 255).latent, rtol=1e-4, atol=1e-4)
    cfg = json.loads((tiny_root / "wan21-vae" / "config.json").read_text())
    tok = load(host, "wan21-vae", tiny_root / "wan21-vae")
    z = torch.randn(1, 16, 4, 4)
    m, s = torch.tensor(cfg["latents_mean"]).view(1, -1, 1, 1), torch.tensor(cfg["latents_std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(tok.normalize(z), (z - m) / s, rtol=1e-5, atol=1e-5)


def test_cli_list_and_missing_weights_exit_2(capsys):
    from vfmbench.cli import main

    assert main(["list", "tokenizers"]) == 0
    out = capsys.readouterr().out
    assert "flux2-vae" in out and "black-forest-labs/FLUX.2-dev" in out and "34.4/49.6" in out
    assert main(["run", "--preset", "smoke", "--tokenizer", "sd35-vae", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "stabilityai/stable-diffusion-3.5-large" in err and "hf download" in err


def test_dry_run_counts_the_full_release_on_meta(host, tiny_root, capsys):
    from vfmbench.cli import main

    assert main(["run", "--preset", "smoke", "--tokenizer", "flux1-vae", "--set", f"tokenizer.weights={tiny_root / 'flux1-vae'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    import re

    total = int(re.search(r"tokenizer\s+flux1-vae\s+total\s+([\d,]+)", out).group(1).replace(",", ""))
    assert abs(total / 1e6 - (34.3 + 49.6)) < 0.1  # the release's architecture, not the tiny folder's


def test_sweep_zoo_root_convention(host, tiny_root):
    from vfmbench.sweep import load_sweep

    _, _, combos = load_sweep(host, __import__("pathlib").Path(__file__).parents[1] / "sweeps" / "zoo.yaml", "/tmp/none", [f"zoo.root={tiny_root}"])
    assert {c.cfg.tokenizer.name for c in combos} == set(ZOO)
    assert all(c.cfg.zoo.root == str(tiny_root) for c in combos)
    with pytest.raises(UserError, match=r"sd-vae-ft-ema.*DIR=/nonexistent/sd-vae-ft-ema"):
        load_sweep(host, __import__("pathlib").Path(__file__).parents[1] / "sweeps" / "zoo.yaml", "/tmp/none", ["zoo.root=/nonexistent"])


def _row(run, tok, metric, value, family="reconstruction", proto=None, label="smoke", hib=False):
    return {"run_id": run, "tokenizer": tok, "metric": metric, "value": value, "family": family, "label": label, "dataset": "shapes",
            "split": "val", "resolution": 64, "higher_is_better": hib, "protocol": proto or {"num_images": 32, "zoo": "zoo-v1"}}


def test_zoo_leaderboard_tables_per_protocol_and_published_apart(host, tmp_path):
    from vfmbench.zoo_board import render_zoo

    rows = [_row("a", "sd-vae-ft-ema", "rfid", 3.0), _row("a", "sd-vae-ft-ema", "psnr", 20.0, hib=True),
            _row("b", "flux1-vae", "rfid", 1.0), _row("b", "flux1-vae", "psnr", 25.0, hib=True),
            _row("c", "dc-ae-f32c32-in", "rfid", 2.0, proto={"num_images": 64, "zoo": "zoo-v1"}),  # another protocol
            _row("d", "kl-vae", "rfid", 0.1)]  # not a zoo entry
    pub = tmp_path / "p.yaml"
    pub.write_text("entries:\n  - {tokenizer: flux1-vae, metrics: {rfid: 0.165}, source: lavinal712}\n")
    text = render_zoo(rows, host, pub)
    measured, published = text.split("## Reported by the authors")
    assert measured.count("## Measured") == 2 and "kl-vae" not in measured
    first = measured.split("## Measured")[1]
    assert first.index("flux1-vae") < first.index("sd-vae-ft-ema")  # ranked by rFID
    assert "f8c16" in first and "34.3 / 49.6" in first and "Apache-2.0" in first
    assert "0.165" in published and "lavinal712" in published and "0.165" not in measured
    pub.write_text("entries:\n  - {tokenizer: flux1-vae, metrics: {rfid: 0.165}}\n")
    with pytest.raises(UserError, match="source"):
        render_zoo(rows, host, pub)


def test_a_folder_of_another_release_is_refused(host, tiny_root):
    with pytest.raises(UserError, match=r"latent_channels=4.*'sd35-vae'.*right release folder"):
        load(host, "sd35-vae", tiny_root / "sd-vae-ft-ema")
    with pytest.raises(UserError, match="AutoencoderKLFlux2 config"):
        load(host, "flux1-vae", tiny_root / "flux2-vae")
