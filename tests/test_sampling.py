"""Samplers against closed forms: a Gaussian-to-Gaussian flow whose marginal velocity is known.

For data x ~ N(m, S) and x_t = t x + (1 - t) eps, (x_t, x - eps) is jointly Gaussian with
  E[x_t] = t m,  Cov(x_t) = C_t = t^2 S + (1 - t)^2 I,  Cov(x - eps, x_t) = t S - (1 - t) I,
so the marginal velocity u(x, t) = E[x - eps | x_t = x] is affine in x:
  u(x, t) = m + (t S - (1 - t) I) C_t^{-1} (x - t m).
All matrices are functions of S and commute, and d/dt C_t^{1/2} = (t S - (1 - t) I) C_t^{-1/2}, so
x_t = t m + C_t^{1/2} eps solves the ODE: the exact flow map is x_1 = m + S^{1/2} eps.
"""
from __future__ import annotations

import math

import pytest
import torch

from vfmbench.errors import UserError
from vfmbench.sampling import (
    sample,
    sample_labels,
    score_from_velocity,
    shift_time,
    time_grid,
)

DIM = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cov() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    lam = torch.tensor([0.25, 1.0, 2.25], dtype=torch.float64)
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    return mean, (q, lam)


class GaussianFlow(torch.nn.Module):
    """The exact marginal velocity of N(0, I) -> N(m, Q diag(lam) Q^T); inputs [B, DIM, 1, 1]."""

    num_classes = 1

    def __init__(self, mean: torch.Tensor, eig: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.mean = mean
        self.q, self.lam = eig
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        xf = x.flatten(1)
        tt = t.to(xf.dtype).view(-1, 1)
        z = (xf - tt * self.mean) @ self.q  # eigen-coordinates
        gain = (tt * self.lam - (1 - tt)) / (tt**2 * self.lam + (1 - tt) ** 2)
        return (self.mean + (gain * z) @ self.q.T).view_as(x)

    def exact(self, eps: torch.Tensor) -> torch.Tensor:
        return (self.mean + ((eps.flatten(1) @ self.q) * self.lam.sqrt()) @ self.q.T).view_as(eps)

    def cov(self) -> torch.Tensor:
        return self.q @ torch.diag(self.lam) @ self.q.T


@pytest.fixture(scope="module")
def flow() -> GaussianFlow:
    return GaussianFlow(*make_cov())


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, DIM, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.flatten(1)
    return xf.mean(0), torch.cov(xf.T)


def test_closed_form_velocity_is_consistent(flow):
    # The affine velocity transports the exact marginals: d/dt of t m + C_t^{1/2} eps equals u.
    eps = noise(64)
    t, h = 0.37, 1e-6

    def path(tt):
        c_half = flow.q @ torch.diag((tt**2 * flow.lam + (1 - tt) ** 2).sqrt()) @ flow.q.T
        return tt * flow.mean + eps.flatten(1) @ c_half

    deriv = (path(t + h) - path(t - h)) / (2 * h)
    u = flow(path(t).view_as(eps), torch.full((64,), t, dtype=torch.float64), torch.zeros(64, dtype=torch.long))
    torch.testing.assert_close(u.flatten(1), deriv, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sampler,steps,max_err", [("euler", 100, 0.1), ("heun", 20, 0.01)])
def test_ode_samplers_reproduce_target_moments(flow, sampler, steps, max_err):
    x = sample(flow, noise(20000), torch.zeros(20000, dtype=torch.long), sampler=sampler, steps=steps)
    m, c = moments(x)
    torch.testing.assert_close(m, flow.mean, atol=0.05, rtol=0)
    torch.testing.assert_close(c, flow.cov(), atol=0.08, rtol=0)
    # and sample by sample, close to the exact flow map
    assert (x - flow.exact(noise(20000))).abs().max() < max_err


def test_euler_maruyama_reproduces_target_moments(flow):
    n = 20000
    g = torch.Generator().manual_seed(1)  # independent of the initial noise (seed 0)
    x = sample(flow, noise(n), torch.zeros(n, dtype=torch.long), sampler="euler-maruyama", steps=200, generator=g)
    m, c = moments(x)
    torch.testing.assert_close(m, flow.mean, atol=0.05, rtol=0)
    torch.testing.assert_close(c, flow.cov(), atol=0.06, rtol=0)
    # stochastic: far from the deterministic flow map of the same noise, reproducible by seed
    assert (x - flow.exact(noise(n))).pow(2).mean() > 0.1
    x2 = sample(flow, noise(n), torch.zeros(n, dtype=torch.long), sampler="euler-maruyama", steps=200,
                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, x2, atol=0, rtol=0)


def _order(flow, sampler, shift=1.0):
    eps = noise(256, seed=5)
    ref = flow.exact(eps)
    labels = torch.zeros(256, dtype=torch.long)
    ns = [8, 16, 32, 64]
    errs = [(sample(flow, eps, labels, sampler=sampler, steps=n, timestep_shift=shift) - ref).abs().max().item() for n in ns]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(len(ns) - 1)]
    return errs, slopes


@pytest.mark.parametrize("shift", [1.0, 0.3, 3.0])
def test_euler_is_first_order(flow, shift):
    errs, slopes = _order(flow, "euler", shift)
    assert errs[-1] < errs[0]
    assert all(0.8 < s < 1.25 for s in slopes), (errs, slopes)


@pytest.mark.parametrize("shift", [1.0, 0.3, 3.0])
def test_heun_is_second_order(flow, shift):
    errs, slopes = _order(flow, "heun", shift)
    assert all(1.75 < s < 2.3 for s in slopes), (errs, slopes)


def test_steps_count_model_evaluations(flow):
    eps, y = noise(4), torch.zeros(4, dtype=torch.long)
    for sampler, steps, calls in [("euler", 7, 7), ("heun", 7, 14), ("euler-maruyama", 7, 7)]:
        flow.calls = 0
        sample(flow, eps, y, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
        assert flow.calls == calls, sampler


def test_score_from_velocity_matches_gaussian_score(flow):
    # score of N(t m, C_t) is -C_t^{-1} (x - t m)
    x = noise(32, seed=2)
    t = 0.6
    v = flow(x, torch.full((32,), t, dtype=torch.float64), torch.zeros(32, dtype=torch.long))
    c_t = flow.q @ torch.diag(t**2 * flow.lam + (1 - t) ** 2) @ flow.q.T
    expected = -torch.linalg.solve(c_t, (x.flatten(1) - t * flow.mean).T).T
    torch.testing.assert_close(score_from_velocity(v, x, t).flatten(1), expected)


# ---------------------------------------------------------------------------------------------
# Guidance


class ConstantModel(torch.nn.Module):
    """v = 1 for conditional labels and v = -2 for the null label; records every call."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, float, torch.Tensor]] = []

    def forward(self, x, t, labels):
        assert torch.all(t == t[0])
        self.calls.append((x.shape[0], float(t[0]), labels.clone()))
        v = torch.where(labels == self.num_classes, -2.0, 1.0).to(x.dtype)
        return v.view(-1, *([1] * (x.ndim - 1))).expand_as(x).clone()


@pytest.mark.parametrize("interval", [(0.25, 0.75), (0.125, 1.0), (0.2, 1.0), (0.0, 1.0)])
def test_guidance_only_inside_interval(interval):
    model = ConstantModel()
    b, steps, s = 3, 8, 4.0
    x0 = torch.zeros(b, 2, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 4, 9])
    out = sample(model, x0, labels, sampler="euler", steps=steps, cfg_scale=s, cfg_interval=interval)
    grid = [i / steps for i in range(steps + 1)]
    expected = 0.0
    for (n, t, y), t0, t1 in zip(model.calls, grid[:-1], grid[1:]):
        inside = interval[0] <= t0 <= interval[1]
        assert t == pytest.approx(t0)
        # one batched forward: [cond; uncond] inside the interval, conditional only outside
        assert n == (2 * b if inside else b)
        if inside:
            assert torch.equal(y, torch.tensor([0, 4, 9, 10, 10, 10]))
        else:
            assert torch.equal(y, labels)
        v = (-2.0 + s * (1.0 - -2.0)) if inside else 1.0
        expected += (t1 - t0) * v
    assert len(model.calls) == steps
    torch.testing.assert_close(out, torch.full_like(x0, expected))


def test_no_guidance_at_scale_one_and_unconditional_labels():
    model = ConstantModel()
    out = sample(model, torch.zeros(2, 1, 1, 1), torch.tensor([1, 2]), steps=4, cfg_scale=1.0)
    assert all(n == 2 for n, _, _ in model.calls)
    torch.testing.assert_close(out, torch.ones(2, 1, 1, 1))
    model.calls.clear()
    out = sample(model, torch.zeros(2, 1, 1, 1), None, steps=4)
    assert all(torch.equal(y, torch.tensor([10, 10])) for _, _, y in model.calls)
    torch.testing.assert_close(out, torch.full((2, 1, 1, 1), -2.0))


def test_guidance_interval_uses_shifted_times():
    model = ConstantModel()
    sample(model, torch.zeros(1, 1, 1, 1), torch.tensor([0]), steps=10, cfg_scale=2.0, cfg_interval=(0.5, 1.0), timestep_shift=0.3)
    for n, t, _ in model.calls:
        assert n == (2 if t >= 0.5 else 1)
    # with shift 0.3 (steps packed near the noise) the shifted time reaches 0.5 only at the 9th step
    # (0.3 * 0.8 / (1 - 0.7 * 0.8) = 0.545; 0.7 -> 0.412)
    assert [n for n, _, _ in model.calls].count(2) == 2


# ---------------------------------------------------------------------------------------------
# Timestep shift, labels, options


def test_timestep_shift_endpoints_and_sd3_equivalence():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.3, 1.0, 3.0):
        ts = shift_time(t, s)
        assert ts[0] == 0 and float(ts[-1]) == pytest.approx(1, abs=1e-15)  # the formula as LightningDiT writes it: 1 ulp off in float64
        assert torch.all(ts[1:] > ts[:-1])
        sigma = 1 - t  # on the noise level it is SD3's shift with 1 / s
        torch.testing.assert_close(1 - ts, sigma / (s + (1 - s) * sigma))
    torch.testing.assert_close(shift_time(t, 1.0), t)
    assert shift_time(0.5, 0.3) == pytest.approx(0.15 / 0.65)  # LightningDiT (t = 0 noise): more steps near the noise
    assert shift_time(0.5, 3.0) > 0.5


def test_time_grid_shapes():
    g = time_grid(10)
    assert len(g) == 11 and g[0] == 0 and g[-1] == 1
    g = time_grid(250, last_step=0.04)
    assert len(g) == 251 and g[-2] == pytest.approx(0.96) and g[-1] == 1
    assert time_grid(1, last_step=0.04).tolist() == [0.0, 1.0]


def test_sample_labels_balanced_and_random():
    y = sample_labels(1000, 10, "balanced", torch.Generator().manual_seed(0))
    assert y.dtype == torch.long and torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 100))
    assert not torch.equal(y, torch.arange(1000) % 10)  # shuffled
    y = sample_labels(1003, 10, "balanced", torch.Generator().manual_seed(0))
    assert torch.bincount(y, minlength=10).tolist() == [101, 101, 101] + [100] * 7
    r = sample_labels(20000, 10, "random", torch.Generator().manual_seed(0))
    counts = torch.bincount(r, minlength=10)
    assert r.min() >= 0 and r.max() <= 9 and (counts - 2000).abs().max() < 200
    assert torch.equal(r, sample_labels(20000, 10, "random", torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampler="eular"), "euler"),
        (dict(steps=0), "steps"),
        (dict(cfg_interval=(0.8, 0.2)), "cfg_interval"),
        (dict(cfg_interval=(0.0, 1.5)), "cfg_interval"),
        (dict(timestep_shift=0.0), "timestep_shift"),
        (dict(precision="fp16"), "precision"),
    ],
)
def test_bad_options_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        sample(ConstantModel(), torch.zeros(1, 1, 1, 1), torch.tensor([0]), **kwargs)
    with pytest.raises(UserError, match="balanced"):
        sample_labels(4, 2, "balance")


class ConditionalOne(torch.nn.Module):
    """v = 1 for a class label, 0 for the null label (1): guidance with scale s gives s on every guided
    element and 1 (the conditional velocity) elsewhere; with ``joint_dim`` also a class-token vector."""

    num_classes = 1

    def __init__(self, joint_dim: int = 0):
        super().__init__()
        self.joint_dim = joint_dim

    def forward(self, x, t, labels, joint=None):
        v = (labels != self.num_classes).to(x.dtype).view(-1, *([1] * (x.ndim - 1))).expand_as(x)
        return (v, v[:, :1, 0, 0].expand(-1, self.joint_dim)) if self.joint_dim else v


def test_guided_channels_and_joint_scale():
    x0 = torch.zeros(2, 5, 2, 2, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    out = sample(ConditionalOne(), x0, y, steps=1, cfg_scale=4.0, guided_channels=3)
    assert torch.equal(out[:, :3], torch.full_like(out[:, :3], 4.0)) and torch.equal(out[:, 3:], torch.ones_like(out[:, 3:]))
    assert torch.equal(sample(ConditionalOne(), x0, y, steps=1, cfg_scale=4.0), torch.full_like(x0, 4.0))  # 0 = all channels
    for js, want in ((None, 4.0), (2.0, 2.0), (0.0, 1.0)):  # REG: cls_cfg_scale <= 0 takes the conditional drift
        lat, cls = sample(ConditionalOne(joint_dim=3), x0, y, steps=1, cfg_scale=4.0, joint_cfg_scale=js,
                          joint_noise=torch.zeros(2, 3, dtype=torch.float64), return_joint=True)
        assert torch.equal(cls, torch.full_like(cls, want)) and torch.equal(lat, torch.full_like(lat, 4.0))
    with pytest.raises(UserError, match="guided_channels"):
        sample(ConditionalOne(), x0, y, steps=1, cfg_scale=4.0, guided_channels=6)
    with pytest.raises(UserError, match="guided_channels"):
        sample(ConditionalOne(), x0, y, steps=1, cfg_scale=4.0, guided_channels=-1)
