"""Baseline components against their references (docs/fidelity.md): parameter counts from closed
forms written here from the reference architectures, the reference library's own modules and
configs, and independent re-implementations. Everything is built on the meta device or tiny.

References (read, not copied): CompVis/latent-diffusion ``ldm/modules/diffusionmodules/model.py``
(Encoder/Decoder, ResnetBlock, AttnBlock) and ``ldm/modules/losses/contperceptual.py``;
diffusers ``AutoencoderKL`` with the SD-VAE config; bytetriper/RAE ``GeneralDecoder`` (transformers
ViTMAE layers, ViT-XL: 1152 / 28 / 16, intermediate 4096); facebookresearch/DiT DiT-XL/2;
openai/guided-diffusion ``image_datasets.py`` ``center_crop_arr``; timm / open_clip pretrained configs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vfmbench.build import BuildContext, build_tokenizer
from vfmbench.cli import resolve_run_config

# ---------------------------------------------------------------------------------------------
# helpers

from helpers import count, make




# LDM autoencoder parameter counts in closed form, from the layer list of CompVis/latent-diffusion
# model.py: ResnetBlock = GroupNorm, 3x3 conv, GroupNorm, 3x3 conv (+ 1x1 shortcut when the width
# changes); AttnBlock = GroupNorm + q, k, v, proj_out 1x1 convs; down/upsample = one 3x3 conv.


def ldm_resblock(cin: int, cout: int) -> int:
    return 2 * cin + 9 * cin * cout + cout + 2 * cout + 9 * cout * cout + cout + (cin * cout + cout if cin != cout else 0)


def ldm_attn(c: int) -> int:
    return 2 * c + 4 * (c * c + c)


def ldm_encoder(ch: int, mult: list[int], blocks: int, attn: set[int], z: int) -> int:
    """Encoder (double_z) + quant_conv; ``attn`` = the levels (0 = full resolution) with attention."""
    n = 3 * 9 * ch + ch
    cin = ch
    for i, m in enumerate(mult):
        cout = ch * m
        for _ in range(blocks):
            n += ldm_resblock(cin, cout) + (ldm_attn(cout) if i in attn else 0)
            cin = cout
        if i != len(mult) - 1:
            n += 9 * cout * cout + cout
    n += 2 * ldm_resblock(cin, cin) + ldm_attn(cin) + 2 * cin + 9 * cin * 2 * z + 2 * z
    return n + (2 * z) ** 2 + 2 * z


def ldm_decoder(ch: int, mult: list[int], blocks: int, attn: set[int], z: int) -> int:
    """post_quant_conv + Decoder (``blocks + 1`` ResnetBlocks per level)."""
    cin = ch * mult[-1]
    n = z * z + z + 9 * z * cin + cin + 2 * ldm_resblock(cin, cin) + ldm_attn(cin)
    for i in reversed(range(len(mult))):
        cout = ch * mult[i]
        for _ in range(blocks + 1):
            n += ldm_resblock(cin, cout) + (ldm_attn(cout) if i in attn else 0)
            cin = cout
        if i != 0:
            n += 9 * cout * cout + cout
    return n + 2 * cin + 9 * cin * 3 + 3


# The SD-VAE kl-f8 config (stabilityai/sd-vae-ft-ema config.json; LDM first_stage_config ddconfig).
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu",
                     norm_num_groups=32, sample_size=256, scaling_factor=0.18215)


# ---------------------------------------------------------------------------------------------
# sd-vae / va-vae / ldm-decoder: the LDM AutoencoderKL


def test_ldm_closed_form_reproduces_the_published_kl_f8_size():
    # the closed form itself against the published numbers (83.7M in the LDM paper; diffusers: 83,653,863)
    assert ldm_encoder(128, [1, 2, 4, 4], 2, set(), 4) + ldm_decoder(128, [1, 2, 4, 4], 2, set(), 4) == 83_653_863


def test_sd_vae_kl_f8_is_diffusers_autoencoderkl_built_from_the_sd_config(host):
    from diffusers import AutoencoderKL

    ours = make(host, "sd-vae", resolution=256, meta=True, preset="paper-sd-vae").vae
    with torch.device("meta"):
        ref = AutoencoderKL(**SD_VAE_CONFIG)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(ref)
    assert count(ours) == count(ref) == 83_653_863
    assert count(ours.decoder, ours.post_quant_conv) == ldm_decoder(128, [1, 2, 4, 4], 2, set(), 4) == 49_490_199
    assert ours.config.scaling_factor == 0.18215


def test_va_vae_f16d32_encoder_and_decoder_equal_the_ldm_closed_form(host):
    # VA-VAE's ddconfig (LightningDiT tokenizer/configs/vavae_f16d32.yaml): ch 128, ch_mult [1, 1, 2, 2, 4],
    # num_res_blocks 2, attn_resolutions [16] at 256 px = the lowest of five levels, z_channels = embed_dim = 32
    va = make(host, "va-vae", vfm=None, resolution=256, meta=True, preset="paper-va-vae")
    mult = [1, 1, 2, 2, 4]
    assert count(va.encoder) == ldm_encoder(128, mult, 2, {4}, 32) == 28_417_408
    assert count(va.decoder) == ldm_decoder(128, mult, 2, {4}, 32) == 41_418_659
    # the VF projection: 1x1, no bias, latent -> DINOv2-L width (VA-VAE's linear_proj with reverse_proj)
    assert tuple(va.vf_proj.weight.shape) == (1024, 32, 1, 1) and va.vf_proj.bias is None


# ---------------------------------------------------------------------------------------------
# LDM loss weighting (contperceptual.LPIPSWithDiscriminator, the part without the GAN)


def ldm_nll_and_kl(x, recon, mean, logvar):
    """LDM's per-batch sums: nll = sum |x - x_hat| / B (logvar 0), kl = sum KL / B."""
    b = x.shape[0]
    nll = (x - recon).abs().sum() / b
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / b
    return nll, kl


