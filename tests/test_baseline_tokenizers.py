"""Baseline tokenizer families: sd-vae, va-vae, distill, rae (and the ldm-decoder / vit-decoder plugins).

Tiny configs at 32-64 px on CPU. Weights are synthetic checkpoints written by the tests in the
layouts the plugins read: a diffusers AutoencoderKL folder (``save_pretrained``), an LDM-layout
single file, and a VA-VAE-style training checkpoint.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from vfmbench.build import BuildContext, build_tokenizer
from vfmbench.cli import resolve_run_config
from vfmbench.errors import MissingWeightsError, UserError
from vfmbench.interfaces import Tokenizer
from vfmbench.train import train_loop
from vfmbench_plugins.losses import feature_regression_loss

TINY_KL = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)

from helpers import count, make


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)




# ---------------------------------------------------------------------------------------------
# LDM layout helpers written independently of the plugin: diffusers AutoencoderKL keys -> LDM keys


def diffusers_to_ldm(state: dict, levels: int) -> dict:
    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.", r"encoder.down.\1.attn.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
    ]
    out = {}
    for k, v in state.items():
        new = k
        for pat, rep in rules:
            new = re.sub(pat, rep, new)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)$", new)
        if m:
            lvl = levels - 1 - int(m.group(1))
            kind = {"resnets": f"block.{m.group(3)}", "attentions": f"attn.{m.group(3)}", "upsamplers": "upsample"}[m.group(2)]
            new = f"decoder.up.{lvl}.{kind}.{m.group(4)}"
        is_attn = ".attn." in new or ".attn_1." in new
        new = new.replace("conv_shortcut", "nin_shortcut")
        if is_attn:
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                new = new.replace(f".{a}.", f".{b}.")
            if v.ndim == 2:
                v = v[:, :, None, None]
        out[new] = v.clone()
    return out


@pytest.fixture(scope="module")
def tiny_kl():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**TINY_KL).eval()


# ---------------------------------------------------------------------------------------------
# sd-vae


def test_sd_vae_diffusers_folder_matches_diffusers(host, tiny_kl, tmp_path):
    tiny_kl.save_pretrained(tmp_path / "vae")
    tok = make(host, "sd-vae", f"tokenizer.args.pretrained={tmp_path / 'vae'}").eval()
    assert isinstance(tok, Tokenizer) and re.fullmatch(r"[0-9a-f]{16}", tok.weights_id)
    assert tok.latent_shape(32) == (4, 16, 16) and count(tok) == count(tiny_kl)
    x = images()
    with torch.no_grad():
        ref = tiny_kl.encode(x.float() / 127.5 - 1).latent_dist
        post = tok.encode(x)
        assert torch.equal(post.mean, ref.mean) and torch.equal(post.logvar, ref.logvar)
        z = post.mean
        assert torch.equal(tok.decode(z), tiny_kl.decode(z).sample)
        # the 0.18215 convention lives in the tokenizer, whatever statistics the runner measures
        tok.set_latent_stats(torch.full((4,), 5.0), torch.full((4,), 7.0))
        assert torch.allclose(tok.normalize(z), z * 0.18215) and torch.allclose(tok.denormalize(tok.normalize(z)), z, atol=1e-6)


def test_sd_vae_per_channel_normalisation_uses_runner_stats(host):
    tok = make(host, "sd-vae", "tokenizer.args.normalisation=per-channel")
    z = torch.randn(2, 4, 4, 4)
    tok.set_latent_stats(torch.full((4,), 1.0), torch.full((4,), 2.0))
    assert torch.allclose(tok.normalize(z), (z - 1.0) / 2.0)
    with pytest.raises(UserError, match="normalisation"):
        make(host, "sd-vae", "tokenizer.args.normalisation=0.18215")


def test_ldm_key_table_agrees_with_diffusers_converter(tiny_kl):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from vfmbench_plugins.tokenizers.sd_vae import convert_ldm_state_dict

    ref = tiny_kl.state_dict()
    ldm = diffusers_to_ldm(ref, levels=2)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "decoder.up.1.upsample.conv.weight" in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    oracle = convert_ldm_vae_checkpoint(ldm, dict(TINY_KL))  # diffusers' own LDM converter
    ours, unmapped = convert_ldm_state_dict({"first_stage_model." + k: v for k, v in ldm.items()} | {"first_stage_model.loss.w": torch.zeros(1)})
    assert unmapped == []
    assert set(oracle) == set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]) and torch.equal(oracle[k].reshape(ref[k].shape), ref[k]), k


def test_sd_vae_loads_an_ldm_single_file(host, tiny_kl, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "vae-ft-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(tiny_kl.state_dict(), 2).items()}, str(path))
    tok = make(host, "sd-vae", f"tokenizer.args.pretrained={path}", "tokenizer.args.block_out_channels=[32, 64]").eval()
    x = images()
    with torch.no_grad():
        z = tiny_kl.encode(x.float() / 127.5 - 1).latent_dist.mean
        assert torch.equal(tok.encode(x).mean, z) and torch.equal(tok.decode(z), tiny_kl.decode(z).sample)


def test_sd_vae_missing_weights_say_where_they_looked(host, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"stabilityai/sd-vae-ft-ema[\s\S]*HF_HUB_OFFLINE"):
        make(host, "sd-vae", "tokenizer.args.pretrained=ft-ema")
    with pytest.raises(MissingWeightsError, match="neither"):
        make(host, "sd-vae", f"tokenizer.args.pretrained={tmp_path / 'nowhere'}")


def test_paper_size_parameter_counts(host):
    sd = make(host, "sd-vae", resolution=256, meta=True, preset="paper-sd-vae")
    assert count(sd.vae) == 83_653_863  # LDM kl-f8 (published: 83.7M)
    assert count(sd.vae.decoder, sd.vae.post_quant_conv) == 49_490_199  # published: 49.5M
    va = make(host, "va-vae", vfm=None, resolution=256, meta=True, preset="paper-va-vae")
    assert va.vfm.spec.name == "dinov2-l14" and va.vfm.embed_dim == 1024
    assert (count(va.encoder), count(va.decoder), count(va.vf_proj)) == (28_417_408, 41_418_659, 32 * 1024)
    rae = make(host, "rae", vfm=None, resolution=256, meta=True, preset="paper-rae")
    assert rae.latent_shape(256) == (768, 16, 16) and count(rae.decoder) == 415_056_640  # RAE ViT-XL GeneralDecoder, MLP 4096


# ---------------------------------------------------------------------------------------------
# va-vae


def test_va_vae_loads_a_synthetic_release_checkpoint(host, tmp_path):
    src = make(host, "va-vae").eval()
    # the LDM encoder and decoder modules carry diffusers AutoencoderKL keys
    diff = {**src.encoder.state_dict(), **src.decoder.state_dict()}
    levels = len(src.encoder.encoder.down_blocks)
    ldm = diffusers_to_ldm(diff, levels)
    assert any(re.match(r"encoder\.down\.\d+\.attn\.0\.q\.weight", k) for k in ldm)  # attention at the lowest level
    release = {"state_dict": {**ldm, "loss.discriminator.main.0.weight": torch.zeros(2), "linear_proj.weight": src.vf_proj.weight.detach()[:, :, 0, 0].clone()}}
    torch.save(release, tmp_path / "vavae-tiny.pt")
    tok = make(host, "va-vae", f"tokenizer.args.pretrained={tmp_path / 'vavae-tiny.pt'}").eval()
    assert re.fullmatch(r"[0-9a-f]{16}", tok.weights_id)
    x = images()
    with torch.no_grad():
        post, ref = tok.encode(x), src.encode(x)
        assert torch.equal(post.mean, ref.mean) and torch.equal(tok.decode(post.mean), src.decode(ref.mean))
    assert torch.equal(tok.vf_proj.weight, src.vf_proj.weight)
    with pytest.raises(UserError, match="ldm-decoder"):
        make(host, "va-vae", f"tokenizer.args.pretrained={tmp_path / 'vavae-tiny.pt'}", "decoder.name=conv-decoder")


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["va-vae", "distill", "rae"])
def test_teacher_stays_frozen_while_the_student_trains(host, name, tmp_path):
    tok = make(host, name, f"tokenizer.args.loss.lpips={0.5 if name == 'rae' else 0.0}")  # LPIPS costs seconds on CPU: once is enough
    teacher = snapshot(tok.vfm)
    student = snapshot(tok.decoder)
    phases = tok.training_phases(1e-3)
    trained = {id(p) for ph in phases for p in ph.params}
    assert not any(id(p) in trained for p in tok.vfm.parameters())
    if name == "rae":  # only the decoder trains
        assert trained == {id(p) for p in tok.decoder.parameters()}
    # one optimiser step by hand: the teacher gets no gradient
    tok.train()
    loss, logs = tok.phase_loss("g", images(), torch.zeros(2, dtype=torch.long), 0)
    loss.backward()
    assert all(p.grad is None for p in tok.vfm.parameters()) and math.isfinite(float(loss.detach()))
    assert {"rae": "lpips", "va-vae": "vf", "distill": "distill"}[name] in logs
    # and through the training loop
    x = images(2)
    train_loop(tok, phases, lambda idx: (x[idx], torch.zeros(len(idx), dtype=torch.long)), 2, total_images=2, batch_size=2,
               ckpt_path=tmp_path / "ckpt.pt", seed=0)
    after = snapshot(tok.vfm)
    assert all(torch.equal(teacher[k], after[k]) for k in teacher)
    assert any(not torch.equal(student[k], v) for k, v in snapshot(tok.decoder).items())
    assert not any(k.startswith("vfm.") for k in tok.weights_state())
    assert not any(k.startswith("vfm.") for k in torch.load(tmp_path / "ckpt.pt", weights_only=False)["module"])


def test_va_vae_uses_the_adaptive_vf_weight(host):
    tok = make(host, "va-vae", "tokenizer.args.loss.lpips=0")
    loss, logs = tok.phase_loss("g", images(), torch.zeros(2, dtype=torch.long), 0)
    assert logs["vf_lambda"] > 0 and {"vf_dm", "vf_cos", "l1", "kl"} <= set(logs)
    tok = make(host, "va-vae", "tokenizer.args.loss.lpips=0", "tokenizer.args.adaptive_vf=false", "tokenizer.args.vf_weight=0.3")
    assert math.isclose(tok.phase_loss("g", images(), torch.zeros(2, dtype=torch.long), 0)[1]["vf_lambda"], 0.3, rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# distill


def test_feature_regression_losses_on_hand_made_tensors():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)  # positions (1, 0) and (0, 2)
    assert float(feature_regression_loss(3.0 * f, f, "cosine")) < 1e-6  # scale-invariant
    orth = torch.tensor([[0.0, 1.0], [-2.0, 0.0]]).T.reshape(1, 2, 1, 2)
    assert math.isclose(float(feature_regression_loss(orth, f, "cosine")), 1.0, rel_tol=1e-6)
    assert math.isclose(float(feature_regression_loss(-f, f, "cosine")), 2.0, rel_tol=1e-6)
    # mse against the raw target: ((3-1)^2 + 0 + 0 + (0-2)^2) / 4 = 2
    p = torch.tensor([[3.0, 0.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 2)
    assert math.isclose(float(feature_regression_loss(p, f, "mse", normalize_target=False)), 2.0, rel_tol=1e-6)
    # mse against the layer-normalised target: (1, 0) -> (1, -1), (0, 2) -> (-1, 1) over channels
    ln = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).T.reshape(1, 2, 1, 2)
    assert float(feature_regression_loss(ln, f, "mse")) < 1e-4
    pred = torch.zeros(1, 2, 1, 2, requires_grad=True)
    target = f.clone().requires_grad_()
    feature_regression_loss(pred, target, "mse").backward()
    assert pred.grad is not None and target.grad is None
    with pytest.raises(ValueError):
        feature_regression_loss(pred, f, "l1")
    with pytest.raises(ValueError):
        feature_regression_loss(pred, f[:, :1], "cosine")


def test_distill_regresses_projected_latents_onto_teacher_tokens(host):
    tok = make(host, "distill", "tokenizer.args.target=mse", "tokenizer.args.projector_hidden=0")
    x = images()
    z = tok.encode(x).sample()
    out = tok.vfm(x, [-1])
    from vfmbench_plugins.losses import pool_tokens

    expected = feature_regression_loss(tok.projector(z), pool_tokens(out.layers[-1], out.grid, tuple(z.shape[-2:])), "mse")
    assert torch.allclose(tok.distill_loss(x, z), expected)
    with pytest.raises(UserError, match="target"):
        make(host, "distill", "tokenizer.args.target=l2")


# ---------------------------------------------------------------------------------------------
# rae


def test_rae_latent_is_the_normalised_token_grid(host):
    tok = make(host, "rae", resolution=64).eval()
    assert tok.latent_shape(64) == (tok.vfm.embed_dim, 8, 8) and tok.downsample == 8
    x = images(size=64)
    post = tok.encode(x)
    assert post.mean.shape == (2, tok.vfm.embed_dim, 8, 8)
    assert torch.allclose(post.sample(), post.mean, atol=1e-5)  # deterministic posterior
    assert torch.allclose(post.mean.mean(1), torch.zeros(2, 8, 8), atol=1e-4)  # LayerNorm without affine
    assert torch.allclose(post.mean.var(1, unbiased=False), torch.ones(2, 8, 8), atol=1e-3)
    out = tok.vfm(x, [-1]).layers[-1]  # encoder_norm=vfm: the VFM's own final output
    vfm_tok = make(host, "rae", "tokenizer.args.encoder_norm=vfm", resolution=64)
    assert torch.allclose(vfm_tok.encode(x).mean.flatten(2).transpose(1, 2), out)
    assert tok.decode(post.mean).shape == (2, 3, 64, 64)


def test_rae_noise_augmentation_scale(host):
    tok = make(host, "rae", "tokenizer.args.noise_tau=0.8", resolution=64)
    z = torch.zeros(512, 16, 4, 4)
    torch.manual_seed(1)
    sigma = tok.noise_augment(z).flatten(1).std(1)
    assert 0.0 <= float(sigma.min()) and float(sigma.max()) < 0.8 * 1.3
    assert abs(float(sigma.mean()) - 0.4) < 0.03  # sigma ~ U(0, tau): mean tau / 2
    assert torch.equal(make(host, "rae", "tokenizer.args.noise_tau=0", resolution=64).noise_augment(z), z)


def test_decoders_are_swappable_where_the_latent_allows(host):
    x = images(size=64)
    for name, dec in (("rae", "conv-decoder"), ("va-vae", "vit-decoder"), ("distill", "conv-decoder"), ("kl-vae", "ldm-decoder")):
        tok = make(host, name, f"decoder.name={dec}", resolution=64).eval()
        with torch.no_grad():
            assert tok.reconstruct(x).shape == x.shape and tok.reconstruct(x).dtype == torch.uint8, (name, dec)


def test_vit_decoder_unpatchifies_in_raster_order():
    from vfmbench_plugins.tokenizers.rae import VitDecoder

    torch.manual_seed(0)
    dec = VitDecoder(latent_channels=4, patch=4, width=16, depth=0, heads=2, mlp_ratio=4.0, cls_token=False).eval()
    z = torch.randn(1, 4, 3, 5)
    base = dec(z)
    z2 = z.clone()
    z2[0, :, 1, 3] += 1.0  # token at row 1, column 3 -> pixels rows 4..7, columns 12..15
    diff = (dec(z2) - base).abs().sum(1)[0] > 0
    assert base.shape == (1, 3, 12, 20)
    assert diff[4:8, 12:16].all() and diff.sum() == 16
