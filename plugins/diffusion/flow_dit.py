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


class _Modulate(torch.autograd.Function):
    """``x * (1 + scale) + shift`` for x [B, N, D] and per-sample shift, scale [B, D]: one fused pass
    forward; backward the x gradient and the two token-sum reductions, nothing else (autograd's
    addcmul backward adds a scalar multiply of x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s1 = 1 + scale[:, None]
        ctx.save_for_backward(x, s1)
        return torch.addcmul(shift[:, None], x, s1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, s1 = ctx.saved_tensors
        gx = g * s1 if ctx.needs_input_grad[0] else None
        gshift = g.sum(1) if ctx.needs_input_grad[1] else None
        gscale = (g * x).sum(1) if ctx.needs_input_grad[2] else None
        return gx, gshift, gscale


class _Gated(torch.autograd.Function):
    """``x + gate * h`` for x, h [B, N, D] and a per-sample gate [B, D] (the adaLN-Zero residual)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        g1 = gate[:, None]
        ctx.save_for_backward(g1, h)
        return torch.addcmul(x, g1, h)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g1, h = ctx.saved_tensors
        ggate = (g * h).sum(1) if ctx.needs_input_grad[1] else None
        gh = g * g1 if ctx.needs_input_grad[2] else None
        return g, ggate, gh


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample [B, D] shift and scale broadcast over x's tokens [B, N, D]."""
    return _Modulate.apply(x, shift, scale)


