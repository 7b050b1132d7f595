"""Train a deterministic toy through vfmbench.train.train_loop; run plainly or under torchrun.

Usage: ddp_train.py OUT_DIR GRAD_ACCUM. Writes OUT_DIR/result-rank{r}.pt with the final
parameters and the logged losses.
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn

from vfmbench import dist
from vfmbench.interfaces import Phase
from vfmbench.train import train_loop


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def training_phases(self, lr):
        return [Phase("g", [p for p in self.parameters() if p.requires_grad], lr)]

    def phase_loss(self, phase, x, y, nimg):
        loss = ((self.net(self.frozen(x)) - y) ** 2).mean()
        return loss, {}


def main():
    out, accum = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_from_env()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 4, generator=g)
    Y = torch.sin(X.sum(1, keepdim=True))
    model = Toy()
    train_loop(model, model.training_phases(0.01), lambda idx: (X[idx], Y[idx]), 64, total_images=256, batch_size=16,
               ckpt_path=out / "ckpt.pt", seed=3, ema_halflife_images=0, log_every_images=16, log_path=out / "log.jsonl",
               grad_accum=accum)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / f"result-rank{dist.rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