@pytest.mark.parametrize("size", [16, 32])
def test_recon_loss_is_ldms_loss_over_the_image_size(size):
    from vfmbench.interfaces import DiagonalGaussian
    from vfmbench_plugins.recon_losses import ReconLoss, ReconLossArgs

    g = torch.Generator().manual_seed(size)
    x, recon = torch.rand(3, 3, size, size, generator=g) * 2 - 1, torch.rand(3, 3, size, size, generator=g) * 2 - 1
    mean, logvar = torch.randn(3, 4, size // 8, size // 8, generator=g), torch.randn(3, 4, size // 8, size // 8, generator=g)
    terms = ReconLoss(ReconLossArgs(l1=1.0, lpips=0.0, kl=1e-6)).__call__(recon, x, DiagonalGaussian(mean, logvar))
    nll, kl = ldm_nll_and_kl(x, recon, mean, logvar)
    ldm = nll + 1e-6 * kl
    assert torch.allclose(terms.total * 3 * size * size, ldm, rtol=1e-5)
    assert torch.allclose(terms.kl / terms.rec, 1e-6 * kl / nll, rtol=1e-5)  # the ratio LDM trains with


def test_kl_vae_loss_has_ldms_kl_to_reconstruction_ratio(host):
    tok = make(host, "kl-vae").train()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(3)
    loss, _ = tok.phase_loss("g", x, torch.zeros(2, dtype=torch.long), 0)
    torch.manual_seed(3)
    post = tok.encode(x)
    recon = tok.decode(post.sample())
    nll, kl = ldm_nll_and_kl(x.float() / 127.5 - 1, recon, post.mean, post.logvar)
    assert torch.allclose(loss * 3 * 32 * 32, nll + tok.args.kl_weight * kl, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# rae: the ViT-XL decoder of bytetriper/RAE (GeneralDecoder)


def rae_general_decoder_trainable(latent: int, width: int, depth: int, mlp: int, patch: int) -> int:
    """decoder_embed + trainable_cls_token + ViTMAELayer x depth (LN, q, k, v, out, LN, fc1, fc2)
    + decoder_norm + decoder_pred; the sin-cos decoder_pos_embed is frozen (requires_grad=False)."""
    layer = 2 * width + 4 * (width * width + width) + 2 * width + width * mlp + mlp + mlp * width + width
    return latent * width + width + width + depth * layer + 2 * width + width * patch * patch * 3 + patch * patch * 3


def test_rae_decoder_equals_raes_vit_xl_general_decoder(host):
    rae = make(host, "rae", vfm=None, resolution=256, meta=True, preset="paper-rae")
    assert rae.latent_shape(256) == (768, 16, 16)
    assert count(rae.decoder) == rae_general_decoder_trainable(768, 1152, 28, 4096, 16) == 415_056_640
    block = rae.decoder.blocks[0]
    assert block.mlp[0].out_features == 4096 and block.norm1.eps == 1e-12 and rae.decoder.norm.eps == 1e-12
    assert isinstance(block.mlp[1], torch.nn.GELU) and block.mlp[1].approximate == "none"  # ViTMAE hidden_act "gelu"


# ---------------------------------------------------------------------------------------------
# flow-dit against DiT-XL/2 (facebookresearch/DiT: 675,129,632 parameters, learn_sigma, fixed pos_embed Parameter)


def test_flow_dit_xl2_is_dit_xl2_without_learned_sigma_and_fixed_position_parameter():
    from vfmbench_plugins.diffusion.flow_dit import FlowDiTArgs, factory

    with torch.device("meta"):
        m = factory(FlowDiTArgs(width=1152, depth=28, heads=16, patch_size=2, qk_norm=False), (4, 32, 32), 1000)
    dit_xl2 = 675_129_632
    pos_embed = 256 * 1152  # DiT keeps its sin-cos table as a frozen Parameter; flow-dit as a buffer
    sigma_head = 1152 * 2 * 2 * 4 + 2 * 2 * 4  # learn_sigma doubles the final layer's outputs
    assert count(m) == dit_xl2 - pos_embed - sigma_head


# ---------------------------------------------------------------------------------------------
# ImageNet pipeline: ADM's center_crop_arr


def adm_center_crop_independent(image: Image.Image, res: int) -> np.ndarray:
    """guided-diffusion image_datasets.center_crop_arr, written again: count the BOX halvings first,
    then one BICUBIC resize of the short side to ``res`` (long side rounded half to even, as
    Python's round) and a floor-offset centre crop done by PIL."""
    w, h = image.size
    halvings = 0
    while min(w >> halvings, h >> halvings) >= 2 * res:
        halvings += 1
    for k in range(1, halvings + 1):
        image = image.resize((w >> k, h >> k), resample=Image.BOX)
    w, h = image.size
    short = min(w, h)
    size = (round(w * res / short), round(h * res / short))
    image = image.resize(size, resample=Image.BICUBIC)
    left, top = (size[0] - res) // 2, (size[1] - res) // 2
    return np.array(image.crop((left, top, left + res, top + res)))


@pytest.mark.parametrize("wh,res", [((500, 375), 64), ((1024, 768), 64), ((257, 256), 256), ((256, 999), 256), ((600, 600), 256),
                                    ((333, 517), 64), ((127, 130), 64), ((4000, 130), 32)])
def test_adm_center_crop_equals_an_independent_implementation(wh, res):
    from vfmbench_plugins.datasets.imagefolder import center_crop_arr

    rng = np.random.default_rng(wh[0] * 7 + wh[1])
    im = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    ours = center_crop_arr(im, res)
    assert ours.shape == (res, res, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, adm_center_crop_independent(im, res))


def test_imagefolder_serves_the_adm_crop_of_the_rgb_image(tmp_path):
    from vfmbench_plugins.datasets.imagefolder import ImageFolderDataset

    rng = np.random.default_rng(0)
    (tmp_path / "train" / "a").mkdir(parents=True)
    gray = Image.fromarray(rng.integers(0, 256, (300, 410), dtype=np.uint8), mode="L")  # ADM converts to RGB first
    gray.save(tmp_path / "train" / "a" / "x.png")
    img, label = ImageFolderDataset(str(tmp_path), "train", resolution=64)[0]
    assert label == 0 and img.dtype == torch.uint8 and tuple(img.shape) == (3, 64, 64)
    expected = adm_center_crop_independent(gray.convert("RGB"), 64).transpose(2, 0, 1)
    assert np.array_equal(img.numpy(), expected)


# ---------------------------------------------------------------------------------------------
# VFM preprocessing against the libraries' own pretrained configs (offline: timm / open_clip tables)

# vfmbench spec -> the timm pretrained config of the same checkpoint (transformers hub configs are not
# available offline; timm's entries for those checkpoints carry the same mean/std).
TIMM_TWINS = {
    "dinov2-l14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2-reg-b14": "vit_base_patch14_reg4_dinov2.lvd142m",
    "mae-l16": "vit_large_patch16_224.mae",
    "siglip2-l16-512": "vit_large_patch16_siglip_512.v2_webli",
    "siglip-so400m14-384": "vit_so400m_patch14_siglip_384.webli",
    "siglip-b16-224": "vit_base_patch16_siglip_224.webli",
}
# Where vfmbench resizes differently from the library on purpose: the VFM-VAE reference feeds
# SigLIP(2), EVA-CLIP and MAE through a bilinear resize (golden fixture vfm-vae; docs/vfm-vae.md).
VFM_VAE_BILINEAR = {"siglip", "siglip2", "eva-clip", "mae"}


def _library_cfg(spec) -> dict:
    if spec.library == "open_clip":
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.model_id, spec.weights_tag)
        size = open_clip.get_model_config(spec.model_id)["vision_cfg"]["image_size"]
        return dict(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"], size=size)
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.model_id if spec.library == "timm" else TIMM_TWINS[spec.name]).to_dict()
    return dict(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"], size=cfg["input_size"][-1])


def test_vfm_mean_std_and_interpolation_match_the_library_configs(host):
    checked = 0
    for spec in host.vfms:
        if spec.library not in ("open_clip", "timm") and spec.name not in TIMM_TWINS:
            continue
        lib = _library_cfg(spec)
        assert np.allclose(spec.mean, lib["mean"]) and np.allclose(spec.std, lib["std"]), spec.name
        if spec.family in VFM_VAE_BILINEAR:
            assert spec.interpolation == "bilinear", spec.name
        else:
            assert spec.interpolation == lib["interpolation"], spec.name
        if spec.family != "dinov2":  # DINOv2 runs at 224 (REPA, VA-VAE, RAE), its checkpoints at 518
            assert spec.resolution == lib["size"], spec.name
        checked += 1
    assert checked >= 17


def test_sd_vae_decoder_is_the_ldm_decoder_without_post_quant_conv():
    # the VFM-VAE ablation's "SD-VAE-style baseline" decoder (Table D) at the f16d32 width of the ablation
    from vfmbench_plugins.decoders.sd_vae_decoder import SdVaeDecoderArgs, build

    with torch.device("meta"):
        dec = build(SdVaeDecoderArgs(), 32, 16)
    assert count(dec) == ldm_decoder(128, [1, 1, 2, 2, 4], 2, set(), 32) - (32 * 32 + 32) == 38_262_659


# ---------------------------------------------------------------------------------------------
# va-vae: the VF loss, written again in the reference's layout (LightningDiT vavae contperceptual.py:
# flatten [B, C, h*w], normalise over C, per-image position x position cosine matrices, margins, and the
# adaptive weight ||grad nll|| / (||grad vf|| + 1e-4) clamped to [0, 1e8], times vf_weight)


def test_vf_loss_and_adaptive_weight_equal_the_reference_formulation():
    import torch.nn.functional as F

    from vfmbench_plugins.losses import adaptive_weight, vf_loss

    g = torch.Generator().manual_seed(5)
    z, f = torch.randn(3, 24, 4, 5, generator=g), torch.randn(3, 24, 4, 5, generator=g)
    f = f + 0.8 * z  # correlated, so both hinges are partly active
    ours, _ = vf_loss(z, f, margin_dm=0.25, margin_cos=0.5, weight_dm=1.0, weight_cos=1.0)
    zn, fn = F.normalize(z.flatten(2), dim=1), F.normalize(f.flatten(2), dim=1)
    dm = F.relu((torch.einsum("bci,bcj->bij", zn, zn) - torch.einsum("bci,bcj->bij", fn, fn)).abs() - 0.25).mean()
    mc = F.relu(1 - 0.5 - F.cosine_similarity(f, z)).mean()
    assert 0 < float(dm) and 0 < float(mc)
    assert torch.allclose(ours, dm + mc, rtol=1e-6, atol=1e-7)

    w = torch.randn(6, 4, generator=g, requires_grad=True)
    x = torch.randn(5, 4, generator=g)
    rec, other = (x @ w.T).abs().sum(), (x @ w.T).pow(2).mean()
    lam = adaptive_weight(rec, other, w, 0.1)
    g_rec, g_other = torch.autograd.grad(rec, w, retain_graph=True)[0], torch.autograd.grad(other, w)[0]
    assert torch.allclose(lam, 0.1 * torch.clamp(g_rec.norm() / (g_other.norm() + 1e-4), 0.0, 1e8))


# ---------------------------------------------------------------------------------------------
# the paper presets report the reference sizes (what a user sees before a GPU run)


@pytest.mark.parametrize("preset,expected", [
    ("paper-sd-vae", {"tokenizer": 83_653_863}),
    ("paper-va-vae", {"decoder": 41_418_659, "tokenizer_trainable": 28_417_408 + 41_418_659 + 32 * 1024}),
    ("paper-rae", {"decoder": 415_056_640, "tokenizer_trainable": 415_056_640}),
])
def test_paper_preset_dry_run_reports_reference_parameter_counts(preset, expected, tmp_path, capsys, monkeypatch):
    import json

    from vfmbench.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--preset", preset, "--dry-run", "--json", "--set", "metrics.reference=''", "--set", "vfm.pretrained=false", "--out", str(tmp_path / "runs")]) == 0
    comp = json.loads(capsys.readouterr().out)["components"]
    got = {"tokenizer": comp["tokenizer"]["total"], "tokenizer_trainable": comp["tokenizer"]["trainable"], "decoder": comp.get("decoder", {}).get("total")}
    assert {k: got[k] for k in expected} == expected
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
