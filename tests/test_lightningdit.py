"""lightningdit: shapes, RoPE, the flow-matching + cosine loss, time sampling, label dropout,
XL parameter counts (meta device), and a small class-conditional fit on CPU."""
from __future__ import annotations

import pytest
import torch

from vfmbench.config import validate_args
from vfmbench.errors import UserError
from vfmbench.interfaces import DiffusionModel
from vfmbench.sampling import shift_time
from vfmbench.specs import DiffusionSpec
from vfmbench_plugins.diffusion import lightningdit
from vfmbench_plugins.diffusion.dit_blocks import rope_2d
from vfmbench_plugins.diffusion.flow_dit import apply_rope
from vfmbench_plugins.diffusion.lightningdit import LightningDiTArgs, factory

from helpers import check_fits_class_conditional_mixture, check_label_dropout_rate, perturb, replay_training_step

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(size="tiny", width=32, depth=2, heads=2)


def tiny(latent_shape=(4, 8, 8), num_classes=10, **kw) -> lightningdit.LightningDiT:
    torch.manual_seed(0)
    return factory(LightningDiTArgs(**{**TINY, **kw}), latent_shape, num_classes)


@pytest.mark.parametrize("shape,kw", [((4, 8, 8), dict(patch_size=1)), ((4, 8, 8), dict(patch_size=2)),
                                      ((3, 4, 6), dict(patch_size=2, pos_embed="none", rope=False, swiglu=False, rmsnorm=False))])
def test_forward_shapes_and_zero_init(shape, kw):
    m = tiny(shape, **kw)
    assert isinstance(m, DiffusionModel) and m.num_classes == 10
    x = torch.randn(5, *shape)
    y = torch.tensor([0, 3, 9, 10, 10])
    out = m(x, torch.rand(5), y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: v = 0 untrained
    perturb(m)
    out = m(x, torch.rand(5), y)
    assert out.abs().mean() > 0
    assert m(x, torch.tensor(0.3), y).shape == x.shape  # scalar t broadcasts
    # no leakage across the batch; the class and the time change the output
    t = torch.full((5,), 0.5)
    base = m(x, t, y)
    torch.testing.assert_close(m(x[:1], t[:1], y[:1]), base[:1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, m(x, t, torch.tensor([1, 1, 1, 1, 1])))
    assert not torch.allclose(base, m(x, torch.full((5,), 0.9), y))


def test_blocks_are_the_lightningdit_kind():
    m = tiny(width=48, heads=4)
    blk = m.blocks[0]
    assert isinstance(blk.norm1, torch.nn.RMSNorm) and blk.norm1.weight.shape == (48,)  # learnable, as LightningDiT's RMSNorm
    assert isinstance(m.final.norm, torch.nn.RMSNorm) and m.final.norm.weight.requires_grad
    assert isinstance(blk.attn.q_norm, torch.nn.RMSNorm) and blk.attn.q_norm.eps == 1e-6
    assert blk.mlp.fc1.out_features == 2 * 128 and blk.mlp.fc2.in_features == 128  # SwiGLU hidden int(2/3 * 4 * 48)
    assert m.use_rope and m.rope_cos.shape == (64, 12) and m.pos.shape == (1, 64, 48)


def test_rope_depends_on_relative_position_only():
    gh, gw, hd = 3, 4, 8
    cos, sin = rope_2d(hd, gh, gw)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    n = gh * gw
    qr = apply_rope(q.expand(1, 1, n, hd), cos, sin)[0, 0]
    kr = apply_rope(k.expand(1, 1, n, hd), cos, sin)[0, 0]
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(n))  # a rotation
    dots = qr @ kr.T  # [n, n]
    pos = [(i // gw, i % gw) for i in range(n)]
    by_offset: dict[tuple[int, int], list[float]] = {}
    for i, (ri, ci) in enumerate(pos):
        for j, (rj, cj) in enumerate(pos):
            by_offset.setdefault((ri - rj, ci - cj), []).append(float(dots[i, j]))
    for vals in by_offset.values():
        assert max(vals) - min(vals) < 1e-4
    assert len({round(v[0], 3) for v in by_offset.values()}) > 10  # and it does depend on the offset
    # prefix tokens (e.g. a class token) are left untouched
    x = torch.randn(2, 1, n + 1, hd, generator=g)
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[:, :, 0], x[:, :, 0]) and torch.allclose(out[:, :, 1:], apply_rope(x[:, :, 1:], cos, sin))


# ---------------------------------------------------------------------------------------------
# The fused kernels against the straightforward formulas they replace (issue 9)


def textbook_rope(x: torch.Tensor, gh: int, gw: int, theta: float = 10000.0) -> torch.Tensor:
    """2-D RoPE as complex multiplication in LightningDiT's layout (VisionRotaryEmbeddingFast): the first
    hd/2 channels belong to the row, the last hd/2 to the column; in each, the adjacent pair
    (x_2f, x_2f+1) is x_2f + i x_2f+1, multiplied by exp(i pos theta^(-f / q)); x [..., T, hd] with
    T = gh * gw row-major tokens."""
    hd = x.shape[-1]
    q = hd // 4
    freqs = theta ** (-torch.arange(q, dtype=torch.float64) / q)
    rows = torch.arange(gh * gw, dtype=torch.float64) // gw
    cols = torch.arange(gh * gw, dtype=torch.float64) % gw
    out = []
    for axis, pos in enumerate((rows, cols)):
        half = x[..., axis * 2 * q:(axis + 1) * 2 * q].double()
        z = torch.complex(half[..., 0::2], half[..., 1::2]) * torch.polar(torch.ones((), dtype=torch.float64), pos[:, None] * freqs[None])
        out.append(torch.stack([z.real, z.imag], dim=-1).flatten(-2))
    return torch.cat(out, dim=-1).to(x.dtype)


def reference_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_rope_equals_complex_multiplication_and_the_previous_formula():
    from vfmbench_plugins.diffusion.flow_dit import rotate_pairs

    gh, gw, hd = 3, 4, 16
    cos, sin = rope_2d(hd, gh, gw)
    x = torch.randn(2, 3, gh * gw, hd, generator=torch.Generator().manual_seed(0))
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out, textbook_rope(x, gh, gw), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, x * cos + rotate_pairs(x) * sin, atol=1e-6, rtol=1e-6)  # the pre-issue-9 formula


@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("qk_norm,rope", [(True, True), (True, False), (False, True), (False, False)])
def test_qk_norm_rope_matches_the_reference_values_and_gradients(prefix, qk_norm, rope):
    from vfmbench_plugins.diffusion.flow_dit import qk_norm_rope

    g = torch.Generator().manual_seed(1)
    gh, gw, hd, heads, b = 2, 4, 8, 3, 2
    t = prefix + gh * gw
    qkv = torch.randn(b, t, 3, heads, hd, generator=g, dtype=torch.float64).requires_grad_()
    w = (1 + 0.3 * torch.randn(2, hd, generator=g, dtype=torch.float64)).requires_grad_()
    tables = tuple(v.double() for v in rope_2d(hd, gh, gw)) if rope else None
    out = qk_norm_rope(qkv[:, :, :2], w if qk_norm else None, tables)
    ref = []
    for i in range(2):  # q then k, as [B, H, T, hd]
        v = qkv[:, :, i].transpose(1, 2)
        if qk_norm:
            v = reference_rms(v) * w[i]
        if rope:
            v = torch.cat([v[..., :prefix, :], textbook_rope(v[..., prefix:, :], gh, gw)], dim=-2)
        ref.append(v.transpose(1, 2))
    ref = torch.stack(ref, dim=2)
    tol = dict(atol=1e-6, rtol=1e-6) if rope else dict(atol=1e-12, rtol=1e-12)  # rope_2d's tables are float32
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, **tol)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, [qkv, w] if qk_norm else [qkv], grad)
    want = torch.autograd.grad(ref, [qkv, w] if qk_norm else [qkv], grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol)


