"""sit with REPA and REG: the loss terms against hand computations, joint sampling of the class
token with guidance on both, and the alignment targets (cache with prefix tokens, flips, resampling)."""
from __future__ import annotations

import pytest
import torch

from vfmbench.alignment import AlignmentRequest, CachedTargets, alignment_targets, build_alignment_vfm, resample_tokens
from vfmbench.cli import resolve_run_config
from vfmbench.errors import UserError
from vfmbench.feature_cache import CacheStats, cache_key, cached_tokens_and_prefix
from vfmbench.sampling import sample
from vfmbench_plugins.diffusion import sit
from vfmbench_plugins.diffusion.sit import SiTArgs, factory

from helpers import perturb

D = 6  # alignment width of the toy tests


pytestmark = pytest.mark.usefixtures("one_thread")


def model(align="reg", latent_shape=(4, 4, 4), **kw) -> sit.SiT:
    torch.manual_seed(0)
    args = SiTArgs(**{"size": "tiny", "width": 32, "depth": 3, "heads": 2, "align": align, "align_dim": D, "align_depth": 2,
                      "projector_dim": 16, **kw})
    m = factory(args, latent_shape, 10)
    perturb(m)
    return m


def capture(module: torch.nn.Module, store: dict, key: str, inputs: bool = False):
    if inputs:
        return module.register_forward_pre_hook(lambda mod, args: store.__setitem__(key, args[0]))
    return module.register_forward_hook(lambda mod, args, out: store.__setitem__(key, out))


