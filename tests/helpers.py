"""Helpers shared by test modules (plain functions; fixtures live in conftest.py). Test modules
import them as ``from helpers import ...``: pytest puts this folder on ``sys.path``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.linalg
import torch

from vfmbench.sampling import sample, sample_labels

# Golden fixtures made by the reference implementations (../shared/golden beside the checkout; README inside).
GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def golden(name: str) -> Path:
    """The folder of one golden fixture set; a missing one is a failure, not a skip."""
    d = GOLDEN / name
    if not (d / "fixture.json").exists():
        raise FileNotFoundError(f"golden fixture set {d} is missing: the checkout needs ../shared/golden beside it")
    return d


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Give the zero-initialised (adaLN-Zero) weights random values so outputs depend on inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@dataclass
class TrainingStep:
    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor
    logs: dict
    t: torch.Tensor
    eps: torch.Tensor
    pred: torch.Tensor  # the model's velocity at x_t = (1 - t) eps + t x


def replay_training_step(m: torch.nn.Module, draw: Callable[[torch.Tensor, torch.Tensor], tuple]) -> TrainingStep:
    """Perturb the flow-matching model ``m``, take its training loss on a random batch (x of
    [16, 4, 8, 8], labels of 10 classes) under seed 7, and replay that step's random draw
    ``draw(x, y)`` -> (t, eps, labels fed) with the same seed: what the loss was computed from."""
    perturb(m)
    x = torch.randn(16, 4, 8, 8)
    y = torch.randint(0, 10, (16,))
    torch.manual_seed(7)
    loss, logs = m.phase_loss("diffusion", x, y, nimg=0)
    torch.manual_seed(7)
    t, eps, y_in = draw(x, y)
    te = t.view(-1, 1, 1, 1)
    return TrainingStep(x, y, loss, logs, t, eps, m((1 - te) * eps + te * x, t, y_in))


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of samples (flattened), written out."""
    a, b = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
    c1, c2 = np.cov(a.T), np.cov(b.T)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real))


def check_label_dropout_rate(draw: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor], rate: float,
                             num_classes: int = 10, n: int = 40000) -> None:
    """``draw(x, y, generator)`` -> the labels a training step feeds the model: each is kept or
    replaced by the null class ``num_classes``, at ``rate`` within 4 standard errors."""
    y = torch.randint(0, num_classes, (n,))
    y_in = draw(torch.zeros(n, 1, 1, 1), y, torch.Generator().manual_seed(0))
    dropped = y_in == num_classes
    assert torch.equal(y_in[~dropped], y[~dropped])
    se = (rate * (1 - rate) / n) ** 0.5
    assert abs(dropped.float().mean().item() - rate) <= 4 * se + 1e-12


def check_fits_class_conditional_mixture(build: Callable[[tuple[int, ...], int], torch.nn.Module], *, train_steps: int,
                                         loss_key: str, untrained_steps: int, max_fd_ratio: float, min_accuracy: float,
                                         guidance: dict) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train the diffusion model ``build(latent_shape, num_classes)`` on a mixture of 4 Gaussians, one
    per class, and check it: the training loss ``loss_key`` falls below 0.3 of its first value; Heun
    samples come closer to the data than the untrained model's (Fréchet ratio below
    ``max_fd_ratio``) and land at their class's mode (share above ``min_accuracy``), with guidance
    (``sample`` arguments ``guidance``) too. Returns (model, noise, labels, Heun samples)."""
    k, shape = 4, (2, 2, 2)
    modes = 2.0 * torch.randn(k, 8, generator=torch.Generator().manual_seed(0))

    def data(n, g):
        y = torch.randint(0, k, (n,), generator=g)
        return (modes[y] + 0.25 * torch.randn(n, 8, generator=g)).view(n, *shape), y

    def accuracy(x: torch.Tensor) -> float:
        nearest = ((x.flatten(1)[:, None] - modes[None]) ** 2).sum(-1).argmin(1)
        return (nearest == labels).float().mean().item()

    torch.manual_seed(0)
    model = build(shape, k)
    ref, _ = data(2000, torch.Generator().manual_seed(9))
    labels = sample_labels(1000, k, "balanced", torch.Generator().manual_seed(2))
    z = torch.randn(1000, *shape, generator=torch.Generator().manual_seed(3))
    fd_untrained = frechet(sample(model, z, labels, steps=untrained_steps), ref)

    (ph,) = model.training_phases(2e-3)
    opt = torch.optim.AdamW(ph.params, lr=ph.lr, betas=ph.betas, weight_decay=ph.weight_decay)
    g = torch.Generator().manual_seed(1)
    first = None
    for step in range(train_steps):
        x, y = data(256, g)
        loss, logs = model.phase_loss("diffusion", x, y, nimg=step * 256)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ph.params, ph.grad_clip)
        opt.step()
        first = logs[loss_key] if first is None else first
    assert logs[loss_key] < 0.3 * first

    model.eval()
    out = sample(model, z, labels, sampler="heun", steps=10)
    fd_trained = frechet(out, ref)
    assert fd_trained < max_fd_ratio * fd_untrained, (fd_trained, fd_untrained)
    assert accuracy(out) > min_accuracy
    assert accuracy(sample(model, z, labels, steps=10, **guidance)) > min_accuracy
    return model, z, labels, out


def make(host, name, *sets, vfm="dinov2", resolution=32, meta=False, preset="smoke"):
    """A tokenizer built through the public path (preset -> config -> BuildContext -> spec factory)."""
    from vfmbench.build import BuildContext, build_tokenizer
    from vfmbench.cli import resolve_run_config

    cfg = resolve_run_config(host, preset, None, [f"data.resolution={resolution}", *sets],
                             {"tokenizer": name, "vfm": vfm, "decoder": None, "diffusion": None, "dataset": None, "out": None})
    ctx = BuildContext(host=host, config=cfg, meta=meta)
    if meta:
        with torch.device("meta"):
            return build_tokenizer(ctx)
    torch.manual_seed(0)
    return build_tokenizer(ctx)


def count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
