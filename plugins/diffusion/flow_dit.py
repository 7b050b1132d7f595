"""``flow-dit``: a class-conditional DiT trained by linear flow matching (velocity prediction).

Architecture (DiT, Peebles & Xie 2023; objective as SiT, Ma et al. 2024): patchify the latent
with a strided conv (patch 1 or 2), add a fixed 2-D sin-cos or a learned position embedding, and
condition every block on ``c = t_emb + y_emb`` through adaLN-Zero (zero-initialised modulation,
so each block starts as the identity and the untrained model predicts v = 0). Attention is
``F.scaled_dot_product_attention`` with optional RMS QK-norm. The final adaLN layer projects to
``patch^2 * C`` values per token, which are unpatchified back to [B, C, H, W].

Path (``vfmbench.interfaces.DiffusionModel``): t = 0 noise, t = 1 data,
``x_t = (1 - t) eps + t x``, target ``v = x - eps``. Training time is ``uniform`` on [0, 1] or
``lognormal``: ``t = sigmoid(n)``, ``n ~ N(lognormal_mean, lognormal_std)`` (SD3 / LightningDiT's
logit-normal; a positive mean favours the data end here because t = 1 is data). Labels are
replaced by the null label ``num_classes`` with probability ``label_dropout`` (for CFG).
The timestep embedding sees ``1000 t`` (DiT's discrete-step scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vfmbench import perf
from vfmbench.errors import UserError, did_you_mean
from vfmbench.hookspecs import hookimpl
from vfmbench.interfaces import DiffusionModel, Phase
from vfmbench.specs import DiffusionSpec

TIME_SAMPLINGS = ("uniform", "lognormal")
POS_EMBEDS = ("sincos", "learned")


@dataclass
class FlowDiTArgs:
    width: int = 384  # DiT-S; LightningDiT-XL is 1152 / 28 / 16
    depth: int = 12
    heads: int = 6
    patch_size: int = 1  # 1 or 2
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    pos_embed: str = "sincos"  # sincos | learned
    label_dropout: float = 0.1
    time_sampling: str = "uniform"  # uniform | lognormal
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95  # LightningDiT / REG
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off


def check_args(args: FlowDiTArgs, latent_shape: tuple[int, int, int]) -> None:
    """``UserError`` for argument combinations that cannot build (names the key to change)."""
    c, h, w = latent_shape
    if args.depth < 1 or args.width < 1 or args.heads < 1:
        raise UserError("diffusion.args.depth, width and heads must be positive")
    if args.patch_size not in (1, 2):
        raise UserError(f"diffusion.args.patch_size must be 1 or 2, got {args.patch_size}")
    if h % args.patch_size or w % args.patch_size:
        raise UserError(f"latent grid {h}x{w} is not divisible by diffusion.args.patch_size={args.patch_size}; use patch_size=1")
    if args.width % args.heads:
        raise UserError(f"diffusion.args.width={args.width} must be a multiple of diffusion.args.heads={args.heads}")
    if args.pos_embed == "sincos" and args.width % 4:
        raise UserError(f"diffusion.args.width={args.width} must be a multiple of 4 for the sincos position embedding")
    if args.time_sampling not in TIME_SAMPLINGS:
        raise UserError(f"unknown diffusion.args.time_sampling {args.time_sampling!r}: {did_you_mean(args.time_sampling, TIME_SAMPLINGS)}")
    if args.pos_embed not in POS_EMBEDS:
        raise UserError(f"unknown diffusion.args.pos_embed {args.pos_embed!r}: {did_you_mean(args.pos_embed, POS_EMBEDS)}")
    if not 0.0 <= args.label_dropout < 1.0:
        raise UserError(f"diffusion.args.label_dropout must be in [0, 1), got {args.label_dropout}")


# ---------------------------------------------------------------------------------------------
# Embeddings


def sincos_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """[gh*gw, dim] fixed 2-D sin-cos embedding (MAE/DiT): half the channels encode the row, half the column."""

    def one_d(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d // 2))
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.cat([one_d(dim // 2, rows.flatten()), one_d(dim // 2, cols.flatten())], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of ``1000 t`` (256 frequencies) followed by an MLP."""

    def __init__(self, width: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * self.scale)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# ---------------------------------------------------------------------------------------------
# Blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) within each axis of the ``rope_2d`` channel layout."""
    x = x.unflatten(-1, (2, 2, -1))
    return torch.stack((-x[..., 1, :], x[..., 0, :]), dim=-2).flatten(-3)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last ``cos.shape[0]`` tokens of x [B, H, T, hd]; earlier (prefix) tokens are left as they are."""
    n = cos.shape[0]
    p = x.shape[-2] - n
    tail = x[..., p:, :]
    rot = tail * cos + rotate_pairs(tail) * sin
    return torch.cat([x[..., :p, :], rot], dim=-2) if p else rot


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q.float()), self.k_norm(k.float())  # fp32 under autocast
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, each modulated (shift, scale) and gated by adaLN-Zero."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# Model


class FlowDiT(DiffusionModel):
    """DiT velocity model on normalised latents [B, C, H, W]; label ``num_classes`` is unconditional."""

    grad_checkpointing = False

    def __init__(self, args: FlowDiTArgs, latent_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        check_args(args, latent_shape)
        if num_classes < 1:
            raise UserError(f"flow-dit needs at least one class, got num_classes={num_classes}")
        self.args = args
        self.num_classes = int(num_classes)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        c, h, w = self.latent_shape
        p, width = args.patch_size, args.width
        self.grid = (h // p, w // p)
        n_tokens = self.grid[0] * self.grid[1]
        self.x_embed = nn.Conv2d(c, width, kernel_size=p, stride=p)
        if args.pos_embed == "sincos":
            self.register_buffer("pos", sincos_2d(width, *self.grid)[None], persistent=False)
        else:
            self.pos = nn.Parameter(torch.zeros(1, n_tokens, width))
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = nn.Embedding(num_classes + 1, width)  # last row: the null label
        self.blocks = nn.ModuleList(DiTBlock(width, args.heads, args.mlp_ratio, args.qk_norm) for _ in range(args.depth))
        self.final = FinalLayer(width, p * p * c)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        if isinstance(self.pos, nn.Parameter):
            nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        nn.init.zeros_(self.final.ada[-1].weight)
        nn.init.zeros_(self.final.ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W] (tokens row-major, each patch laid out (p, p, C))."""
        c = self.latent_shape[0]
        p = self.args.patch_size
        gh, gw = self.grid
        x = tokens.reshape(tokens.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity at (x, t) for ``labels`` ([B] long; ``num_classes`` = unconditional); t is [B] (or a scalar)."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        tokens = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos
        cond = self.t_embed(t) + self.y_embed(labels)
        for blk in self.blocks:
            tokens = perf.checkpoint(blk, tokens, cond) if self.grad_checkpointing else blk(tokens, cond)
        return self.unpatchify(self.final(tokens, cond))

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute each DiT block's activations in the backward pass (``run.grad_checkpointing``)."""
        self.grad_checkpointing = bool(enabled)

    # -- training --
    def draw_training_noise(self, latents: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        """(t [B], eps like latents, labels with dropout) for one flow-matching step, drawn in this order."""
        b, dev = latents.shape[0], latents.device
        if self.args.time_sampling == "uniform":
            t = torch.rand(b, generator=generator, device=dev)
        else:
            n = torch.randn(b, generator=generator, device=dev)
            t = torch.sigmoid(self.args.lognormal_mean + self.args.lognormal_std * n)
        eps = torch.randn(latents.shape, generator=generator, device=dev, dtype=latents.dtype)
        drop = torch.rand(b, generator=generator, device=dev) < self.args.label_dropout
        return t, eps, torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def loss(self, latents: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE between predicted and target velocity ``x - eps`` at ``x_t = (1-t) eps + t x``."""
        te = t.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        x_t = (1 - te) * eps + te * latents
        pred = self(x_t, t, labels)
        return (pred.float() - (latents - eps).float()).pow(2).flatten(1).mean(1)

    def phase_loss(self, phase: str, latents: torch.Tensor, labels: torch.Tensor, nimg: int) -> tuple[torch.Tensor, dict[str, float]]:
        if phase != "diffusion":
            raise ValueError(f"flow-dit has one phase, 'diffusion'; got {phase!r}")
        t, eps, labels_in = self.draw_training_noise(latents, labels)
        loss = self.loss(latents, labels_in, t, eps).mean()
        return loss, {"loss": float(loss.detach())}

    def training_phases(self, lr: float) -> list[Phase]:
        a = self.args
        return [Phase("diffusion", [p for p in self.parameters() if p.requires_grad], lr,
                      betas=(a.beta1, a.beta2), weight_decay=a.weight_decay, grad_clip=a.grad_clip)]


def factory(args: FlowDiTArgs | None, latent_shape: tuple[int, int, int], num_classes: int) -> FlowDiT:
    return FlowDiT(args if args is not None else FlowDiTArgs(), latent_shape, num_classes)


@hookimpl
def register_diffusion_models(register):
    register(
        DiffusionSpec(
            name="flow-dit",
            description="class-conditional DiT (adaLN-Zero, optional QK-norm) trained by linear flow matching",
            factory=factory,
            config=FlowDiTArgs,
            version="1",
            source="re-implementation in vfmbench of the DiT/SiT architecture and objective",
            paper="DiT: arXiv 2212.09748; SiT: arXiv 2401.08740",
            license="Apache-2.0",
        )
    )
