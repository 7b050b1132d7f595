"""Stage ``tokenizer``: train the tokenizer (its recipe's training stages in turn, each resumable
from its checkpoints) or load ``tokenizer.weights``; writes ``model.safetensors`` and a reconstruction grid."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import divergence, transforms
from ..build import param_counts
from ..checkpoint import load_torch, save_weights, weights_file
from ..context import RunContext, load_tokenizer_state
from ..hookspecs import hookimpl
from ..images import plot_curves, save_pairs
from ..specs import StageSpec
from ..train import train_loop
from ..zoo import is_release


def run(ctx: RunContext) -> dict[str, Any]:
    d, cfg = ctx.folder, ctx.cfg
    tok = ctx.tokenizer()
    info: dict[str, Any] = {"params": param_counts(tok)}
    if is_release(tok.spec):  # evaluated as released (docs/zoo.md): the factory loaded its weights, nothing to train or save
        return {**info, "release": tok.spec.release, "weights": tok.weights_id}
    if cfg.tokenizer.weights:
        load_tokenizer_state(tok, load_torch(cfg.tokenizer.weights, ctx.device, what="tokenizer.weights"))
        info["loaded_from"] = str(cfg.tokenizer.weights)
    elif cfg.tokenizer.train.images > 0:
        tc = cfg.tokenizer.train
        stages = tok.training_stages(tc.images, tc.lr)
        info["stages"] = []
        train = transforms.training_view(ctx.dataset("train"), cfg.data)  # data.train_transform
        for i, st in enumerate(stages):
            tag = f"stage{i}-{st.name}" if len(stages) > 1 else "main"
            final = weights_file(d / tag)
            tok.begin_stage(st)
            if final.exists():  # finished earlier: carry its weights into the next stage
                load_tokenizer_state(tok, load_torch(final, ctx.device))
                info["stages"].append({"stage": st.name, "skipped": True})
                continue
            torch.manual_seed(cfg.run.seed + i)
            result = train_loop(
                tok, tok.training_phases(st.lr), lambda idx: ctx.image_batch("train", idx, train), len(train),
                total_images=st.images, batch_size=tc.batch_size, ckpt_path=d / f"ckpt-{tag}.pt", seed=cfg.run.seed + i,
                ema_halflife_images=tc.ema_halflife_images, ckpt_every_images=tc.ckpt_every_images, keep_checkpoints=tc.keep_checkpoints,
                log_every_images=tc.log_every_images, grad_accum=tc.grad_accum, log_path=d / f"train_log-{tag}.jsonl", desc=f"tokenizer {st.name}",
                precision=tc.precision or cfg.run.precision, compile=cfg.run.compile, compile_backend=cfg.run.compile_backend,
                divergence=divergence.policy(ctx, "tokenizer", f"tokenizer.train.lr (now {st.lr:g}) and tokenizer.train.batch_size"),
            )
            if ctx.dist.is_main():
                save_weights(tok.weights_state(), final.with_suffix(".safetensors"))
                plot_curves(d / f"train_log-{tag}.jsonl", d / f"curves-{tag}.png", title=f"{tok.spec.name} training ({st.name})")
            info["stages"].append({"stage": st.name, "images": result.nimg, "steps": result.steps,
                                   "skipped_steps": result.skipped_steps, "resumed_from": result.resumed_from})
    tok.eval()
    if not ctx.dist.is_main():
        return info
    save_weights(tok.weights_state(), d / "model.safetensors")
    with torch.no_grad():
        images, _ = ctx.image_batch("val", torch.arange(min(8, len(ctx.dataset("val")))))
        save_pairs(images.cpu(), tok.reconstruct(images, torch.Generator(ctx.device).manual_seed(0)).cpu(), d / "reconstructions.png")
    return info


def provided(cfg) -> str:
    """Without this stage, the tokenizer is still defined when it is loaded or not trained."""
    if cfg.tokenizer.weights:
        return "tokenizer.weights"
    if cfg.zoo.root and (Path(cfg.zoo.root) / cfg.tokenizer.name).exists():
        return "a released tokenizer under zoo.root"
    return "an untrained tokenizer (tokenizer.train.images=0)" if cfg.tokenizer.train.images <= 0 else ""


SPEC = StageSpec(
    name="tokenizer", description="train the tokenizer (or load tokenizer.weights); writes tokenizer/model.safetensors",
    produces=("tokenizer",), parallel=True, order=10, provided=provided, run=run,
)


@hookimpl
def register_stages(register):
    register(SPEC)
