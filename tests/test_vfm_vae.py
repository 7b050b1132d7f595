"""VFM-VAE tokenizer: architecture against the released model's counts, stage freezing, the
equivariance transform, the adaptive VF weight, the safe-loss guard, EMA settings and loading the
authors' checkpoint layout."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from vfmbench.build import BuildContext, build_tokenizer
from vfmbench.config import resolve
from vfmbench.errors import UserError
from vfmbench.interfaces import to_float
from vfmbench.train import ema_beta, train_loop
from vfmbench_plugins.losses import pool_tokens, vf_loss
from vfmbench_plugins.tokenizers.vfm_vae import RELEASED_KEY_MAP, sample_equivariance, transform_image, transform_latent

# A 32 px variant of the smoke tokenizer: 4x4 tokens, a 2x2 latent, a four-block decoder.
TINY = {
    "data": {"resolution": 32, "train_images": 64, "val_images": 16},
    "component_args": {"vfm-vae": {"safe_loss_warmup_images": 0, "disc_resolution": 32}},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def smoke_cfg(host, *overrides, decoder=None):
    layers = [dict(host.presets.get("smoke").values), TINY, *overrides]
    if decoder:
        layers.append({"decoder": {"name": decoder}})
    return resolve(layers)


def tiny_tokenizer(host, *overrides, decoder=None):
    torch.manual_seed(0)
    return build_tokenizer(BuildContext(host=host, config=smoke_cfg(host, *overrides, decoder=decoder)))


def shapes(host, n=8, res=32):
    from vfmbench.config import DataConfig

    ds = host.datasets.get("shapes").factory(DataConfig(dataset="shapes", resolution=res, train_images=n, val_images=n), "train")
    return torch.stack([ds[i][0] for i in range(n)])


# ---------------------------------------------------------------------------------------------
# Architecture


@pytest.fixture(scope="module")
def paper():
    """The paper-preset tokenizer on the meta device (shapes and counts, no weights)."""
    from vfmbench.plugins import get_plugin_manager

    host = get_plugin_manager()
    cfg = resolve([dict(host.presets.get("vfm-vae-paper").values)])
    with torch.device("meta"):
        tok = build_tokenizer(BuildContext(host=host, config=cfg, meta=True))
    return host, cfg, tok


def test_paper_latent_shape_and_parameter_counts(paper):
    _, cfg, tok = paper
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert tok.latent_shape(256) == (32, 16, 16)
    assert tok.layers == [0, 12, -1] and tok.unshuffle == 2  # 32x32 SigLIP2 tokens -> 16x16 latent
    # The brief's measurement of the released generator, part by part.
    assert count(tok.vfm) == 316_742_656
    assert count(tok.compress) == 9_740_352 and count(tok.fuse) == 1_852_608
    assert count(tok.post_quant) == 1_907_328 and count(tok.vf_proj) == 32_768
    assert count(tok.decoder.mapping) == 525_312 and count(tok.decoder) - count(tok.decoder.mapping) == 125_712_312
    trainable = sum(p.numel() for p in tok.parameters() if p.requires_grad)
    assert trainable == 139_770_680  # the discriminator is not counted: it trains in its own phase


def test_paper_dry_run_reports_the_latent_and_counts(paper):
    from vfmbench.dryrun import dry_run

    host, _, _ = paper
    # offline the SigLIP2 weights are absent (a dry run checks them): the counts come from the architecture
    cfg = resolve([dict(host.presets.get("vfm-vae-paper").values), {"vfm": {"pretrained": False}}])
    report = dry_run(host, cfg)
    assert report["latent_shape"] == [32, 16, 16]
    assert report["components"]["tokenizer"]["trainable"] == 139_770_680
    assert report["components"]["decoder"]["name"] == "vfm-vae-decoder"


def test_paper_stage_freezing_selects_exactly_the_named_modules(paper):
    _, cfg, tok = paper
    stages = tok.training_stages(cfg.tokenizer.train.images, cfg.tokenizer.train.lr)
    assert [(s.name, s.images, s.lr) for s in stages] == [
        ("strong-alignment", 20_000_000, 1e-4), ("weak-alignment", 20_000_000, 1e-4),
        ("ssim-finetune", 1_000_000, 5e-5), ("patchgan-finetune", 3_000_000, 5e-5)]
    g_names = [n for n, _ in tok.generator_parameters()]
    head = {n for n in g_names if n.startswith(("compress.", "fuse.", "vf_proj."))}
    expected = [
        set(g_names),
        set(g_names),
        set(g_names) - head,
        {n for n in g_names if re.match(r"decoder\.(blocks\.[345]|inject\.3)\.", n)},  # the 64-256 px blocks + their injection
    ]
    for st, want in zip(stages, expected):
        tok.begin_stage(st)
        g, *d = tok.training_phases(st.lr)
        got = {n for n, p in tok.generator_parameters() if p.requires_grad}
        assert got == want and len(want) > 0, st.name
        assert all(p.requires_grad == any(p is q for q in d[0].params) for p in tok.disc.parameters())
        assert not any(p.requires_grad for p in tok.vfm.parameters())
        assert {id(p) for p in g.params} == {id(p) for n, p in tok.named_parameters() if n in want}
        assert g.betas == (0.0, 0.99) and g.ema and not d[0].ema
        patchgan = {id(p) for p in tok.disc["patchgan"].parameters()}
        assert bool(patchgan & {id(p) for p in d[0].params}) == (st.name == "patchgan-finetune")
    assert any(n.startswith("decoder.blocks.5.torgb") for n in expected[3])
    assert not any(n.startswith(("decoder.blocks.2", "decoder.mapping", "post_quant")) for n in expected[3])


def test_paper_ema_is_a_half_life_of_160k_images(paper):
    _, cfg, _ = paper
    tc = cfg.tokenizer.train
    beta = ema_beta(tc.batch_size, tc.ema_halflife_images)
    assert math.isclose(beta, 0.99778, abs_tol=1e-5)
    assert math.isclose(beta ** (160_000 / 512), 0.5, rel_tol=1e-9)  # the weight of an update halves every 160k images


# ---------------------------------------------------------------------------------------------
# Stages on a real (tiny) model


def test_stage_gradients_reach_only_the_trainable_groups(host):
    tok = tiny_tokenizer(host)
    x = shapes(host)
    stages = tok.training_stages(10**6, 1e-3)
    assert [s.name for s in stages] == ["strong-alignment", "weak-alignment", "ssim-finetune", "patchgan-finetune"]
    for st in stages:
        tok.begin_stage(st)
        phases = tok.training_phases(st.lr)
        assert all(ph.params for ph in phases)
        for ph in phases:
            tok.zero_grad(set_to_none=True)
            loss, logs = tok.phase_loss(ph.name, x, None, 0)
            assert math.isfinite(float(loss.detach())), (st.name, ph.name, logs)
            loss.backward()
            mine = {id(p) for p in ph.params}
            for n, p in tok.named_parameters():  # the generator phase also reaches the discriminator (its own phase clears that)
                if p.grad is not None and p.grad.abs().sum() > 0 and not (ph.name == "g" and n.startswith("disc.")):
                    assert id(p) in mine, (st.name, ph.name, n)
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ph.params)
        assert all(p.grad is None for p in tok.vfm.parameters())


def test_recipe_is_capped_by_train_images_and_validated(host):
    tok = tiny_tokenizer(host)
    stages = tok.training_stages(600, 1e-3)  # smoke recipe: 512 + 256 + 256 + 256
    assert [(s.name, s.images) for s in stages] == [("strong-alignment", 512), ("weak-alignment", 88)]
    assert stages[1].settings["vf"] == 1.0 and stages[0].settings["multiscale_images"] == 256
    bad = tiny_tokenizer(host, {"component_args": {"vfm-vae": {"stages": [{"name": "a", "images": 8, "train": ["decoder-hi"]}]}}})
    with pytest.raises(UserError, match="unknown trainable group 'decoder-hi'"):
        bad.training_stages(8, 1e-3)
    frozen_head = tiny_tokenizer(host, {"component_args": {"vfm-vae": {"stages": [{"name": "a", "images": 8, "train": ["synthesis"], "vf": 1.0}]}}})
    with pytest.raises(UserError, match="adaptive VF weight"):
        frozen_head.begin_stage(frozen_head.training_stages(8, 1e-3)[0])


def test_plain_decoders_train_as_a_whole_in_the_high_resolution_stage(host):
    tok = tiny_tokenizer(host, decoder="conv-decoder")
    st = tok.training_stages(10**6, 1e-3)[3]
    tok.begin_stage(st)
    got = {n for n, p in tok.generator_parameters() if p.requires_grad}
    assert got == {n for n, _ in tok.decoder.named_parameters(prefix="decoder")}


# ---------------------------------------------------------------------------------------------
# Equivariance


def ideal_decoder(z: torch.Tensor, f: int = 4) -> torch.Tensor:
    """A decoder that commutes with rotations: each latent cell becomes an f x f block of its value."""
    return z[:, :3].repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


def test_rotating_the_latent_rotates_the_decoded_image():
    z = torch.randn(2, 4, 6, 6)
    x = ideal_decoder(z)
    for k in range(4):
        zt = transform_latent(z, 1.0, k)
        assert torch.equal(ideal_decoder(zt), transform_image(x, tuple(x.shape[-2:]), k))
    assert torch.equal(transform_latent(z, 1.0, 1)[0, 0], torch.rot90(z[0, 0], 1))


def test_rescaling_the_latent_rescales_the_decoded_image():
    # A smooth latent and a bilinear "ideal decoder": resizing before or after decoding agrees.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    z = torch.stack([torch.sin(yy) * xx, yy + 0.5 * xx, torch.cos(xx)])[None]
    decode = lambda t: F.interpolate(t, scale_factor=4.0, mode="bilinear", align_corners=False)  # noqa: E731
    x = decode(z)
    for s, k in ((0.5, 1), (0.75, 3), (0.25, 2)):
        zt = transform_latent(z, s, k)
        target = transform_image(x, (round(64 * s), round(64 * s)), k)
        assert zt.shape[-1] == round(16 * s) and decode(zt).shape == target.shape
        assert (decode(zt) - target).abs()[..., 4:-4, 4:-4].max() < 0.05  # away from the border


def test_equivariance_draws_and_image_space_branch(host):
    torch.manual_seed(0)
    tok = tiny_tokenizer(host)
    draws = [sample_equivariance(tok.args) for _ in range(400)]
    latent = [d for d in draws if d.latent_scale != 1.0 or d.rotation]
    image = [d for d in draws if d.image_scale != 1.0]
    assert {d.latent_scale for d in latent} <= {0.5, 1.0} and {d.image_scale for d in image} == {0.5}
    assert 0.3 < len(latent) / 400 < 0.5 and 0.05 < len(image) / 400 < 0.2
    x = shapes(host, 2)
    with torch.no_grad():
        full = tok._posterior(tok._vfm_tokens(x)).mean
        half = tok._posterior(tok._vfm_tokens(x, 0.5)).mean  # downscaled before the VFM
    assert full.shape[-1] == 2 and half.shape[-1] == 1


# ---------------------------------------------------------------------------------------------
# Losses inside the tokenizer


def test_adaptive_vf_weight_is_taken_at_the_last_encoder_head_weight(host):
    over = {"component_args": {"vfm-vae": {"stages": [
        {"name": "a", "images": 8, "lpips": 0.0, "gan": 0.0, "multiscale_l1": 0.0, "equivariance": False, "vf": 3.0}]}}}
    tok = tiny_tokenizer(host, over)
    tok.begin_stage(tok.training_stages(8, 1e-3)[0])
    assert [n for n, _ in tok.fuse.named_parameters()][-2:] == ["mlp.w2.weight", "mlp.w2.bias"]  # the head's last layer
    x = shapes(host, 4)
    torch.manual_seed(3)
    _, logs = tok.phase_loss("g", x, None, 0)
    torch.manual_seed(3)  # replay: same posterior sample
    out = tok._vfm_tokens(x)
    post = tok._posterior(out)
    z = post.sample()
    vf, _ = vf_loss(tok.vf_proj(z), pool_tokens(out.layers[-1], out.grid, (2, 2)))
    rec = (tok.decode(z) - to_float(x)).abs().mean()
    w = tok.fuse.mlp.w2.weight
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_vf = torch.autograd.grad(vf, w)[0]
    assert math.isclose(logs["vf_weight"], 3.0 * float(g_rec.norm() / (g_vf.norm() + 1e-4)), rel_tol=1e-4)
    assert math.isclose(logs["vf"], float(vf.detach()), rel_tol=1e-5)
    assert math.isclose(logs["kl"], float(post.kl().mean().detach()), rel_tol=1e-5)


def test_multiscale_l1_only_inside_its_window(host):
    over = {"component_args": {"vfm-vae": {"stages": [
        {"name": "a", "images": 64, "lpips": 0.0, "gan": 0.0, "vf": 0.0, "equivariance": False, "multiscale_images": 16}]}}}
    tok = tiny_tokenizer(host, over)
    tok.begin_stage(tok.training_stages(64, 1e-3)[0])
    x = shapes(host, 4)
    assert "ms_l1" in tok.phase_loss("g", x, None, 8)[1]
    assert "ms_l1" not in tok.phase_loss("g", x, None, 16)[1]


# ---------------------------------------------------------------------------------------------
# Safe-loss guard


class ListData:
    def __init__(self, x):
        self.x = x

    def __call__(self, idx):
        return self.x[idx], torch.zeros(len(idx), dtype=torch.long)


def plant(tok, step_to_value):
    """Wrap the decoder so that its output on call n is multiplied by ``step_to_value[n]``."""
    calls = {"n": 0}
    forward = tok.decoder.forward_multiscale

    def planted(h):
        img, lower = forward(h)
        factor = step_to_value.get(calls["n"], 1.0)
        calls["n"] += 1
        return img * factor, lower

    tok.decoder.forward_multiscale = planted


def test_safe_loss_guard_skips_a_planted_nan_step_and_a_jump(host, tmp_path):
    over = {"component_args": {"vfm-vae": {"stages": [
        {"name": "a", "images": 20, "lpips": 0.0, "gan": 0.0, "vf": 0.0, "equivariance": False}]}}}
    tok = tiny_tokenizer(host, over)
    st = tok.training_stages(20, 1e-3)[0]
    tok.begin_stage(st)
    plant(tok, {1: float("nan"), 3: 1e4})  # step 1: NaN; step 3: a >10x jump of the L1 term
    before = {n: p.detach().clone() for n, p in tok.named_parameters()}
    res = train_loop(tok, tok.training_phases(st.lr), ListData(shapes(host, 8)), 8, total_images=20, batch_size=4,
                     ckpt_path=tmp_path / "ck.pt", seed=0)
    assert res.steps == 5 and res.skipped_steps == 2 and tok._g_guard.skipped == 2
    assert all(torch.isfinite(p).all() for p in tok.parameters())
    assert any(not torch.equal(before[n], p) for n, p in tok.named_parameters())  # the other steps trained


# ---------------------------------------------------------------------------------------------
# Released checkpoint layout


def released_name(name: str, exponents: list[int]) -> str | None:
    """This module's parameter name -> the authors' Generator name (written independently of the
    plugin's forward table, from the authors' module tree)."""
    head = {"norm_attn": "norm1", "norm_skip": "norm3", "norm_mlp": "norm2", "skip": "proj"}
    m = re.match(r"(compress\.(\d+)|fuse|post_quant)\.([a-z_]+)\.(.*)", name)
    if m:
        base = {"fuse": "ldm_adapter.final_quant", "post_quant": "ldm_adapter.post_quant"}.get(m[1], f"ldm_adapter.patch_quants.{m[2]}.0")
        return f"{base}.blocks.0.{head.get(m[3], m[3])}.{m[4]}"
    if name == "vf_proj.weight":
        return "ldm_adapter.linear_proj.weight"
    m = re.match(r"decoder\.mapping\.(\d+)\.(.*)", name)
    if m:
        return f"mapping.mlp.fc{m[1]}.{m[2]}"
    m = re.match(r"decoder\.inject\.(\d+)\.(\w+)\.(.*)", name)
    if m:
        i, part, leaf = int(m[1]), m[2], m[3]
        first, second = (1, 2) if exponents[i] < 0 else (0, 1) if exponents[i] == 0 else (0, 2)
        where = {"depthwise": f"{first}.0", "pointwise": f"{first}.1", "norm1": f"{first}.2", "proj": f"{second}.0", "norm2": f"{second}.1"}
        return f"synthesis.z_convs.{i}.{where[part]}.{leaf}"
    m = re.match(r"decoder\.blocks\.(\d+)\.(.*)", name)
    if m:
        b, rest = m[1], m[2]
        rest = re.sub(r"^upsample\.", "seperate_upsample_conv.", rest)
        rest = re.sub(r"^skip_up\.", "last_upsample_conv.", rest)
        rest = re.sub(r"^layers\.(\d+)\.", lambda k: "conv0." if k[1] == "0" else f"convs1.{int(k[1]) - 1}.", rest)
        if rest.startswith(("conv0.", "convs1.")):
            rest = rest.replace(".affine.", ".affine_pw1.").replace("pw1_weight", "pwconv1.weight").replace("pw1_bias", "pwconv1.bias")
        rest = re.sub(r"^attn\.(\d+)\.ff\.norm\.", r"self_attns.\1.ff.0.", rest)
        rest = re.sub(r"^attn\.(\d+)\.ff\.fc1\.", r"self_attns.\1.ff.1.", rest)
        rest = re.sub(r"^attn\.(\d+)\.ff\.fc2\.", r"self_attns.\1.ff.3.", rest)
        rest = re.sub(r"^attn\.(\d+)\.attn\.", r"self_attns.\1.attn.", rest)
        return f"synthesis.blocks.{b}.{rest}"
    return None


def test_released_checkpoint_layout_loads_through_the_key_map(host, tmp_path):
    from vfmbench.checkpoint import load_torch
    from vfmbench.context import load_tokenizer_state

    tok = tiny_tokenizer(host)
    # weights only: not the frozen VFM, the discriminators, latent statistics or the training guards' state
    mine = {k: v for k, v in tok.state_dict().items() if not k.startswith(("vfm.", "disc.", "latent_")) and k != "_extra_state"}
    torch.manual_seed(1)
    released = {}
    for k, v in mine.items():
        name = released_name(k, tok.decoder.exponents)
        assert name is not None, k
        released[name] = torch.randn_like(v) if v.is_floating_point() else v
    # what the authors' state dict also holds and the plugin does not need
    released["vfm_encoder.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(3)
    released["mapping.x_avg"] = torch.zeros(16)
    released["ldm_adapter.final_quant.blocks.0.attn.zero_k_bias"] = torch.zeros(3)
    released["synthesis.blocks.1.seperate_upsample_conv.blur_weight"] = torch.zeros(2)
    torch.save({"G_ema": released, "G": {}, "D": {}}, tmp_path / "released.pth")
    fresh = tiny_tokenizer(host)
    load_tokenizer_state(fresh, load_torch(tmp_path / "released.pth"))  # as --set tokenizer.weights=PATH does
    state = fresh.state_dict()
    for k in mine:
        assert torch.equal(state[k], released[released_name(k, tok.decoder.exponents)]), k
    released["synthesis.blocks.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="no mapping rule knows"):
        fresh.load_state_dict(released, strict=False)
    assert any(target is None for _, target in RELEASED_KEY_MAP)


def test_own_checkpoints_still_load(host):
    tok = tiny_tokenizer(host)
    other = tiny_tokenizer(host)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    tok.load_state_dict(other.weights_state(), strict=False)
    assert torch.equal(tok.fuse.mlp.w2.weight, other.fuse.mlp.w2.weight)


def test_discriminator_phase_reuses_each_micro_batch_reconstruction(host):
    """With gradient accumulation the generator phase runs on every micro-batch before the
    discriminator phase: each micro-batch's reconstruction is reused, none is decoded again."""
    tok = tiny_tokenizer(host)
    stages = tok.training_stages(600, 1e-3)
    tok.begin_stage(stages[-1])  # patchgan-finetune: a discriminator phase
    images = shapes(host, 8)
    micro = [images[:4].clone(), images[4:].clone()]
    for x in micro:
        tok.phase_loss("g", x, torch.zeros(4, dtype=torch.long), 0)
    calls = []
    decode = tok.decode
    tok.decode = lambda z: calls.append(1) or decode(z)
    for x in micro:
        loss, _ = tok.phase_loss("d", x, torch.zeros(4, dtype=torch.long), 0)
        assert torch.isfinite(loss)
    assert calls == []
    tok.phase_loss("d", micro[0], torch.zeros(4, dtype=torch.long), 0)  # used up: decoded afresh
    assert calls == [1]
    tok.phase_loss("g", micro[0], torch.zeros(4, dtype=torch.long), 8)  # a new step forgets the old one
    assert len(tok._fakes) == 1 and next(iter(tok._fakes))[0] == 8


