"""Pieces shared by the ``lightningdit`` and ``sit`` diffusion plugins (a module, not a plugin).

``FlowTransformer`` is a DiT skeleton on the latent grid: strided-conv patchify (patch 1 or 2),
optional fixed 2-D sin-cos position embedding (DiT's order: column half first), sinusoidal timestep
embedding of t as it is (no x1000), timestep and class embeddings summed into the
conditioning vector ``c`` (the null label is ``num_classes``), ``depth`` adaLN-Zero blocks and a
final adaLN layer, unpatchified back to [B, C, H, W]. The blocks are configurable:

* norm: ``LayerNorm`` without affine parameters (DiT/SiT) or ``RMSNorm`` with a learnable weight
  (LightningDiT's, also in the final layer);
* feed-forward: GELU(tanh) MLP of width ``mlp_ratio * width`` or SwiGLU with hidden width
  ``int(2/3 * mlp_ratio * width)`` (the same parameter count: 3072 at width 1152);
* attention: ``F.scaled_dot_product_attention`` with optional QK-norm over the head dimension
  (RMSNorm with weight for LightningDiT, timm's LayerNorm with weight and bias for SiT) and
  optional 2-D rotary embedding (LightningDiT's layout: the first half of each head's channels
  rotates with the row index, the second half with the column index, in adjacent pairs; extra
  prefix tokens such as REG's class token are not rotated).

``released_state_dict`` converts a reference implementation's state dict (LightningDiT, SiT, REPA,
REG key names) to this layout for ``diffusion.weights`` (``vfmbench.diffusion_weights``).

Zero-initialised modulation and output layers make the untrained model predict v = 0.

Training noise (``draw_training_noise``), with t = 0 noise and t = 1 data as everywhere in vfmbench:
``uniform`` t ~ U[0, 1]; ``lognormal`` t = sigmoid(mean + std n), n ~ N(0, 1); ``shifted``
t = s u / (1 + (s - 1) u), u ~ U[0, 1] (``vfmbench.sampling.shift_time``; s < 1 favours the noise
end). ``time_sampling_until_images`` > 0 switches to ``uniform`` once that many training images
have been seen (LightningDiT's log-normal-then-uniform schedule). Labels are replaced by the null
label with probability ``label_dropout``. Draw order: t, eps, dropout mask (as ``flow-dit``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vfmbench import perf
from vfmbench.errors import UserError, did_you_mean
from vfmbench.interfaces import DiffusionModel, Phase
from vfmbench.sampling import shift_time
from vfmbench_plugins.diffusion.flow_dit import Attention, RMSNorm, TimestepEmbedder, gated, modulate, sincos_2d

# width, depth, heads (DiT's S/B/L/XL; 'tiny' is the CPU smoke size)
SIZES = {"tiny": (128, 4, 4), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}
TIME_SAMPLINGS = ("uniform", "lognormal", "shifted")
POS_EMBEDS = ("sincos", "none")

# Reference key layout (DiT / SiT / LightningDiT / REG state dicts) -> vfmbench's, shared part; first match wins.
REFERENCE_RENAMES = (
    (r"^x_embedder\.proj\.", "x_embed."),
    (r"^t_embedder\.mlp\.", "t_embed.mlp."),
    (r"^y_embedder\.embedding_table\.", "y_embed."),
    (r"^blocks\.(\d+)\.adaLN_modulation\.", r"blocks.\1.ada."),
    (r"^final_layer\.norm_final\.", "final.norm."),
    (r"^final_layer\.adaLN_modulation\.", "final.ada."),
    (r"^final_layer\.linear\.", "final.linear."),
)
REFERENCE_FIXED = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")  # fixed tables: compared, not loaded


@dataclass
class FlowArgs:
    """Arguments common to ``lightningdit`` and ``sit`` (``diffusion.args``)."""

    size: str = "xl"  # tiny | s | b | l | xl; width/depth/heads > 0 override it
    width: int = 0
    depth: int = 0
    heads: int = 0
    patch_size: int = 1  # 1 or 2 on the latent grid
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    pos_embed: str = "sincos"  # sincos | none (fixed absolute embedding)
    label_dropout: float = 0.1  # null-label rate, for classifier-free guidance
    time_sampling: str = "uniform"  # uniform | lognormal | shifted
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0
    time_shift: float = 1.0  # 'shifted' sampling: t = s u / (1 + (s - 1) u)
    time_sampling_until_images: int = 0  # > 0: switch to uniform after this many images (0 = never)
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    hflip: bool = True  # train on horizontally flipped latents half of the time (REG: false)
    # Convergence evaluation during training (the runner's diffusion stage)
    eval_every_images: int = 0  # 0 = off; else sample + gFID with the EMA weights every this many images and at the end
    eval_num_images: int = 0  # samples per evaluation; 0 = diffusion.sample.num_images
    eval_steps: int = 0  # sampler steps per evaluation; 0 = diffusion.sample.steps
    eval_cfg_scale: float = 1.0  # guidance of the evaluation samples (1 = none, the papers' convergence tables)


def resolve_size(args: FlowArgs) -> tuple[int, int, int]:
    """(width, depth, heads) from ``size`` with explicit non-zero overrides."""
    if args.size not in SIZES:
        raise UserError(f"unknown diffusion.args.size {args.size!r}: {did_you_mean(args.size, list(SIZES))}")
    w, d, h = SIZES[args.size]
    return args.width or w, args.depth or d, args.heads or h


def check_args(args: FlowArgs, latent_shape: tuple[int, int, int], rope: bool) -> tuple[int, int, int]:
    """``UserError`` for arguments that cannot build (naming the key to change); returns (width, depth, heads)."""
    width, depth, heads = resolve_size(args)
    c, h, w = latent_shape
    if min(width, depth, heads) < 1:
        raise UserError("diffusion.args.width, depth and heads must be positive (or 0 for the size's value)")
    if args.patch_size not in (1, 2):
        raise UserError(f"diffusion.args.patch_size must be 1 or 2, got {args.patch_size}")
    if h % args.patch_size or w % args.patch_size:
        raise UserError(f"latent grid {h}x{w} is not divisible by diffusion.args.patch_size={args.patch_size}; use patch_size=1")
    if width % heads:
        raise UserError(f"diffusion.args.width={width} must be a multiple of diffusion.args.heads={heads}")
    if rope and (width // heads) % 4:
        raise UserError(f"2-D RoPE needs a head width divisible by 4; width {width} / heads {heads} = {width // heads}")
    if args.pos_embed not in POS_EMBEDS:
        raise UserError(f"unknown diffusion.args.pos_embed {args.pos_embed!r}: {did_you_mean(args.pos_embed, POS_EMBEDS)}")
    if args.pos_embed == "sincos" and width % 4:
        raise UserError(f"diffusion.args.width={width} must be a multiple of 4 for the sincos position embedding")
    if args.mlp_ratio <= 0:
        raise UserError(f"diffusion.args.mlp_ratio must be > 0, got {args.mlp_ratio}")
    if args.time_sampling not in TIME_SAMPLINGS:
        raise UserError(f"unknown diffusion.args.time_sampling {args.time_sampling!r}: {did_you_mean(args.time_sampling, TIME_SAMPLINGS)}")
    if args.lognormal_std <= 0 or args.time_shift <= 0:
        raise UserError("diffusion.args.lognormal_std and time_shift must be > 0")
    if not 0.0 <= args.label_dropout < 1.0:
        raise UserError(f"diffusion.args.label_dropout must be in [0, 1), got {args.label_dropout}")
    if min(args.time_sampling_until_images, args.eval_every_images, args.eval_num_images, args.eval_steps) < 0:
        raise UserError("diffusion.args.time_sampling_until_images and eval_* counts must be >= 0")
    if args.eval_cfg_scale < 0:
        raise UserError(f"diffusion.args.eval_cfg_scale must be >= 0 (1 = no guidance), got {args.eval_cfg_scale}")
    return width, depth, heads


# ---------------------------------------------------------------------------------------------
# Rotary position embedding on a 2-D grid


def rope_2d(head_dim: int, gh: int, gw: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [gh*gw, head_dim], for tokens in row-major order.

    Channel layout of a head (LightningDiT's ``VisionRotaryEmbeddingFast``): the first head_dim / 2
    channels rotate with the token's row, the last head_dim / 2 with its column; within each half the
    adjacent pair (2f, 2f+1) rotates by ``pos * theta^(-f / (head_dim / 4))`` (interleaved pairs).
    """
    q = head_dim // 4
    freqs = theta ** (-torch.arange(q, dtype=torch.float64) / q)
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    ang_r = (rows.flatten()[:, None] * freqs[None]).repeat_interleave(2, dim=1)
    ang_c = (cols.flatten()[:, None] * freqs[None]).repeat_interleave(2, dim=1)
    ang = torch.cat([ang_r, ang_c], dim=1)
    return ang.cos().float(), ang.sin().float()


