"""Samplers for velocity models on the linear path, with interval guidance and timestep shift.

Convention (``vfmbench.interfaces.DiffusionModel``): t in [0, 1], t = 0 is noise and t = 1 is
data, ``x_t = (1 - t) eps + t x``, and the model predicts ``v(x_t, t) ~ E[x - eps | x_t]``
(LightningDiT's convention; SiT/REPA/REG run the other way, their models convert internally).
Every sampler integrates forward in t from pure noise at t = 0 to data at t = 1.

Derived quantities (linear path):
  * ``x = x_t + (1 - t) v`` and ``eps = x_t - t v`` hold for every sample, so the posterior means
    are ``E[x | x_t] = x_t + (1 - t) u`` and ``E[eps | x_t] = x_t - t u`` with ``u`` the model.
  * ``x_t | x ~ N(t x, (1 - t)^2 I)``, hence the score is
    ``grad log p_t(x_t) = -E[eps | x_t] / (1 - t) = (t u - x_t) / (1 - t)``  (``score_from_velocity``).
  * For any ``g(t) >= 0`` the SDE ``dx = [u + g^2/2 * score] dt + g dW`` has the same marginals
    as the probability-flow ODE ``dx = u dt``.

Samplers (``steps`` is the number of intervals of the time grid, i.e. of model evaluations):
  * ``euler``: ``x += dt * v`` on LightningDiT's float32 grid ``linspace(0, 1, steps + 1)``, shifted
    (torchdiffeq ``odeint(method='euler')``). LightningDiT's ``num_sampling_steps = N`` is an N-point
    grid, i.e. ``steps = N - 1`` here (its 250 = 249 Euler steps).
  * ``heun``: Heun's 2nd-order method (predictor Euler, corrector trapezoid) on every step; two
    evaluations per step.
  * ``euler-maruyama``: REG's ``euler_maruyama_sampler``: diffusion ``g(t)^2 = 2 (1 - t)`` (their
    ``2 t`` in reversed time), drift ``d = u + (1 - t) score = (1 + t) u - x``, step
    ``x += d dt + g eps sqrt(|dt|)`` with eps drawn before the model call; the float64 grid is REG's
    ``[linspace(1, 0.04, steps), 0]`` in reversed time, so ``steps - 1`` stochastic steps and one
    final deterministic step of 0.04 (the drift's mean, no noise). ``sde_noise`` replays stored
    draws; otherwise each step draws the latent's noise, then the joint vector's, from ``generator``.

Classifier-free guidance: ``v = v_u + s (v_c - v_u)``, applied only when the time at which the
model is evaluated lies in the closed interval ``cfg_interval = [t_low, t_high]`` (t = 0 noise);
outside it the conditional velocity is used alone, as in LightningDiT and REG. When guidance is
active the conditional and unconditional passes run as one batch of 2B.
  * ``guided_channels = n > 0`` guides only the first n latent channels; the rest keep the
    conditional velocity (LightningDiT's ``forward_with_cfg`` guides channels 0-2 only).
  * ``joint_cfg_scale`` is the joint vector's own scale (REG's ``cls_cfg_scale``; <= 0: conditional).
  * REG guides the SDE drift rather than the velocity. Both halves share x and t and the drift is
    affine in v with slope (1 + t) per element, so guiding the drift equals guiding the velocity.
  * LightningDiT "CFG interval start 0.125" (its t = 0 is noise too): ``cfg_interval=[0.125, 1]``.
  * REG / REPA "guidance interval [0, 0.8]" (their t = 1 is noise): ``cfg_interval=[0.2, 1]``.

Timestep shift (LightningDiT's ``timestep_shift``): a grid point ``t`` becomes
``t' = s t / (1 + (s - 1) t)``; fixes 0 and 1, identity at s = 1; ``s < 1`` (LightningDiT's 0.3)
packs the points near the noise end (t = 0). The guidance interval is compared with the shifted
times, i.e. the times the model sees.

Joint sampling (REG): a model with ``joint_dim > 0`` also samples a vector of that width (REG's
class token) along the same path. Its initial noise is ``joint_noise`` or is drawn from
``generator``; latent and vector are integrated as one flat state with the same sampler and grid,
and the model is called as ``model(x, t, labels, joint=e)``, returning ``(v, v_e)``. Only the
latents are returned unless ``return_joint=True``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .errors import UserError, did_you_mean
from .perf import autocast

SAMPLERS = ("euler", "heun", "euler-maruyama")
LABEL_MODES = ("random", "balanced")
PRECISIONS = ("fp32", "bf16")
SDE_LAST_STEP = 0.04  # REG/SiT: size of the final deterministic step of the SDE sampler


# ---------------------------------------------------------------------------------------------
# Time grids


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """LightningDiT timestep shift ``s t / (1 + (s - 1) t)`` (t = 0 noise); fixes 0 and 1, identity at s = 1;
    s < 1 moves the points towards the noise end."""
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, *, shift: float = 1.0, last_step: float = 0.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``steps + 1`` increasing times from 0 to 1, computed in ``dtype``.

    ``last_step == 0`` (ODE grids, LightningDiT): ``linspace(0, 1, steps + 1)`` then shifted, all in
    ``dtype`` (float32 reproduces LightningDiT's grid bit for bit). ``last_step > 0`` (SDE grids, REG):
    ``1 - [linspace(1, last_step, steps), 0]``, i.e. REG's float64 grid in its reversed time, then shifted.
    """
    if last_step > 0:
        tau = torch.cat([torch.linspace(1.0, last_step, steps, dtype=dtype), torch.zeros(1, dtype=dtype)])
        base = 1 - tau
    else:
        base = torch.linspace(0.0, 1.0, steps + 1, dtype=dtype)
    return base if shift == 1.0 else shift_time(base, shift)


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Score of p_t on the linear path: ``(t v - x) / (1 - t)`` (undefined at t = 1)."""
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        t = t.view(-1, *([1] * (x.ndim - 1)))
    return (t * v - x) / (1.0 - t)


def sde_diffusion(t: float) -> float:
    """``g(t)^2`` of the SDE sampler: ``2 (1 - t)`` (REPA/REG's ``2 t`` in their reversed time)."""
    return 2.0 * (1.0 - t)


# ---------------------------------------------------------------------------------------------
# Guided velocity


def _model_dtype(model: Callable, default: torch.dtype) -> torch.dtype:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.dtype
    return default


class GuidedVelocity:
    """``(x, t) -> v`` for a batch with fixed labels: one model call per evaluation, the
    conditional and unconditional halves batched together when guidance is active at ``t``.

    ``mask`` (bool, broadcastable to the state; None = everything) selects the guided elements, the
    others take the conditional velocity as it is (LightningDiT guides latent channels 0-2 only);
    ``scale`` (float or a tensor broadcastable to the state) is the guidance scale per element.
    """

    def __init__(self, model: Callable, labels: torch.Tensor, null_label: int, cfg_scale: float,
                 cfg_interval: Sequence[float], precision: str = "fp32", *, mask: torch.Tensor | None = None,
                 scale: torch.Tensor | float | None = None):
        self.model = model
        self.labels = labels
        self.null = torch.full_like(labels, null_label)
        self.cfg_scale = float(cfg_scale)
        self.t_low, self.t_high = float(cfg_interval[0]), float(cfg_interval[1])
        self.precision = precision
        self.mask = mask
        self.scale = self.cfg_scale if scale is None else scale

    def guided(self, t: float) -> bool:
        return self.cfg_scale != 1.0 and self.t_low <= t <= self.t_high

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        guide = self.guided(t)
        xin = torch.cat([x, x]) if guide else x
        yin = torch.cat([self.labels, self.null]) if guide else self.labels
        mdtype = _model_dtype(self.model, x.dtype)
        tin = torch.full((xin.shape[0],), t, dtype=mdtype, device=x.device)
        with autocast(x.device, self.precision):
            out = self.model(xin.to(mdtype), tin, yin)
        out = out.to(x.dtype)
        if not guide:
            return out
        v_c, v_u = out.chunk(2)
        v = v_u + self.scale * (v_c - v_u)
        return v if self.mask is None else torch.where(self.mask, v, v_c)


class JointModel(torch.nn.Module):
    """A joint-sampling model (``joint_dim > 0``) seen as a velocity model of one flat state
    ``[latent.flatten(1), joint]``, so that every sampler and the guidance treat both parts alike."""

    def __init__(self, model: torch.nn.Module, latent_shape: Sequence[int], joint_dim: int):
        super().__init__()
        self.model = model
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.split = int(torch.Size(self.latent_shape).numel())
        self.joint_dim = int(joint_dim)

    def forward(self, state: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = state[:, : self.split].reshape(state.shape[0], *self.latent_shape)
        v, v_joint = self.model(x, t, labels, joint=state[:, self.split :])
        return torch.cat([v.flatten(1), v_joint.to(v.dtype)], dim=1)


# ---------------------------------------------------------------------------------------------
# Integrators (grid: a 1-D tensor; steps in its dtype, as torchdiffeq / REG compute dt)


def _euler(vel: GuidedVelocity, x: torch.Tensor, grid: torch.Tensor, keep: Callable) -> torch.Tensor:
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = x + (t1 - t0) * vel(x, float(t0))
        keep(x)
    return x


def _heun(vel: GuidedVelocity, x: torch.Tensor, grid: torch.Tensor, keep: Callable) -> torch.Tensor:
    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = t1 - t0
        v0 = vel(x, float(t0))
        v1 = vel(x + dt * v0, float(t1))
        x = x + 0.5 * dt * (v0 + v1)
        keep(x)
    return x


def _euler_maruyama(vel: GuidedVelocity, x: torch.Tensor, grid: torch.Tensor, noise: Callable[[int], torch.Tensor],
                    keep: Callable) -> torch.Tensor:
    """REG's ``euler_maruyama_sampler`` in this module's time: ``x += d dt + sqrt(g^2) eps sqrt(|dt|)`` with
    ``d = v + g^2/2 score``; ``noise(i)`` is step i's draw, taken before the model call as REG does; the last
    step is deterministic."""
    n = len(grid) - 1
    for i, (t0, t1) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist())):
        dt = t1 - t0
        w = noise(i) if i < n - 1 else None
        g2 = sde_diffusion(t0)
        v = vel(x, t0)
        drift = v + 0.5 * g2 * score_from_velocity(v, x, t0)
        x = x + drift * dt
        if w is not None:
            x = x + g2 ** 0.5 * (w * abs(dt) ** 0.5)
        keep(x)
    return x