def test_image_space_equivariance_is_two_resizes(host):
    """Downscale by s (antialiased, scale_factor semantics), then the VFM's x2: two resizes as the
    reference encoder, checked against torch's resizes written out and PIL's antialiased downscale."""
    import numpy as np
    from PIL import Image

    from vfmbench.config import VfmConfig
    from vfmbench.vfm import build_vfm

    vfm = build_vfm(host.vfms.get("siglip2-l16-512"), VfmConfig(name="siglip2-l16-512", size="tiny", pretrained=False, input_scale=2.0))
    assert vfm.input_scale == 2.0 and vfm.spec.interpolation == "bilinear"
    x = shapes(host, 2, res=64)
    for s in (0.5, 0.75, 0.25):
        small = F.interpolate(x.float() / 255, scale_factor=s, mode="bilinear", align_corners=False, antialias=True)
        big = F.interpolate(small, scale_factor=2.0, mode="bilinear", align_corners=False)
        want = (big - 0.5) / 0.5
        got = vfm.preprocess(x, pre_scale=s)
        assert got.shape[-1] == int(64 * s) * 2 and torch.allclose(got, want, atol=1e-6), s
        one = vfm.preprocess(x, scale=2.0 * s)  # the single resize this replaces
        assert one.shape == got.shape and (one - got).abs().max() > 1e-2
    # the antialiased downscale is PIL's bilinear (triangle) filter, up to uint8 rounding
    s = 0.5
    pil = np.stack([np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).resize((32, 32), Image.BILINEAR)) for im in x])
    small = F.interpolate(x.float() / 255, scale_factor=s, mode="bilinear", align_corners=False, antialias=True)
    assert np.abs(small.permute(0, 2, 3, 1).numpy() * 255 - pil).max() <= 1.0
    # the tokenizer's image branch feeds exactly this input to the VFM
    tok = tiny_tokenizer(host)
    x32 = shapes(host, 2)
    want_in = tok.vfm.preprocess(x32, pre_scale=0.5)
    with torch.no_grad():
        hidden, final = tok.vfm.adapter.hidden_states(tok.vfm.model, want_in, {0}, final=True)
        out = tok._vfm_tokens(x32, 0.5)
    assert torch.allclose(out.layers[-1], final.float(), atol=1e-6)
