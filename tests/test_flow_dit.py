"""flow-dit: shapes, the flow-matching loss, label dropout, and a small end-to-end fit on CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vfmbench.config import validate_args
from vfmbench.errors import UserError
from vfmbench.interfaces import DiffusionModel
from vfmbench.sampling import sample
from vfmbench.specs import DiffusionSpec
from vfmbench_plugins.diffusion import flow_dit
from vfmbench_plugins.diffusion.flow_dit import FlowDiTArgs, factory, sincos_2d

from helpers import check_fits_class_conditional_mixture, check_label_dropout_rate, perturb, replay_training_step

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(width=32, depth=2, heads=2)


def tiny(latent_shape=(4, 8, 8), num_classes=10, **kw) -> flow_dit.FlowDiT:
    torch.manual_seed(0)
    return factory(FlowDiTArgs(**{**TINY, **kw}), latent_shape, num_classes)


@pytest.mark.parametrize(
    "shape,kw",
    [((4, 8, 8), dict(patch_size=2)), ((4, 8, 8), dict(patch_size=1)), ((3, 4, 6), dict(patch_size=2, pos_embed="learned", qk_norm=False)), ((2, 1, 1), {})],
)
def test_forward_shapes(shape, kw):
    m = tiny(shape, **kw)
    assert isinstance(m, DiffusionModel) and m.num_classes == 10
    x = torch.randn(5, *shape)
    out = m(x, torch.rand(5), torch.tensor([0, 3, 9, 10, 10]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: the untrained model predicts v = 0
    perturb(m)
    out = m(x, torch.rand(5), torch.tensor([0, 3, 9, 10, 10]))
    assert out.abs().mean() > 0
    assert m(x, torch.tensor(0.3), torch.zeros(5, dtype=torch.long)).shape == x.shape  # scalar t broadcasts


def test_conditioning_changes_output():
    m = tiny()
    perturb(m)
    x = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 0.5)
    base = m(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(base, m(x, t, torch.tensor([2, 10])))
    assert not torch.allclose(base, m(x, torch.full((2,), 0.9), torch.tensor([1, 1])))
    # samples are independent of one another in the batch (no cross-sample leakage)
    torch.testing.assert_close(m(x[:1], t[:1], torch.tensor([1])), base[:1], atol=1e-5, rtol=1e-5)


def test_unpatchify_places_patches_and_channels():
    m = tiny((3, 4, 6), patch_size=2)
    gh, gw = m.grid
    tok = torch.zeros(1, gh * gw, 2, 2, 3)
    for r in range(gh):
        for c in range(gw):
            for pi in range(2):
                for qi in range(2):
                    for ch in range(3):
                        tok[0, r * gw + c, pi, qi, ch] = 1000 * (r * gw + c) + 100 * ch + 10 * pi + qi
    out = m.unpatchify(tok.flatten(2))
    assert out.shape == (1, 3, 4, 6)
    for r in range(gh):
        for c in range(gw):
            for pi in range(2):
                for qi in range(2):
                    for ch in range(3):
                        assert out[0, ch, 2 * r + pi, 2 * c + qi] == 1000 * (r * gw + c) + 100 * ch + 10 * pi + qi


def test_sincos_position_embedding_values():
    pe = sincos_2d(8, 2, 3)  # rows use channels 0..3, columns 4..7; each half is [sin, sin, cos, cos]
    assert pe.shape == (6, 8)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    # token (row 1, col 2): frequencies 1 and 1/100 for a quarter of 8 channels
    exp = [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01), np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02)]
    torch.testing.assert_close(pe[1 * 3 + 2], torch.tensor(exp, dtype=torch.float32))


def test_loss_equals_manual_computation():
    m = tiny(label_dropout=0.3)
    step = replay_training_step(m, lambda x, y: m.draw_training_noise(x, y))
    x, y, loss, eps = step.x, step.y, step.loss, step.eps
    per_sample = ((step.pred - (x - eps)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, per_sample.mean())
    assert step.logs["loss"] == pytest.approx(loss.item())
    assert loss.requires_grad
    # the loss reacts to the model: the untrained (v = 0) model's loss is E|x - eps|^2 ~ 2
    m0 = tiny()
    torch.manual_seed(7)
    loss0, _ = m0.phase_loss("diffusion", x, y, nimg=0)
    torch.testing.assert_close(loss0, ((x - eps) ** 2).mean())
    with pytest.raises(ValueError, match="diffusion"):
        m.phase_loss("generator", x, y, nimg=0)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5])
def test_label_dropout_rate(rate):
    m = tiny(label_dropout=rate)
    check_label_dropout_rate(lambda x, y, g: m.draw_training_noise(x, y, generator=g)[2], rate)


def test_time_sampling_distributions():
    n = 40000
    g = torch.Generator().manual_seed(0)
    t, eps, _ = tiny(time_sampling="uniform").draw_training_noise(torch.zeros(n, 1, 1, 1), torch.zeros(n, dtype=torch.long), g)
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.003
    assert abs(eps.std() - 1) < 0.02
    t, _, _ = tiny(time_sampling="lognormal", lognormal_mean=0.5, lognormal_std=0.8).draw_training_noise(
        torch.zeros(n, 1, 1, 1), torch.zeros(n, dtype=torch.long), g
    )
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02


def test_training_phases_and_args():
    m = tiny(weight_decay=0.01, grad_clip=2.0, beta2=0.99)
    (ph,) = m.training_phases(3e-4)
    assert ph.name == "diffusion" and ph.lr == 3e-4 and ph.betas == (0.9, 0.99)
    assert ph.weight_decay == 0.01 and ph.grad_clip == 2.0
    assert sum(p.numel() for p in ph.params) == sum(p.numel() for p in m.parameters())
    args = validate_args(FlowDiTArgs, {"width": 64, "time_sampling": "lognormal"}, "diffusion.args")
    assert isinstance(args, FlowDiTArgs) and args.width == 64
    with pytest.raises(UserError, match="patch_size"):
        factory(FlowDiTArgs(patch_size=2, **TINY), (4, 5, 5), 10)
    with pytest.raises(UserError, match="heads"):
        factory(FlowDiTArgs(width=30, depth=1, heads=4), (4, 4, 4), 10)
    with pytest.raises(UserError, match="lognormal"):
        factory(FlowDiTArgs(time_sampling="lognorm", **TINY), (4, 4, 4), 10)


def test_registration():
    specs = []
    flow_dit.register_diffusion_models(register=specs.append)
    (spec,) = specs
    assert isinstance(spec, DiffusionSpec) and spec.name == "flow-dit" and spec.config is FlowDiTArgs
    model = spec.factory(FlowDiTArgs(**TINY), (4, 4, 4), 5)
    assert model.num_classes == 5 and model(torch.zeros(1, 4, 4, 4), torch.zeros(1), torch.tensor([5])).shape == (1, 4, 4, 4)


# ---------------------------------------------------------------------------------------------
# End to end: fit a class-conditional Gaussian mixture


def test_tiny_model_learns_a_class_conditional_mixture():
    model, z, labels, out = check_fits_class_conditional_mixture(
        lambda shape, k: factory(FlowDiTArgs(width=64, depth=2, heads=4, label_dropout=0.1), shape, k),
        train_steps=350, loss_key="loss", untrained_steps=20, max_fd_ratio=0.02, min_accuracy=0.95,
        guidance=dict(cfg_scale=3.0, cfg_interval=(0.1, 1.0)),
    )
    # bf16 autocast runs through the real model
    bf16 = sample(model, z, labels, sampler="heun", steps=10, precision="bf16")
    assert (bf16 - out).abs().mean() < 0.05