def test_fused_norm_modulate_gate_and_swiglu_match_the_formulas():
    from vfmbench_plugins.diffusion.dit_blocks import silu_gate
    from vfmbench_plugins.diffusion.flow_dit import RMSNorm, gated, modulate

    g = torch.Generator().manual_seed(2)
    x, h = (torch.randn(3, 5, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    shift, scale, gate = (torch.randn(3, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    norm = RMSNorm(8, eps=1e-6, elementwise_affine=False)
    pairs = [
        (lambda: norm(x), lambda: reference_rms(x)),
        (lambda: modulate(x, shift, scale), lambda: x * (1 + scale[:, None]) + shift[:, None]),
        (lambda: gated(x, gate, h), lambda: x + gate[:, None] * h),
        (lambda: silu_gate(torch.cat([x, h], -1)), lambda: torch.nn.functional.silu(x) * h),
    ]
    inputs = [x, h, shift, scale, gate]
    for fused, ref in pairs:
        out, want = fused(), ref()
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
        grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(out, inputs, grad, allow_unused=True, materialize_grads=True)
        exp = torch.autograd.grad(want, inputs, grad, allow_unused=True, materialize_grads=True)
        for a, e in zip(got, exp):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
    w = torch.nn.RMSNorm(8, eps=1e-6)  # with a weight: the same as torch's module
    fast = RMSNorm(8, eps=1e-6)
    fast.load_state_dict({"weight": torch.rand(8, generator=g) + 0.5})
    w.load_state_dict(fast.state_dict())
    xf = torch.randn(4, 8, generator=g)
    torch.testing.assert_close(fast(xf), w(xf))


def test_attention_uses_fused_sdpa_and_equals_a_plain_softmax_reference(monkeypatch):
    import torch.nn.functional as F

    from vfmbench_plugins.diffusion import flow_dit
    from vfmbench_plugins.diffusion.flow_dit import Attention

    torch.manual_seed(3)
    width, heads, gh, gw, b = 32, 2, 2, 4, 2
    attn = Attention(width, heads, qk_norm=True).double()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    rope = tuple(v.double() for v in rope_2d(width // heads, gh, gw))
    x = torch.randn(b, gh * gw, width, dtype=torch.float64)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(flow_dit.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = attn(x, rope)
    assert calls == [1]  # one fused attention call, no per-token or per-head Python loop
    q, k, v = attn.qkv(x).view(b, -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q = textbook_rope(reference_rms(q) * attn.q_norm.weight, gh, gw)
    k = textbook_rope(reference_rms(k) * attn.k_norm.weight, gh, gw)
    a = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
    ref = attn.proj((a @ v).transpose(1, 2).reshape(b, -1, width))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)  # rope_2d's tables are float32


def test_loss_equals_manual_computation():
    m = tiny(label_dropout=0.3, cos_loss_weight=0.7)
    step = replay_training_step(m, lambda x, y: m.draw_training_noise(x, y, 0))
    x, y, loss, pred = step.x, step.y, step.loss, step.pred
    target = x - step.eps
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    cos = (pred * target).sum(1) / (pred.norm(dim=1) * target.norm(dim=1))  # over channels, per position
    cos_loss = (1 - cos).mean(dim=(1, 2))
    torch.testing.assert_close(loss, mse.mean() + 0.7 * cos_loss.mean())
    assert step.logs["mse"] == pytest.approx(mse.mean().item(), rel=1e-5) and step.logs["cos"] == pytest.approx(cos_loss.mean().item(), rel=1e-5)
    assert loss.requires_grad
    with pytest.raises(ValueError, match="diffusion"):
        m.phase_loss("generator", x, y, nimg=0)
    # cos_loss_weight=0 is the plain flow-matching loss
    m0 = tiny(cos_loss_weight=0.0)
    torch.manual_seed(7)
    loss0, _ = m0.phase_loss("diffusion", x, y, nimg=0)
    torch.manual_seed(7)
    t, eps, _ = m0.draw_training_noise(x, y, 0)
    torch.testing.assert_close(loss0, ((x - eps) ** 2).mean())  # untrained: v = 0


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5])
def test_label_dropout_rate(rate):
    m = tiny(label_dropout=rate)
    check_label_dropout_rate(lambda x, y, g: m.draw_training_noise(x, y, 0, generator=g)[2], rate)


def test_time_sampling_modes_and_schedule_switch():
    n = 40000
    z = torch.zeros(n, 1, 1, 1)
    y = torch.zeros(n, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    m = tiny(time_sampling="lognormal", lognormal_mean=0.5, lognormal_std=0.8, time_sampling_until_images=1000)
    t, eps, _ = m.draw_training_noise(z, y, 999, generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02 and abs(eps.std() - 1) < 0.02
    t, _, _ = m.draw_training_noise(z, y, 1000, generator=g)  # switched to uniform
    assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.003
    s = 0.3
    t, _, _ = tiny(time_sampling="shifted", time_shift=s).draw_training_noise(z, y, 0, generator=g)
    u = t / (s + (1 - s) * t)  # the inverse of LightningDiT's shift s t / (1 + (s - 1) t): uniform again
    torch.testing.assert_close(shift_time(u, s), t)
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    assert t.mean() < 0.4  # s < 1 favours the noise end (t = 0)


def test_args_and_phases():
    m = tiny(weight_decay=0.01, grad_clip=2.0, beta2=0.99)
    (ph,) = m.training_phases(3e-4)
    assert ph.name == "diffusion" and ph.lr == 3e-4 and ph.betas == (0.9, 0.99) and ph.weight_decay == 0.01 and ph.grad_clip == 2.0
    assert sum(p.numel() for p in ph.params) == sum(p.numel() for p in m.parameters())
    args = validate_args(LightningDiTArgs, {"size": "b", "time_sampling": "shifted", "time_shift": 0.5}, "diffusion.args")
    assert isinstance(args, LightningDiTArgs) and args.size == "b"
    with pytest.raises(UserError, match="patch_size"):
        factory(LightningDiTArgs(patch_size=2, **TINY), (4, 5, 5), 10)
    with pytest.raises(UserError, match="RoPE"):
        factory(LightningDiTArgs(size="tiny", width=24, heads=4), (4, 4, 4), 10)
    with pytest.raises(UserError, match="size"):
        factory(LightningDiTArgs(size="huge"), (4, 4, 4), 10)
    with pytest.raises(UserError, match="time_sampling"):
        factory(LightningDiTArgs(time_sampling="lognorm", **TINY), (4, 4, 4), 10)
    assert m.convergence_eval() is None
    assert tiny(eval_every_images=64, eval_steps=4).convergence_eval() == {"every_images": 64, "num_images": 0, "steps": 4, "cfg_scale": 1.0}


def test_registration():
    specs = []
    lightningdit.register_diffusion_models(register=specs.append)
    (spec,) = specs
    assert isinstance(spec, DiffusionSpec) and spec.name == "lightningdit" and spec.config is LightningDiTArgs


# ---------------------------------------------------------------------------------------------
# Parameter counts of the XL configurations (built on the meta device, as --dry-run does)


def dit_xl_params(width=1152, depth=28, heads=16, channels=32, patch=1, classes=1000, lightningdit=True) -> int:
    """DiT-style count: blocks (qkv, proj, QK-norm, feed-forward, adaLN) + embeddings + final layer.
    LightningDiT: SwiGLU, RMSNorm QK-norm weights (2 hd) and learnable RMSNorm weights (norm1, norm2, norm_final);
    SiT: GELU MLP, timm LayerNorm QK-norm (weight and bias: 4 hd), LayerNorms without parameters."""
    w, hd = width, width // heads
    if lightningdit:
        h = int(2 * 4 * w / 3)
        ffn = w * 2 * h + 2 * h + h * w + w
        qk, norms, final_norm = 2 * hd, 2 * w, w
    else:
        ffn = w * 4 * w + 4 * w + 4 * w * w + w
        qk, norms, final_norm = 4 * hd, 0, 0
    block = (3 * w * w + 3 * w) + (w * w + w) + qk + ffn + (6 * w * w + 6 * w) + norms
    embed = (channels * patch * patch * w + w) + (256 * w + w + w * w + w) + (classes + 1) * w
    final = (2 * w * w + 2 * w) + (w * patch * patch * channels + patch * patch * channels) + final_norm
    return depth * block + embed + final


def meta_params(spec_factory, args) -> int:
    with torch.device("meta"):
        m = spec_factory(args, (32, 16, 16), 1000)
    return sum(p.numel() for p in m.parameters())


def test_xl_parameter_counts_match_the_published_sizes():
    from vfmbench_plugins.diffusion.sit import SiTArgs
    from vfmbench_plugins.diffusion.sit import factory as sit_factory

    n_light = meta_params(factory, LightningDiTArgs())
    assert n_light == dit_xl_params() == 674_965_856  # LightningDiT-XL/1, the reference module's trainable count
    n_sit = meta_params(sit_factory, SiTArgs())
    assert n_sit == dit_xl_params(lightningdit=False) == 674_861_216  # SiT-XL/1 with qk_norm: "675M"
    n_reg = meta_params(sit_factory, SiTArgs(align="reg"))
    projector = (1152 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 768 + 768)
    cls_io = (768 * 1152 + 1152) + 2 * 1152 + (1152 * 768 + 768)  # cls_projectors2, wg_norm (affine), linear_cls
    assert n_reg == n_sit + projector + cls_io == 684_766_240  # SiT-XL/1 + REG, the reference module's count
    assert meta_params(sit_factory, SiTArgs(align="repa")) == n_sit + projector


def test_paper_presets_build_the_xl_models(host):
    from vfmbench.build import build_diffusion
    from vfmbench.cli import resolve_run_config

    counts = {}
    for preset in ("lightningdit-xl1-paper", "reg-sit-xl1-paper"):
        cfg = resolve_run_config(host, preset, None, [], {k: None for k in ("tokenizer", "vfm", "decoder", "diffusion", "dataset", "out")})
        with torch.device("meta"):
            m = build_diffusion(host, cfg, (32, 16, 16), 1000)
        counts[preset] = sum(p.numel() for p in m.parameters())
    assert counts == {"lightningdit-xl1-paper": 674_965_856, "reg-sit-xl1-paper": 684_766_240}


# ---------------------------------------------------------------------------------------------
# End to end: fit a class-conditional Gaussian mixture


def test_tiny_model_learns_a_class_conditional_mixture():
    check_fits_class_conditional_mixture(
        lambda shape, k: factory(LightningDiTArgs(size="tiny", width=64, depth=2, heads=4, time_sampling="uniform"), shape, k),
        train_steps=130, loss_key="mse", untrained_steps=10, max_fd_ratio=0.05, min_accuracy=0.9,
        guidance=dict(cfg_scale=3.0, cfg_interval=(0.125, 1.0), timestep_shift=0.3),
    )