def neg_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-mean over tokens of cos(a_n, b_n), per sample."""
    return -((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean(1)


def batch(n=8):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(n, 4, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.randn(n, 16, D, generator=g), torch.randn(n, D, generator=g))


def test_repa_loss_equals_hand_computation():
    m = model("repa", proj_coeff=0.7)
    x, y, tokens, _ = batch()
    torch.manual_seed(3)
    loss, logs = m.phase_loss("diffusion", x, y, 0, align_tokens=tokens)
    torch.manual_seed(3)
    t, eps, y_in = m.draw_training_noise(x, y, 0)
    seen = {}
    hook = capture(m.blocks[1], seen, "h")  # output of block align_depth = 2
    te = t.view(-1, 1, 1, 1)
    v = m((1 - te) * eps + te * x, t, y_in)
    hook.remove()
    denoise = ((v - (x - eps)) ** 2).mean(dim=(1, 2, 3)).mean()
    proj = neg_cos(m.projector(seen["h"]), tokens).mean()
    torch.testing.assert_close(loss, denoise + 0.7 * proj)
    assert logs["denoise"] == pytest.approx(denoise.item(), rel=1e-5) and logs["proj"] == pytest.approx(proj.item(), rel=1e-5, abs=1e-6)
    assert "cls" not in logs and m.joint_dim == 0
    lin = [mod for mod in m.projector if isinstance(mod, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(32, 16), (16, 16), (16, D)]
    loss.backward()  # the REPA term reaches the projector and the blocks up to align_depth
    assert m.projector[0].weight.grad.abs().sum() > 0 and m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="align_tokens"):
        m.phase_loss("diffusion", x, y, 0)


def test_reg_loss_equals_hand_computation():
    m = model("reg", proj_coeff=0.5, cls_coeff=0.03, label_dropout=0.25)
    x, y, tokens, cls = batch()
    torch.manual_seed(3)
    loss, logs = m.phase_loss("diffusion", x, y, 0, align_tokens=tokens, align_cls=cls)
    torch.manual_seed(3)
    t, eps, y_in = m.draw_training_noise(x, y, 0)
    cls_eps = torch.randn_like(cls)
    cls_t = (1 - t[:, None]) * cls_eps + t[:, None] * cls  # the class token on the same path, same t
    seen = {}
    hooks = [capture(m.blocks[1], seen, "h"), capture(m.cls_in, seen, "cls_in", inputs=True)]
    te = t.view(-1, 1, 1, 1)
    v, v_cls = m((1 - te) * eps + te * x, t, y_in, joint=cls_t)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["cls_in"], cls_t)
    assert seen["h"].shape == (8, 17, 32)  # class token + 16 patch tokens
    denoise = ((v - (x - eps)) ** 2).mean(dim=(1, 2, 3)).mean()
    proj = neg_cos(m.projector(seen["h"]), torch.cat([cls[:, None], tokens], dim=1)).mean()
    cls_loss = ((v_cls - (cls - cls_eps)) ** 2).mean(1).mean()
    torch.testing.assert_close(loss, denoise + 0.5 * proj + 0.03 * cls_loss)
    for k, ref in (("denoise", denoise), ("proj", proj), ("cls", cls_loss)):
        assert logs[k] == pytest.approx(ref.item(), rel=1e-5, abs=1e-6), k
    with pytest.raises(ValueError, match="joint"):
        m(x, t, y)  # REG's model needs the noisy class token
    assert m.alignment_request() == {"vfm": "dinov2-b14", "layer": -1, "prefix": True, "weights": "", "dim": D, "grid": [4, 4], "features": "cache"}


def test_reg_model_is_the_reference_kind():
    """REG's layers (the golden test checks the numbers): class token Linear then affine LayerNorm, timm's
    LayerNorm QK-norm with bias, the time embedding fed the noise level 1 - t, velocities noise - data inside."""
    m = model("reg")
    assert isinstance(m.cls_norm, torch.nn.LayerNorm) and m.cls_norm.weight is not None and m.cls_norm.eps == 1e-6
    qn = m.blocks[0].attn.q_norm
    assert isinstance(qn, torch.nn.LayerNorm) and qn.bias is not None and qn.eps == 1e-5
    assert m.blocks[0].norm1.weight is None  # SiT's block norms have no affine parameters
    seen = {}
    hook = m.t_embed.register_forward_pre_hook(lambda mod, args: seen.__setitem__("t", args[0]))
    x, y, _, cls = batch(2)
    t = torch.tensor([0.25, 0.9])
    v, v_cls = m(x, t, y[:2], joint=cls[:2])
    hook.remove()
    torch.testing.assert_close(seen["t"], 1 - t)
    ref_v, ref_cls, _ = m.reference(x, 1 - t, y[:2], cls[:2])
    torch.testing.assert_close(v, -ref_v)
    torch.testing.assert_close(v_cls, -ref_cls)
    assert m.train_hflip and not model("reg", hflip=False).train_hflip


def test_untrained_reg_model_predicts_zero_velocities():
    torch.manual_seed(0)
    m = factory(SiTArgs(size="tiny", width=32, depth=2, heads=2, align="reg", align_dim=D, align_depth=1), (4, 4, 4), 10)
    v, v_cls = m(torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 10]), joint=torch.randn(2, D))
    assert torch.equal(v, torch.zeros_like(v)) and torch.equal(v_cls, torch.zeros_like(v_cls))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_label_dropout_rate(rate):
    m = model("none", label_dropout=rate)
    n = 40000
    y = torch.randint(0, 10, (n,))
    _, _, y_in = m.draw_training_noise(torch.zeros(n, 1, 1, 1), y, 0, generator=torch.Generator().manual_seed(0))
    assert abs((y_in == 10).float().mean().item() - rate) <= 4 * (rate * (1 - rate) / n) ** 0.5
    assert torch.equal(y_in[y_in != 10], y[y_in != 10])


def test_joint_sampling_guides_latent_and_class_token():
    m = model("reg").eval()
    g = torch.Generator().manual_seed(2)
    noise, e0 = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, D, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    lat, joint = sample(m, noise, y, sampler="euler", steps=3, cfg_scale=2.0, cfg_interval=(0.3, 1.0), joint_noise=e0, return_joint=True)
    x, e = noise.clone(), e0.clone()
    grid = torch.linspace(0, 1, 4, dtype=torch.float64).tolist()
    with torch.no_grad():
        for t0, t1 in zip(grid[:-1], grid[1:]):
            tt = torch.full((4,), t0)
            vc, ec = m(x, tt, y, joint=e)
            if 0.3 <= t0 <= 1.0:
                vu, eu = m(x, tt, torch.full_like(y, 10), joint=e)
                vc, ec = vu + 2.0 * (vc - vu), eu + 2.0 * (ec - eu)
            x, e = x + (t1 - t0) * vc, e + (t1 - t0) * ec
    torch.testing.assert_close(lat, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joint, e, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(joint, e0)
    # without return_joint only the latents come back; the joint noise then comes from the generator
    torch.testing.assert_close(sample(m, noise, y, steps=3, cfg_scale=2.0, cfg_interval=(0.3, 1.0), joint_noise=e0), lat)
    a = sample(m, noise, y, sampler="euler-maruyama", steps=4, generator=torch.Generator().manual_seed(9))
    b = sample(m, noise, y, sampler="euler-maruyama", steps=4, generator=torch.Generator().manual_seed(9))
    assert a.shape == noise.shape and torch.equal(a, b)
    with pytest.raises(ValueError, match="joint_dim"):
        sample(model("none").eval(), noise, y, steps=2, return_joint=True)


def test_args_validation():
    with pytest.raises(UserError, match="align_depth"):
        model("repa", align_depth=5)
    with pytest.raises(UserError, match="align"):
        model("reps")
    with pytest.raises(UserError, match="align_features"):
        model("reg", align_features="disk")
    assert model("none").alignment_request() is None and not hasattr(model("none"), "projector")


# ---------------------------------------------------------------------------------------------
# Alignment targets


def test_resample_tokens():
    grid = torch.arange(16, dtype=torch.float32).view(1, 16, 1).repeat(2, 1, 3)  # value = row * 4 + col
    out = resample_tokens(grid, (4, 4), (2, 2))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))  # 2x2 block means
    assert resample_tokens(grid, (4, 4), (4, 4)) is grid
    assert resample_tokens(grid, (4, 4), (3, 3)).shape == (2, 9, 3)
    assert resample_tokens(grid.half(), (4, 4), (2, 2)).dtype == torch.float16


def test_cached_targets_pick_the_flipped_features():
    tok, tok_f = torch.zeros(4, 2, 3), torch.ones(4, 2, 3)
    cls, cls_f = torch.zeros(4, 3), torch.ones(4, 3)
    out = CachedTargets(tok, tok_f, cls, cls_f)(torch.tensor([3, 0, 1]), torch.tensor([True, False, True]), torch.device("cpu"))
    assert out["align_tokens"][:, 0, 0].tolist() == [1.0, 0.0, 1.0] and out["align_cls"][:, 0].tolist() == [1.0, 0.0, 1.0]
    assert out["align_tokens"].dtype == torch.float32


@pytest.fixture
def smoke_cfg(host):
    return resolve_run_config(host, "smoke", None, [], {k: None for k in ("tokenizer", "vfm", "decoder", "diffusion", "dataset", "out")})


IMAGES = torch.randint(0, 256, (6, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
KEY = {"dataset": "random", "split": "train", "resolution": 64, "images": 6}


def targets(host, cfg, tmp_path, stats=None, **req):
    request = {"vfm": "dinov2-b14", "layer": -1, "prefix": True, "dim": 64, "grid": [4, 4], **req}
    return alignment_targets(
        host, cfg, request, device=torch.device("cpu"), cache_dir=tmp_path, key_fields=KEY, stats=stats,
        batches=lambda flip: (IMAGES[i : i + 4].flip(-1) if flip else IMAGES[i : i + 4] for i in range(0, 6, 4)),
        images=lambda idx: IMAGES[idx],
    )


def test_alignment_targets_cache_flips_and_online_mode(host, smoke_cfg, tmp_path):
    stats = CacheStats()
    first = targets(host, smoke_cfg, tmp_path, stats)
    assert (stats.misses, stats.hits, stats.vfm_images) == (2, 0, 12)  # image and flip entries
    second = targets(host, smoke_cfg, tmp_path, stats)
    assert (stats.misses, stats.hits) == (2, 2)
    idx, flip = torch.tensor([5, 0, 2]), torch.tensor([True, False, False])
    a, b = first(idx, flip, torch.device("cpu")), second(idx, flip, torch.device("cpu"))
    assert a["align_tokens"].shape == (3, 16, 64) and a["align_cls"].shape == (3, 64)
    assert torch.equal(a["align_tokens"], b["align_tokens"]) and torch.equal(a["align_cls"], b["align_cls"])
    # against the VFM itself: tiny DINOv2 at 64 px is an 8x8 grid, block-averaged to the model's 4x4
    vfm = build_alignment_vfm(host, smoke_cfg, AlignmentRequest.parse({"vfm": "dinov2-b14", "grid": [4, 4]}), torch.device("cpu"), tmp_path)
    imgs = torch.stack([IMAGES[5].flip(-1), IMAGES[0], IMAGES[2]])
    direct = vfm(imgs, [-1])
    assert direct.grid == (8, 8)
    torch.testing.assert_close(a["align_tokens"], resample_tokens(direct.layers[-1], (8, 8), (4, 4)), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(a["align_cls"], direct.prefix[-1][:, 0], atol=2e-2, rtol=1e-2)
    online = targets(host, smoke_cfg, tmp_path, features="online")(idx, flip, torch.device("cpu"))
    torch.testing.assert_close(online["align_tokens"], a["align_tokens"], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(online["align_cls"], a["align_cls"], atol=2e-2, rtol=1e-2)


def test_alignment_vfm_must_match_the_model(host, smoke_cfg, tmp_path):
    with pytest.raises(UserError, match="align_dim=64"):
        targets(host, smoke_cfg, tmp_path, dim=768)
    with pytest.raises(UserError, match="class token"):
        targets(host, smoke_cfg, tmp_path, vfm="siglip2-b16-256")
    with pytest.raises(ValueError, match="unknown keys"):
        AlignmentRequest.parse({"vfm": "dinov2-b14", "grid": [4, 4], "layers": [1]})


def test_feature_cache_stores_prefix_tokens(host, smoke_cfg, tmp_path):
    vfm = build_alignment_vfm(host, smoke_cfg, AlignmentRequest.parse({"vfm": "dinov2-b14", "grid": [4, 4]}), torch.device("cpu"), tmp_path)
    src = lambda: (IMAGES[i : i + 4] for i in range(0, 6, 4))  # noqa: E731
    stats = CacheStats()
    tokens, prefix = cached_tokens_and_prefix(vfm, [0, -1], KEY, src, tmp_path, stats=stats)
    tokens2, prefix2 = cached_tokens_and_prefix(vfm, [-1, 0], KEY, src, tmp_path, stats=stats)
    assert (stats.misses, stats.hits) == (1, 1)
    direct = vfm(IMAGES, [0, -1])
    for i in (0, -1):
        assert prefix[i].shape == (6, 1, 64) and torch.equal(prefix2[i], prefix[i]) and torch.equal(tokens2[i], tokens[i])
        torch.testing.assert_close(prefix[i], direct.prefix[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(tokens[i], direct.layers[i], atol=1e-5, rtol=0)
    assert cache_key(vfm, [0, -1], KEY, prefix=True) != cache_key(vfm, [0, -1], KEY)