# ---------------------------------------------------------------------------------------------
# Blocks


class _SiLUGate(torch.autograd.Function):
    """``silu(a) * b`` for ``[a, b] = h`` split on the last dim; the backward writes both halves' gradients
    straight into one buffer (autograd's chunk backward would concatenate them in an extra pass)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        a, b = h.chunk(2, dim=-1)
        s = F.silu(a)
        ctx.save_for_backward(h, s)
        return s * b

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        h, s = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        gh = torch.empty_like(h)
        ga, gb = gh.chunk(2, dim=-1)
        torch.mul(g, s, out=gb)
        torch.ops.aten.silu_backward.grad_input(g * b, a, grad_input=ga)
        return gh


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` with ``[a, b] = h.chunk(2, -1)``."""
    return _SiLUGate.apply(h)


class SwiGLU(nn.Module):
    """``fc2(silu(a) * b)`` with ``[a, b] = fc1(x)`` and hidden width ``int(2/3 * mlp_ratio * width)``."""

    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        hidden = int(2 * mlp_ratio * width / 3)
        self.fc1 = nn.Linear(width, 2 * hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(silu_gate(self.fc1(x)))


def _norm(width: int, rms: bool) -> nn.Module:
    """LightningDiT: RMSNorm with a learnable weight (its ``RMSNorm``); DiT/SiT: LayerNorm without affine parameters."""
    if rms:
        return RMSNorm(width, eps=1e-6, elementwise_affine=True)
    return nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)