def gated(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The adaLN-Zero residual ``x + gate * h`` with a per-sample [B, D] gate broadcast over the tokens."""
    return _Gated.apply(x, gate, h)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (under autocast), else x as it is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _RMSNorm(torch.autograd.Function):
    """``x / sqrt(mean(x^2) + eps)`` over the last dim (no weight) with a hand-written backward:
    one norm reduction and one multiply forward, one dot and one fused multiply-add backward
    (torch's CPU RMSNorm runs pow/mean/add/rsqrt/mul and their gradients as separate passes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        xf = _upcast(x)
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        y = xf * r
        ctx.save_for_backward(y, r)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        y, r = ctx.saved_tensors
        gf = _upcast(g)
        # d/dx [x r] = r (g - y mean(g y))
        m = torch.linalg.vecdot(gf, y, dim=-1).unsqueeze(-1).mul_(r).div_(y.shape[-1])
        return torch.addcmul(gf * r, y, m, value=-1).to(g.dtype), None


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim of x (any strides; the result is contiguous, computed in float32)."""
    return _RMSNorm.apply(x, eps)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and state-dict keys) with the fused CPU/GPU path of ``rms_normalize``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        y = rms_normalize(x, eps)
        return y * self.weight if self.weight is not None else y


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) on each adjacent channel pair (2i, 2i+1) of the ``rope_2d`` layout (LightningDiT's
    ``rotate_half`` on '(d r)', r = 2)."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) on each adjacent channel pair (``rotate_pairs`` without the sign)."""
    return x.unflatten(-1, (-1, 2)).roll(1, -1).flatten(-2)  # roll: one pass (flip is slower on CPU), self-inverse backward


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with the sign of ``rotate_pairs`` folded in (-sin on each pair's first channel, +sin on its
    second), so that ``rotate_pairs(x) * sin == swap_pairs(x) * signed_sin(sin)``."""
    s = sin.unflatten(-1, (-1, 2))
    return torch.stack((-s[..., 0], s[..., 1]), dim=-1).flatten(-2)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin), each [tokens, hd]: the identity (1, 0) on the first ``tokens - len(cos)`` (prefix) tokens."""
    p = tokens - cos.shape[0]
    s = signed_sin(sin)
    if p:
        cos = torch.cat([cos.new_ones(p, cos.shape[1]), cos])
        s = torch.cat([s.new_zeros(p, s.shape[1]), s])
    return cos, s


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last ``cos.shape[0]`` tokens of x [B, H, T, hd]; earlier (prefix) tokens are left as they are."""
    c, s = rope_tables(cos, sin, x.shape[-2])
    return torch.addcmul(x * c, swap_pairs(x), s)


class _QKNormRope(torch.autograd.Function):
    """``rope(rms_normalize(x) * w)`` with the weight folded into the rotation tables and a hand-written
    backward (9 passes over x instead of autograd's 12 with their temporaries).

    x [B, T, 2, H, hd]; w [2, 1, hd]; c, s [T, 1, 1, hd] (cos and signed sin). With ``n = x r``,
    ``y = n w`` and ``z = y c + swap(y) s``: ``gy = g c + swap(g s)``, ``gw = sum(gy n)`` over B, T, H,
    ``gn = gy w`` and ``gx = r (gn - n mean(gn n))``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, s: torch.Tensor, eps: float) -> torch.Tensor:
        xf = _upcast(x)
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        n = xf * r
        ctx.save_for_backward(n, r, w, c, s)
        return torch.addcmul(n * (w * c), swap_pairs(n), swap_pairs(w) * s)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        n, r, w, c, s = ctx.saved_tensors
        g = _upcast(g).contiguous()  # (the attention's gradient arrives head-major)
        gy = torch.addcmul(swap_pairs(g * s), g, c)
        # sum over B, T, H as two reductions over a leading dim: sum(dim=(0, 1, 3)) is 20x slower on CPU
        gw = (gy * n).flatten(0, 1).sum(0).sum(1, keepdim=True)  # [2, 1, hd]
        gn = gy.mul_(w)
        m = torch.linalg.vecdot(gn, n, dim=-1).unsqueeze(-1).mul_(r).div_(n.shape[-1])
        gx = torch.addcmul(gn.mul_(r), n, m, value=-1)
        return gx, gw, None, None, None


def qk_norm_rope(qk: torch.Tensor, weight: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor] | None,
                 eps: float = 1e-6) -> torch.Tensor:
    """QK-norm and 2-D RoPE of queries and keys together, in float32 (or float64) also under autocast.

    ``qk`` [B, T, 2, H, hd] (a view of the qkv projection); ``weight`` [2, hd] the q and k RMSNorm
    weights, or None for no QK-norm. Returns contiguous [B, T, 2, H, hd] equal to
    ``apply_rope(RMSNorm_w(q))`` for q and k. The weight is folded into the rotation tables:
    ``(n w) cos + rotate_pairs(n w) sin = n (w cos) + swap_pairs(n) (swap_pairs(w) signed_sin)``.
    """
    if rope is None:
        return rms_normalize(qk, eps) * weight[:, None] if weight is not None else _upcast(qk)
    c, s = rope_tables(*rope, qk.shape[1])
    c, s = c[:, None, None], s[:, None, None]  # [T, 1, 1, hd] against [B, T, 2, H, hd]
    if weight is not None:
        return _QKNormRope.apply(qk, weight[:, None], c, s, eps)
    n = _upcast(qk)
    return torch.addcmul(n * c, swap_pairs(n), s)


class Attention(nn.Module):
    """Multi-head attention; QK-norm per head is RMSNorm (eps 1e-6, weight; LightningDiT, flow-dit) or, with
    ``qk_layernorm``, LayerNorm (eps 1e-5, weight and bias; timm's, as SiT/REPA/REG use it)."""

    def __init__(self, width: int, heads: int, qk_norm: bool, qk_layernorm: bool = False):
        super().__init__()
        self.heads = heads
        head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        norm = (lambda: nn.LayerNorm(head_dim, eps=1e-5)) if qk_layernorm else (lambda: nn.RMSNorm(head_dim, eps=1e-6))
        self.q_norm = norm() if qk_norm else nn.Identity()
        self.k_norm = norm() if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)
        weight = torch.stack([self.q_norm.weight, self.k_norm.weight]) if isinstance(self.q_norm, nn.RMSNorm) else None
        qk, v = qkv.split([2, 1], dim=2)  # split, not slices: one gradient concatenation, no zero-filled buffers
        if isinstance(self.q_norm, nn.LayerNorm):
            qf = _upcast(qk)
            qk = torch.stack([self.q_norm(qf[:, :, 0]), self.k_norm(qf[:, :, 1])], dim=2)
        qk = qk_norm_rope(qk, weight, rope, self.q_norm.eps if weight is not None else 1e-6)  # fp32 under autocast
        q, k = qk.to(qkv.dtype).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v[:, :, 0].transpose(1, 2))
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
        x = gated(x, g1, self.attn(modulate(self.norm1(x), sh1, sc1)))
        return gated(x, g2, self.mlp(modulate(self.norm2(x), sh2, sc2)))


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
