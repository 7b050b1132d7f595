"""Linear probe on frozen tokenizer latents ("Top-1 Acc." of the VFM-VAE paper's Table A).

The paper does not publish its probe recipe, so vfmbench fixes one and records it in every result
row (``ProbeRecipe``):

1. pool the latents [N, C, H, W]: ``mean`` over the spatial grid -> [N, C], or ``flatten`` -> [N, C*H*W];
2. standardise every feature with the *train* mean and std (std floored at 1e-6, so constant
   features become 0);
3. multinomial logistic regression (one linear layer, cross-entropy) trained from zero weights
   with AdamW (weight decay decoupled), mini-batches of ``batch_size`` reshuffled each epoch by a
   ``torch.Generator`` seeded with ``seed``, ``epochs`` epochs, learning rate ``lr`` with a cosine
   decay to 0 over all steps; float32 on the given device;
4. report top-1 (and top-5 when there are more than 5 classes) on the val split, and train
   top-1, all in percent.

Everything is deterministic for a given seed on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

POOLINGS = ("mean", "flatten")
STD_FLOOR = 1e-6


@dataclass(frozen=True)
class ProbeRecipe:
    pooling: str = "mean"  # mean | flatten
    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"probe pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"invalid probe recipe {self}: epochs and batch_size >= 1, lr > 0, weight_decay >= 0")

    @classmethod
    def from_config(cls, cfg: Any, seed: int = 0) -> "ProbeRecipe":
        """From a ``vfmbench.config.ProbeConfig`` and the run seed."""
        return cls(pooling=cfg.pooling, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                   batch_size=cfg.batch_size, seed=seed)

    def protocol(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
                "batch_size": self.batch_size, "optimizer": "adamw-cosine", "standardise": "train"}


def pool_latents(z: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """[N, C, H, W] latents -> [N, D] float32 features."""
    if z.ndim != 4:
        raise ValueError(f"latents must be [N, C, H, W], got shape {tuple(z.shape)}")
    z = z.float()
    if pooling == "mean":
        return z.mean(dim=(2, 3))
    if pooling == "flatten":
        return z.flatten(1)
    raise ValueError(f"probe pooling {pooling!r} is not one of {POOLINGS}")


def _topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    top = logits.topk(k, dim=1).indices
    return float((top == y[:, None]).any(dim=1).float().mean() * 100.0)


def linear_probe(
    train_latents: torch.Tensor,
    train_labels: torch.Tensor,
    val_latents: torch.Tensor,
    val_labels: torch.Tensor,
    recipe: ProbeRecipe = ProbeRecipe(),
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Train the probe on train latents, evaluate on val: {'top1', 'top5' (> 5 classes), 'train_top1'} in percent."""
    xtr = pool_latents(train_latents, recipe.pooling).to(device)
    xva = pool_latents(val_latents, recipe.pooling).to(device)
    ytr = torch.as_tensor(train_labels).long().to(device)
    yva = torch.as_tensor(val_labels).long().to(device)
    if xtr.shape[0] != ytr.shape[0] or xva.shape[0] != yva.shape[0]:
        raise ValueError("latents and labels have different lengths")
    if xtr.shape[0] == 0 or xva.shape[0] == 0:
        raise ValueError("the linear probe needs train and val latents")
    c = int(num_classes) if num_classes else int(max(ytr.max(), yva.max())) + 1
    mean = xtr.mean(dim=0, keepdim=True)
    std = xtr.std(dim=0, unbiased=False, keepdim=True).clamp_min(STD_FLOOR)
    xtr, xva = (xtr - mean) / std, (xva - mean) / std

    head = torch.nn.Linear(xtr.shape[1], c).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    n = xtr.shape[0]
    bs = min(recipe.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = recipe.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(recipe.seed)
    step = 0
    with torch.enable_grad():
        for _ in range(recipe.epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            for s in range(steps_per_epoch):
                idx = perm[s * bs : (s + 1) * bs]
                for group in opt.param_groups:
                    group["lr"] = recipe.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    with torch.no_grad():
        out = {"top1": _topk_accuracy(head(xva), yva, 1), "train_top1": _topk_accuracy(head(xtr), ytr, 1)}
        if c > 5:
            out["top5"] = _topk_accuracy(head(xva), yva, 5)
    return out