def dit_sincos(width: int, gh: int, gw: int) -> torch.Tensor:
    """[gh*gw, width] fixed 2-D sin-cos embedding in DiT/MAE's ``get_2d_sincos_pos_embed`` order: for the
    row-major token (r, c) the first half of the channels encodes the column c, the second half the row r."""
    pe = sincos_2d(width, gh, gw)  # [emb(r), emb(c)]
    return torch.cat([pe[:, width // 2:], pe[:, : width // 2]], dim=1)


class Block(nn.Module):
    """Pre-norm attention + feed-forward, each modulated (shift, scale) and gated by adaLN-Zero."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, swiglu: bool, rmsnorm: bool):
        super().__init__()
        self.norm1 = _norm(width, rmsnorm)
        self.attn = Attention(width, heads, qk_norm, qk_layernorm=not rmsnorm)
        self.norm2 = _norm(width, rmsnorm)
        if swiglu:
            self.mlp = SwiGLU(width, mlp_ratio)
        else:
            hidden = int(width * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = gated(x, g1, self.attn(modulate(self.norm1(x), sh1, sc1), rope))
        return gated(x, g2, self.mlp(modulate(self.norm2(x), sh2, sc2)))


class FinalLayer(nn.Module):
    """Norm, adaLN (shift, scale), linear to ``out`` values per token. ``features`` is the part before the linear."""

    def __init__(self, width: int, out: int, rmsnorm: bool):
        super().__init__()
        self.norm = _norm(width, rmsnorm)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out)

    def features(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x, c))


# ---------------------------------------------------------------------------------------------
# The shared model skeleton


class FlowTransformer(DiffusionModel):
    """DiT skeleton with linear flow matching (velocity prediction) on normalised latents.

    Subclasses choose the block type and add their own loss terms; they call ``init_weights()``
    once all their modules exist, and run each block through ``run_block`` (gradient checkpointing).
    """

    grad_checkpointing = False

    def __init__(self, args: FlowArgs, latent_shape: tuple[int, int, int], num_classes: int, *,
                 swiglu: bool, rmsnorm: bool, rope: bool, name: str):
        super().__init__()
        width, depth, heads = check_args(args, latent_shape, rope)
        if num_classes < 1:
            raise UserError(f"{name} needs at least one class, got num_classes={num_classes}")
        self.args = args
        self.num_classes = int(num_classes)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.width, self.depth, self.heads = width, depth, heads
        c, h, w = self.latent_shape
        p = args.patch_size
        self.grid = (h // p, w // p)
        self.x_embed = nn.Conv2d(c, width, kernel_size=p, stride=p)
        if args.pos_embed == "sincos":
            self.register_buffer("pos", dit_sincos(width, *self.grid)[None], persistent=False)
        else:
            self.pos = None
        self.use_rope = rope
        self.swiglu = swiglu
        if rope:
            cos, sin = rope_2d(width // heads, *self.grid)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.t_embed = TimestepEmbedder(width, scale=1.0)  # t in [0, 1] as the references embed it (no x1000)
        self.y_embed = nn.Embedding(num_classes + 1, width)  # last row: the null label
        self.blocks = nn.ModuleList(Block(width, heads, args.mlp_ratio, args.qk_norm, swiglu, rmsnorm) for _ in range(depth))
        self.final = FinalLayer(width, p * p * c, rmsnorm)

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        for m in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # -- released checkpoints --
    reference_renames: tuple[tuple[str, str], ...] = ()  # the subclass's own renames, tried before REFERENCE_RENAMES

    def released_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """``sd`` in the reference implementation's key layout converted to this model's, or None when ``sd`` is not
        in that layout. Its fixed tables (sin-cos ``pos_embed``, RoPE ``feat_rope.freqs_*``) must equal this model's."""
        if "x_embedder.proj.weight" not in sd:
            return None
        mlp = (("w12", "fc1"), ("w3", "fc2")) if self.swiglu else (("fc1", "0"), ("fc2", "2"))  # SwiGLU / timm Mlp
        rules = self.reference_renames + tuple((rf"^blocks\.(\d+)\.mlp\.{a}\.", rf"blocks.\1.mlp.{b}.") for a, b in mlp) + REFERENCE_RENAMES
        out, fixed = {}, {}
        for k, v in sd.items():
            if k in REFERENCE_FIXED:
                fixed[k] = v
                continue
            for pattern, repl in rules:
                new, n = re.subn(pattern, repl, k)
                if n:
                    break
            out[new] = v
        self._check_fixed(fixed)
        return out

    def _check_fixed(self, fixed: dict[str, torch.Tensor]) -> None:
        def same(name: str, ref: torch.Tensor, own: torch.Tensor | None) -> None:
            if own is None or ref.shape != own.shape or not torch.allclose(ref.float().cpu(), own.float().cpu(), atol=1e-5, rtol=0):
                raise UserError(f"the checkpoint's {name} differs from this model's (grid {self.grid[0]}x{self.grid[1]}, width "
                                f"{self.width}, heads {self.heads}, pos_embed {self.args.pos_embed!r}, rope {self.use_rope}); "
                                "check diffusion.args and the tokenizer's latent size")

        if "pos_embed" in fixed:
            ref = fixed["pos_embed"].reshape(-1, fixed["pos_embed"].shape[-1])
            n = self.grid[0] * self.grid[1]
            if ref.shape[0] > n and ref[: ref.shape[0] - n].abs().max() > 0:
                raise UserError("the checkpoint's pos_embed has non-zero prefix rows (a class token position); vfmbench adds none")
            same("pos_embed", ref[-n:], None if self.pos is None else self.pos[0])
        elif self.pos is not None:
            raise UserError("the checkpoint has no pos_embed but the model adds one; set diffusion.args.pos_embed=none")
        for name, own in (("feat_rope.freqs_cos", "rope_cos"), ("feat_rope.freqs_sin", "rope_sin")):
            if name in fixed:
                same(name, fixed[name], getattr(self, own) if self.use_rope else None)
            elif self.use_rope:
                raise UserError(f"the checkpoint has no {name} (no RoPE) but the model uses RoPE; set diffusion.args.rope=false")

    # -- pieces of the forward pass --
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.x_embed(x).flatten(2).transpose(1, 2)
        return tokens + self.pos if self.pos is not None else tokens

    def condition(self, t: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=labels.device)
        if t.ndim == 0:
            t = t.expand(batch)
        return self.t_embed(t) + self.y_embed(labels)

    def rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.rope_cos, self.rope_sin) if self.use_rope else None

    @property
    def train_hflip(self) -> bool:
        """Whether the runner feeds the flipped images' latents (p = 0.5) in training (``diffusion.args.hflip``)."""
        return bool(self.args.hflip)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer block's activations in the backward pass (``run.grad_checkpointing``)."""
        self.grad_checkpointing = bool(enabled)

    def run_block(self, blk: nn.Module, *args) -> torch.Tensor:
        return perf.checkpoint(blk, *args) if self.grad_checkpointing else blk(*args)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W] (tokens row-major, each patch laid out (p, p, C))."""
        c = self.latent_shape[0]
        p = self.args.patch_size
        gh, gw = self.grid
        x = tokens.reshape(tokens.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, gh * p, gw * p)

    # -- training --
    def time_sampling_at(self, nimg: int) -> str:
        a = self.args
        if a.time_sampling_until_images and nimg >= a.time_sampling_until_images:
            return "uniform"
        return a.time_sampling

    def draw_time(self, b: int, nimg: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        mode, a = self.time_sampling_at(nimg), self.args
        if mode == "lognormal":
            return torch.sigmoid(a.lognormal_mean + a.lognormal_std * torch.randn(b, generator=generator, device=device))
        u = torch.rand(b, generator=generator, device=device)
        return shift_time(u, a.time_shift) if mode == "shifted" else u

    def draw_training_noise(self, latents: torch.Tensor, labels: torch.Tensor, nimg: int = 0,
                            generator: torch.Generator | None = None):
        """(t [B], eps like latents, labels with dropout) for one step at ``nimg`` images, drawn in this order."""
        b, dev = latents.shape[0], latents.device
        t = self.draw_time(b, nimg, generator, dev)
        eps = torch.randn(latents.shape, generator=generator, device=dev, dtype=latents.dtype)
        drop = torch.rand(b, generator=generator, device=dev) < self.args.label_dropout
        return t, eps, torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def training_phases(self, lr: float) -> list[Phase]:
        a = self.args
        return [Phase("diffusion", [p for p in self.parameters() if p.requires_grad], lr,
                      betas=(a.beta1, a.beta2), weight_decay=a.weight_decay, grad_clip=a.grad_clip)]

    def convergence_eval(self) -> dict[str, Any] | None:
        """The runner's convergence-evaluation settings, or None when ``eval_every_images`` is 0."""
        a = self.args
        if not a.eval_every_images:
            return None
        return {"every_images": a.eval_every_images, "num_images": a.eval_num_images, "steps": a.eval_steps, "cfg_scale": a.eval_cfg_scale}


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) eps + t x`` with t [B] broadcast over the other dimensions."""
    te = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return (1 - te) * eps + te * x


def mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
