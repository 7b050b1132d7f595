"""The one training loop: counted in images, EMA by half-life in images, atomic checkpoints (the
last ``keep_checkpoints`` kept), resume by re-running the same command (model, EMA, optimisers, RNG and data
position).

Randomness inside a step (data augmentation in ``get_batch``, noise and timesteps in the losses)
comes from the global torch RNG, re-seeded before each micro-batch from (seed, images seen, phase,
micro-batch index in the global batch). A step's random draws therefore depend neither on the rank
that runs a micro-batch nor on an interruption: ``w`` ranks with ``a`` accumulation steps train
exactly like one process with ``w * a`` accumulation steps (up to floating-point summation order;
a module that updates buffers in its forward, e.g. spectral norm's power iteration, follows rank
0's buffers under DDP and so matches only approximately), and a resumed run continues bitwise like
an uninterrupted one on CPU.

No gradient scaler: training runs in float32 or under bf16 autocast (bf16 has float32's exponent
range), and fp16 autocast is not offered.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import load_latest_checkpoint, save_checkpoint, write_text
from .interfaces import Phase

if TYPE_CHECKING:
    from .divergence import DivergencePolicy


class IndexStream:
    """Deterministic, resumable stream of index batches over ``n`` items.

    Epoch ``e`` is a permutation drawn from ``seed`` and ``e``; the batch that starts at image
    ``nimg`` is the same whether the run was interrupted or not.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n <= 0:
            raise ValueError("cannot train on an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def batch(self, nimg: int) -> torch.Tensor:
        out = []
        pos = nimg
        while len(out) < self.batch_size:
            epoch, off = divmod(pos, self.n)
            take = min(self.batch_size - len(out), self.n - off)
            out.extend(self._permutation(epoch)[off : off + take].tolist())
            pos += take
        return torch.tensor(out, dtype=torch.long)


class _PhaseForward(nn.Module):
    """Routes ``forward(phase, ...)`` to ``module.phase_loss`` so DistributedDataParallel can wrap it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, phase: str, *args, **kwargs):
        return self.module.phase_loss(phase, *args, **kwargs)


def ema_beta(batch_size: int, halflife_images: float) -> float:
    """Per-step EMA decay so that the weight of an update halves every ``halflife_images`` images."""
    if halflife_images <= 0:
        return 0.0
    return 0.5 ** (batch_size / halflife_images)


@dataclass
class TrainResult:
    nimg: int
    steps: int
    skipped_steps: int
    seconds: float
    resumed_from: int


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_micro(seed: int, nimg: int, slot: int, micro: int) -> None:
    """Seed the global RNG (CPU and CUDA) for one micro-batch of the step that starts at ``nimg``;
    ``slot`` 0 is data loading, ``1 + i`` is phase ``i``; ``micro`` indexes the global batch's micro-batches."""
    from .dist import derive_seed

    torch.manual_seed(derive_seed("train", seed, nimg, slot, micro))


def _truncate_log(log_path: Path, nimg: int) -> None:
    """Drop the log lines written after the checkpoint a run resumes from (a killed run wrote them;
    the resumed run writes them again)."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if isinstance(rec, dict) and rec.get("nimg", math.inf) <= nimg:
            keep.append(line)
    write_text(log_path, "".join(x + "\n" for x in keep))


def trainable_state(module: nn.Module, phases: list[Phase]) -> dict[str, torch.Tensor]:
    """State of ``module`` without its frozen parameters (a frozen VFM is not checkpointed)."""
    trainable = {id(p) for ph in phases for p in ph.params}
    frozen_names = {n for n, p in module.named_parameters() if id(p) not in trainable}
    return {k: v for k, v in module.state_dict().items() if k not in frozen_names}


def make_optimiser(ph: Phase) -> torch.optim.AdamW:
    """AdamW for one phase: the fused kernel when every parameter is a floating tensor on CPU or CUDA
    (one multi-tensor kernel instead of a Python loop over parameters; 86 -> 23 ms a step for a
    mid-size DiT on CPU), else the foreach implementation. Same update rule and state dict; a
    checkpoint written by another implementation loads into this one (the choice is kept on load)."""
    params = list(ph.params)
    fused = bool(params) and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    impl = {"fused": True, "foreach": None} if fused else {"fused": None, "foreach": True}
    opt = torch.optim.AdamW(params, lr=ph.lr, betas=ph.betas, weight_decay=ph.weight_decay, **impl)

    def keep_impl(_opt, state_dict):  # saved groups carry their own flags, which load_state_dict would adopt
        return {**state_dict, "param_groups": [{**g, **impl} for g in state_dict["param_groups"]]}

    opt.register_load_state_dict_pre_hook(keep_impl)
    return opt


def train_loop(
    module: nn.Module,
    phases: list[Phase],
    get_batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    num_items: int,
    *,
    total_images: int,
    batch_size: int,
    ckpt_path: Path,
    seed: int,
    ema_halflife_images: float = 0.0,
    ckpt_every_images: int = 0,
    log_every_images: int = 0,
    log_path: Path | None = None,
    desc: str = "train",
    max_loss_jump: float = 0.0,
    grad_accum: int = 1,
    keep_checkpoints: int = 2,
    precision: str = "fp32",
    compile: str = "off",
    compile_backend: str = "inductor",
    divergence: "DivergencePolicy | None" = None,
) -> TrainResult:
    """Train ``module`` for ``total_images`` images.

    ``get_batch(indices)`` returns (inputs, labels) or (inputs, labels, extras) on the module's
    device. Each step runs every phase:
    ``loss, logs = module.phase_loss(phase.name, inputs, labels, nimg, **extras)``, backward, optional
    clipping, optimiser step. A step whose loss is non-finite (or, with ``max_loss_jump`` > 0, more
    than that factor above the previous step's) is skipped and counted. The checkpoint at
    ``ckpt_path`` is written atomically every ``ckpt_every_images`` and at the end; when it exists
    the loop resumes from it (or, when it is unreadable, from the newest readable of the
    ``keep_checkpoints - 1`` older ones kept beside it as ``<stem>.<nimg>.pt``), and the lines of
    ``log_path`` written after that checkpoint are dropped. At the end the EMA weights (if any) are copied into the module.

    Under torchrun (``vfmbench.dist``), ``batch_size`` stays the global batch: each step's indices
    are the same on every rank, and rank r of world w takes micro-batch slices of
    ``batch_size / (w * grad_accum)`` images; gradients are averaged by DistributedDataParallel, so
    a step sees the same global batch whatever the world size. Only rank 0 writes files.

    ``precision='bf16'`` runs each ``phase_loss`` under bf16 autocast (parameters, gradients and
    optimiser state stay float32; the loss is reduced and back-propagated as float32).
    ``compile`` (a ``run.compile`` mode other than 'off') compiles the module's
    ``compile_targets()`` in place with ``compile_backend`` before training (``vfmbench.perf``).

    ``divergence`` (a ``vfmbench.divergence.DivergencePolicy``): the loop stops with a
    ``DivergenceError`` at the step where the skipped steps exceed the policy's share of the planned
    steps, and after training when a trained weight is not finite (unless the policy allows it).
    """
    from . import dist, perf

    world, rank = dist.world(), dist.rank()
    if batch_size % (world * grad_accum):
        raise ValueError(
            f"global batch {batch_size} is not divisible by world size {world} x grad_accum {grad_accum}; "
            "change tokenizer/diffusion .train.batch_size or .train.grad_accum"
        )
    per_rank = batch_size // (world * grad_accum)
    perf.check_precision(precision)
    perf.compile_module(module, compile, compile_backend)  # in place: the compiled modules run inside DDP's forward
    device = perf.module_device(module)
    runner = _PhaseForward(module)
    if dist.is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [next(module.parameters()).device.index] if next(module.parameters()).is_cuda else None
        # several phases (generator, discriminator) each use a subset of the parameters, and a stage
        # of a multi-stage recipe may leave trainable parameters out of its losses
        runner = DistributedDataParallel(runner, device_ids=device_ids, find_unused_parameters=True)
    optimisers = [make_optimiser(ph) for ph in phases]
    ema_params = [p for ph in phases if ph.ema for p in ph.params]
    beta = ema_beta(batch_size, ema_halflife_images)
    ema = [p.detach().clone() for p in ema_params] if beta > 0 else []
    nimg, steps, skipped, prev_loss = 0, 0, 0, {}
    resumed_from = 0
    ck, ck_file = load_latest_checkpoint(ckpt_path)
    last_saved = None  # nimg of the checkpoint at ckpt_path (None: none, or unreadable)
    if ck is not None:
        missing, unexpected = module.load_state_dict(ck["module"], strict=False)
        if unexpected:
            raise RuntimeError(f"checkpoint {ckpt_path} has keys this model lacks: {unexpected[:5]}")
        for opt, sd in zip(optimisers, ck["optimisers"]):
            opt.load_state_dict(sd)
        for e, v in zip(ema, ck["ema"]):
            e.copy_(v)
        nimg, steps, skipped, prev_loss = ck["nimg"], ck["steps"], ck["skipped"], ck["prev_loss"]
        rng = ck["rng"]
        if isinstance(rng, list):  # one state per rank
            if len(rng) == world:
                _set_rng_state(rng[rank])
            else:  # the world size changed: fresh, deterministic per-rank streams
                torch.manual_seed(seed * world + rank + nimg)
        else:
            _set_rng_state(rng)
        resumed_from = nimg
        last_saved = nimg if ck_file == ckpt_path else None
    elif world > 1:
        torch.manual_seed(seed * world + rank)
    if log_path is not None and rank == 0:
        _truncate_log(log_path, nimg)

    def save() -> None:
        nonlocal last_saved
        rng_states = dist.all_gather_object(_rng_state())
        if rank == 0:
            state = {
                "module": trainable_state(module, phases),
                "optimisers": [o.state_dict() for o in optimisers],
                "ema": ema,
                "nimg": nimg,
                "steps": steps,
                "skipped": skipped,
                "prev_loss": prev_loss,
                "rng": rng_states if world > 1 else rng_states[0],
            }
            save_checkpoint(state, ckpt_path, nimg, last_saved, keep=keep_checkpoints)
        last_saved = nimg
        dist.barrier()

    stream = IndexStream(num_items, batch_size, seed)
    log_every = log_every_images or max(batch_size, total_images // 100)
    next_log = (nimg // log_every + 1) * log_every
    next_ckpt = (nimg // ckpt_every_images + 1) * ckpt_every_images if ckpt_every_images else math.inf
    log_file = open(log_path, "a") if log_path is not None and rank == 0 else None
    t0 = time.time()
    module.train()
    bar = tqdm(total=total_images, initial=nimg, desc=desc, unit="img", dynamic_ncols=True, leave=False, disable=rank != 0 or None)
    try:
        while nimg < total_images:
            indices = stream.batch(nimg)
            micro = []
            for m in range(grad_accum):
                lo = (m * world + rank) * per_rank
                _seed_micro(seed, nimg, 0, m * world + rank)
                batch = get_batch(indices[lo : lo + per_rank])
                micro.append((batch[0], batch[1], batch[2] if len(batch) > 2 else {}))
            logs: dict[str, float] = {}
            for pi, (ph, opt) in enumerate(zip(phases, optimisers)):
                opt.zero_grad(set_to_none=True)
                total = torch.zeros((), dtype=torch.float64)
                phase_logs: dict[str, float] = {}
                for m, (inputs, labels, extras) in enumerate(micro):
                    _seed_micro(seed, nimg, 1 + pi, m * world + rank)
                    sync = m == grad_accum - 1 or not isinstance(runner, torch.nn.parallel.DistributedDataParallel)
                    ctx = contextlib.nullcontext() if sync else runner.no_sync()
                    with ctx:
                        with perf.autocast(device, precision):
                            loss, phase_logs = runner(ph.name, inputs, labels, nimg, **extras)
                        loss = loss.float()
                        (loss / grad_accum).backward()
                    total += float(loss.detach()) / grad_accum
                value = float(dist.all_reduce_mean(total))  # every rank takes the same skip decision
                jump = max_loss_jump > 0 and ph.name in prev_loss and value > max_loss_jump * max(prev_loss[ph.name], 1e-8)
                if not math.isfinite(value) or jump:
                    skipped += 1
                    opt.zero_grad(set_to_none=True)
                    logs[f"{ph.name}/skipped"] = 1.0
                    continue
                if ph.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(ph.params, ph.grad_clip)
                opt.step()
                prev_loss[ph.name] = value
                logs.update({f"{ph.name}/{k}": v for k, v in phase_logs.items()})
                logs[f"{ph.name}/loss"] = value
            if ema:
                with torch.no_grad():
                    for e, p in zip(ema, ema_params):
                        e.lerp_(p.detach(), 1.0 - beta)
            nimg += batch_size
            steps += 1
            bar.update(batch_size)
            if divergence is not None:
                divergence.after_step(skipped, steps, -(-total_images // batch_size), nimg)
            if nimg >= next_log or nimg >= total_images:
                next_log += log_every
                if log_file is not None and rank == 0:
                    log_file.write(json.dumps({"nimg": nimg, "step": steps, **logs}) + "\n")
                    log_file.flush()
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.endswith("/loss")})
            if nimg >= next_ckpt and nimg < total_images:
                next_ckpt += ckpt_every_images
                save()
        save()
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if ema:
        with torch.no_grad():
            for p, e in zip(ema_params, ema):
                p.copy_(e)
    module.eval()
    if divergence is not None:
        divergence.at_end(module, skipped, steps, nimg)
    return TrainResult(nimg=nimg, steps=steps, skipped_steps=skipped, seconds=time.time() - t0, resumed_from=resumed_from)
