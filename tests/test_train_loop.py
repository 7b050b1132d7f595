import copy
import math

import torch
from torch import nn

from vfmbench.interfaces import Phase
from vfmbench.train import IndexStream, ema_beta, train_loop


class Toy(nn.Module):
    """Linear regression on a fixed dataset; optionally plants a NaN loss at one step."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)
        self.nan_at = nan_at

    def training_phases(self, lr):
        return [Phase("g", list(self.parameters()), lr)]

    def phase_loss(self, phase, x, y, nimg):
        noise = torch.randn(x.shape[0], 1) * 0.01  # consumes the global RNG: resume must restore it
        loss = ((self.lin(x) + noise - y) ** 2).mean()
        if self.nan_at is not None and nimg == self.nan_at:
            loss = loss * float("nan")
        return loss, {}


X = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def get_batch(idx):
    return X[idx], Y[idx]


def _train(tmp, total, model=None, **kw):
    model = model or Toy()
    torch.manual_seed(123)
    res = train_loop(model, model.training_phases(0.05), get_batch, 40, total_images=total, batch_size=8,
                     ckpt_path=tmp / "ckpt.pt", seed=7, ema_halflife_images=32, **kw)
    return model, res


def test_ema_halflife_maths():
    b, h = 64, 160_000
    beta = ema_beta(b, h)
    assert math.isclose(beta ** (h / b), 0.5, rel_tol=1e-12)
    assert math.isclose(ema_beta(512, 160_000), 0.5 ** (512 / 160_000))  # the paper's 0.99778 per step
    assert ema_beta(8, 0) == 0.0


def test_index_stream_is_resumable_and_covers_each_epoch():
    s = IndexStream(10, 4, seed=3)
    seq = torch.cat([s.batch(n) for n in range(0, 20, 4)])
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:20].tolist()) == list(range(10))
    fresh = IndexStream(10, 4, seed=3)
    assert torch.equal(fresh.batch(8), seq[8:12])  # the batch at image 8 does not depend on history
    assert not torch.equal(IndexStream(10, 4, seed=4).batch(0), seq[:4])


def test_resume_is_bitwise_identical(tmp_path):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    full, res_full = _train(a_dir, 96, ckpt_every_images=16)
    _, first = _train(b_dir, 48, ckpt_every_images=16)  # "killed" after 48 images
    torch.manual_seed(999)  # a different process would start from a different RNG state
    resumed, res = _train(b_dir, 96, ckpt_every_images=16)
    assert res.resumed_from == 48 and first.resumed_from == 0
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert res_full.steps == res.steps == 12


def test_ema_weights_are_loaded_at_the_end(tmp_path):
    model, _ = _train(tmp_path, 40)
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    raw = ck["module"]["lin.weight"]
    assert torch.equal(model.lin.weight.detach(), ck["ema"][0])
    assert not torch.equal(raw, ck["ema"][0])


def test_nan_step_is_skipped_and_counted(tmp_path):
    model, res = _train(tmp_path, 40, model=Toy(nan_at=16))
    assert res.skipped_steps == 1 and res.steps == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_make_optimiser_uses_fused_adamw_and_matches_the_loop_implementation():
    from vfmbench.train import make_optimiser

    torch.manual_seed(0)
    ref_model = nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 3))
    fast_model = nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 3))
    fast_model.load_state_dict(ref_model.state_dict())
    ph = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), foreach=False, **ph)  # the per-parameter loop
    fast_opt = make_optimiser(Phase("g", list(fast_model.parameters()), **ph))
    assert fast_opt.param_groups[0]["fused"] is True
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))

    def steps_agree(n: int) -> None:
        for _ in range(n):
            for model, opt in ((ref_model, ref_opt), (fast_model, fast_opt)):
                opt.zero_grad(set_to_none=True)
                model(x).pow(2).mean().backward()
                opt.step()
        for a, b in zip(ref_model.parameters(), fast_model.parameters()):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)

    steps_agree(5)
    # a checkpoint of the loop implementation loads into the fused one, which stays fused and continues alike
    fast_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # as from a file: no shared state tensors
    assert fast_opt.param_groups[0]["fused"] is True and fast_opt.param_groups[0]["foreach"] is None
    steps_agree(1)


def test_make_optimiser_falls_back_to_foreach_without_fusable_parameters():
    from vfmbench.train import make_optimiser

    p = nn.Parameter(torch.zeros(3, device="meta"))
    opt = make_optimiser(Phase("g", [p], 1e-3))
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]