# ---------------------------------------------------------------------------------------------
# Entry points


def check_options(sampler: str, steps: int, cfg_scale: float, cfg_interval: Sequence[float],
                  timestep_shift: float, precision: str, guided_channels: int = 0) -> None:
    """Raise ``UserError`` for sampling options that cannot work (names the config key to fix)."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r} (diffusion.sample.sampler): {did_you_mean(sampler, SAMPLERS)}")
    if int(steps) != steps or steps < 1:
        raise UserError(f"diffusion.sample.steps must be a positive integer, got {steps!r}")
    if len(cfg_interval) != 2 or not (0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0):
        raise UserError(
            f"diffusion.sample.cfg_interval must be [t_low, t_high] with 0 <= t_low <= t_high <= 1 "
            f"(t = 0 is noise), got {list(cfg_interval)!r}; e.g. [0.125, 1.0] for LightningDiT"
        )
    if not timestep_shift > 0:
        raise UserError(f"diffusion.sample.timestep_shift must be > 0 (1 = no shift), got {timestep_shift!r}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (diffusion.sample.precision): {did_you_mean(precision, PRECISIONS)}")
    if cfg_scale < 0:
        raise UserError(f"diffusion.sample.cfg_scale must be >= 0 (1 = no guidance), got {cfg_scale!r}")
    if int(guided_channels) != guided_channels or guided_channels < 0:
        raise UserError(f"diffusion.sample.guided_channels must be an integer >= 0 (0 = all channels), got {guided_channels!r}")


def _guidance_mask(shape: Sequence[int], joint_dim: int, guided_channels: int, cfg_scale: float,
                   joint_scale: float | None, device: torch.device, dtype: torch.dtype):
    """(mask, scale) for ``GuidedVelocity`` on a state of latent ``shape`` [C, H, W] (flat with the joint part when
    ``joint_dim``): None, cfg_scale when everything is guided with one scale."""
    c = int(shape[0])
    n = c if guided_channels in (0, None) else int(guided_channels)
    if n > c:
        raise UserError(f"diffusion.sample.guided_channels={n} exceeds the latent's {c} channels; use 0 (all) or at most {c}")
    js = cfg_scale if joint_scale is None else float(joint_scale)
    if n == c and (not joint_dim or js == cfg_scale):
        return None, cfg_scale
    ch = torch.zeros(c, dtype=torch.bool, device=device)
    ch[:n] = True
    if not joint_dim:
        return ch.view(1, c, 1, 1), cfg_scale
    hw = int(torch.Size(shape[1:]).numel())
    mask = torch.cat([ch.repeat_interleave(hw), torch.full((joint_dim,), js > 0, dtype=torch.bool, device=device)])
    scale = torch.cat([torch.full((c * hw,), float(cfg_scale), dtype=dtype, device=device),
                       torch.full((joint_dim,), js, dtype=dtype, device=device)])
    return mask[None], scale[None]


@torch.no_grad()
def sample(model: Callable, noise: torch.Tensor, labels: torch.Tensor | None, *, sampler: str = "euler",
           steps: int = 250, cfg_scale: float = 1.0, cfg_interval: Sequence[float] = (0.0, 1.0),
           timestep_shift: float = 1.0, guided_channels: int = 0, joint_cfg_scale: float | None = None,
           generator: torch.Generator | None = None, precision: str = "fp32", joint_noise: torch.Tensor | None = None,
           return_joint: bool = False, sde_noise: tuple[torch.Tensor, torch.Tensor | None] | None = None,
           trajectory: list | None = None):
    """Integrate ``model`` from ``noise`` (t = 0) to latents (t = 1).

    ``model(x, t, labels)`` returns the velocity; ``t`` is a [B] float tensor and the label
    ``model.num_classes`` is unconditional (``labels=None`` samples unconditionally). The state is
    integrated in ``noise.dtype``; the model gets inputs in its parameters' dtype, under bf16
    autocast when ``precision='bf16'``. ``generator`` drives the SDE's noise. See the module
    docstring for the samplers, the guidance interval and the shift.

    ``guided_channels`` > 0 guides only the first that many latent channels (the others follow the
    conditional velocity); ``joint_cfg_scale`` is the joint vector's own scale (REG's ``cls_cfg_scale``).
    ``sde_noise = (noise_x [steps-1, B, C, H, W], noise_joint [steps-1, B, D] or None)`` replaces the
    Euler-Maruyama draws (replaying a reference run); otherwise step i draws the latent's noise and
    then the joint vector's from ``generator``. ``trajectory``, a list, receives the latent state at
    every grid point (the first is ``noise``).

    A model with ``joint_dim > 0`` (REG) is sampled jointly with its extra vector, whose initial
    noise is ``joint_noise`` or drawn from ``generator``; ``return_joint=True`` returns
    ``(latents, joint)``.
    """
    check_options(sampler, steps, cfg_scale, cfg_interval, timestep_shift, precision, guided_channels)
    null_label = getattr(model, "num_classes", None)
    guided = cfg_scale != 1.0
    if (guided or labels is None) and null_label is None:
        raise ValueError("the model has no `num_classes` attribute (the null label), needed for guidance or unconditional sampling")
    b = noise.shape[0]
    if labels is None:
        if guided:
            raise UserError("classifier-free guidance needs class labels; set diffusion.sample.cfg_scale=1 for unconditional sampling")
        labels = torch.full((b,), int(null_label), dtype=torch.long, device=noise.device)
    labels = labels.to(device=noise.device, dtype=torch.long)
    if labels.shape != (b,):
        raise ValueError(f"labels must have shape [{b}], got {tuple(labels.shape)}")
    joint_dim = int(getattr(model, "joint_dim", 0) or 0)
    gen_device = generator.device if generator is not None else noise.device
    x = noise.clone()
    if joint_dim:
        if joint_noise is None:
            joint_noise = torch.randn((b, joint_dim), generator=generator, device=gen_device, dtype=noise.dtype)
        if joint_noise.shape != (b, joint_dim):
            raise ValueError(f"joint_noise must have shape [{b}, {joint_dim}], got {tuple(joint_noise.shape)}")
        model = JointModel(model, noise.shape[1:], joint_dim)
        x = torch.cat([noise.flatten(1), joint_noise.to(device=noise.device, dtype=noise.dtype)], dim=1)
    elif joint_noise is not None or return_joint:
        raise ValueError("joint_noise/return_joint need a model with joint_dim > 0 (e.g. sit with align=reg)")
    split = model.split if joint_dim else None

    def latent(state: torch.Tensor) -> torch.Tensor:
        return state[:, :split].reshape(noise.shape) if joint_dim else state

    def keep(state: torch.Tensor) -> None:
        if trajectory is not None:
            trajectory.append(latent(state).clone())

    keep(x)
    mask, scale = _guidance_mask(noise.shape[1:], joint_dim, guided_channels, cfg_scale, joint_cfg_scale, noise.device, noise.dtype)
    vel = GuidedVelocity(model, labels, int(null_label) if null_label is not None else -1, cfg_scale, cfg_interval, precision,
                         mask=mask, scale=scale)
    if sampler in ("euler", "heun"):
        grid = time_grid(int(steps), shift=float(timestep_shift), dtype=torch.float32)  # LightningDiT's float32 grid
        x = (_euler if sampler == "euler" else _heun)(vel, x, grid, keep)
    else:
        grid = time_grid(int(steps), shift=float(timestep_shift), last_step=SDE_LAST_STEP, dtype=torch.float64)
        x = _euler_maruyama(vel, x, grid, _sde_noise(sde_noise, int(steps) - 1, noise, joint_dim, generator, gen_device), keep)
    if not joint_dim:
        return x
    return (latent(x), x[:, split:]) if return_joint else latent(x)


def _sde_noise(given, n: int, noise: torch.Tensor, joint_dim: int, generator, gen_device) -> Callable[[int], torch.Tensor]:
    """Step i's Euler-Maruyama draw in the state's layout: from ``given`` (replay) or the generator (latent, then joint)."""
    b = noise.shape[0]
    if given is not None:
        nx, nj = given if isinstance(given, (tuple, list)) else (given, None)
        if nx.shape != (n, *noise.shape) or (joint_dim and (nj is None or nj.shape != (n, b, joint_dim))):
            raise ValueError(f"sde_noise must be (noise_x [{n}, {', '.join(map(str, noise.shape))}], noise_joint [{n}, {b}, {joint_dim}] "
                             f"or None without a joint vector); got {tuple(nx.shape)}, {None if nj is None else tuple(nj.shape)}")

        def replay(i: int) -> torch.Tensor:
            wx = nx[i].to(device=noise.device, dtype=noise.dtype)
            return torch.cat([wx.flatten(1), nj[i].to(wx)], dim=1) if joint_dim else wx
        return replay

    def draw(i: int) -> torch.Tensor:
        wx = torch.randn(noise.shape, generator=generator, device=gen_device, dtype=noise.dtype).to(noise.device)
        if not joint_dim:
            return wx
        wj = torch.randn((b, joint_dim), generator=generator, device=gen_device, dtype=noise.dtype).to(noise.device)
        return torch.cat([wx.flatten(1), wj], dim=1)
    return draw


def sample_options(sc) -> dict[str, Any]:
    """``sample`` keyword arguments from a ``diffusion.sample`` config section (the sampler protocol)."""
    return {"sampler": sc.sampler, "steps": sc.steps, "cfg_scale": sc.cfg_scale, "cfg_interval": tuple(sc.cfg_interval),
            "timestep_shift": sc.timestep_shift, "guided_channels": int(getattr(sc, "guided_channels", 0) or 0),
            "joint_cfg_scale": getattr(sc, "joint_cfg_scale", None)}


def sampler_protocol(sc) -> dict[str, Any]:
    """What of ``diffusion.sample`` changes a generated image, for every generation row's ``protocol``."""
    o = sample_options(sc)
    return {"sampler": o["sampler"], "steps": o["steps"], "guidance": "cfg" if o["cfg_scale"] != 1.0 else "none",
            "cfg_scale": o["cfg_scale"], "cfg_interval": list(o["cfg_interval"]), "timestep_shift": o["timestep_shift"],
            "time_shift_formula": "s*t/(1+(s-1)*t), t=0 noise",
            "guided_channels": o["guided_channels"] or "all",
            "joint_cfg_scale": "cfg_scale" if o["joint_cfg_scale"] is None else o["joint_cfg_scale"],  # REG's class token
            "grid": "float64 1-[linspace(1,0.04,steps),0]" if o["sampler"] == "euler-maruyama" else "float32 linspace(0,1,steps+1)"}


def sample_labels(n: int, num_classes: int, mode: str = "random", generator: torch.Generator | None = None) -> torch.Tensor:
    """Class labels for ``n`` samples (int64, on the generator's device or CPU).

    ``random``: i.i.d. uniform over the classes (the ADM/REG protocol). ``balanced``:
    ``n // num_classes`` of each class plus one more for the first ``n % num_classes`` classes,
    in a random order (exactly equal counts when ``num_classes`` divides ``n``, e.g. 50 per class
    for 50k ImageNet samples).
    """
    if mode not in LABEL_MODES:
        raise UserError(f"unknown label sampling {mode!r} (diffusion.sample.label_sampling): {did_you_mean(mode, LABEL_MODES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    device = generator.device if generator is not None else torch.device("cpu")
    if mode == "random":
        return torch.randint(0, num_classes, (n,), generator=generator, device=device, dtype=torch.long)
    labels = torch.arange(n, device=device, dtype=torch.long) % num_classes
    return labels[torch.randperm(n, generator=generator, device=device)]
