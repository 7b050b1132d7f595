"""Plugin: ``vfm-vae``, a tokenizer whose encoder is a frozen vision foundation model (Bi et al. 2025).

Encoder side (the "LDM adapter"): tokens of several VFM layers (paper: [0, 12, -1] of
SigLIP2-L/16 at 512 px) -> per layer an attention projection to ``compress_width`` (LayerNorm +
linear shortcut, plus multi-head attention whose head outputs are averaged, plus a GeGLU MLP
residual) -> pixel-unshuffle onto the latent grid -> concatenation -> a fusing attention
projection to mean and log-variance -> diagonal Gaussian (log-variance clamped to [-30, 20]) ->
sample z (f16d32: 32 x 16 x 16 at 256 px). ``decode`` decompresses z with a widening attention
projection (concatenated heads) to ``decompress_width`` channels and runs the decoder
(``--decoder``, default ``vfm-vae-decoder``). A 1x1 projector maps z to the VFM width for the
alignment loss.

Training is the paper's recipe as data: ``stages`` lists each stage's length in images, learning
rate, loss weights and trainable module groups (see ``StageArgs``). Losses: L1, LPIPS-VGG, SSIM,
multi-scale L1 on the decoder's lower-resolution RGB outputs for the first images of a stage, KL,
the VF alignment loss with the gradient-norm adaptive weight at the last encoder-head weight, a
hinge GAN loss with a projected discriminator on a frozen ViT (DiffAugment), and a multi-scale
PatchGAN with feature matching; the equivariance regulariser; the safe-loss guard. The
discriminator is trained as a second phase. Weights released by the authors (the generator's
state dict, optionally under ``G_ema``) load through ``tokenizer.weights`` (``RELEASED_KEY_MAP``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vfmbench import perf
from vfmbench.errors import UserError
from vfmbench.hookspecs import hookimpl
from vfmbench.interfaces import DiagonalGaussian, Phase, Tokenizer, TrainStage, to_float
from vfmbench.specs import TokenizerSpec
from vfmbench_plugins.discriminators import MultiScalePatchGan, ProjectedDiscriminator
from vfmbench_plugins.losses import (SafeLossGuard, adaptive_weight, feature_matching_loss, hinge_d_loss, hinge_g_loss,
                                     lsgan_d_loss, lsgan_g_loss, multiscale_l1, pool_tokens, ssim_loss, vf_loss)

# Module groups a stage can train (resolved to parameter-name prefixes by ``VfmVae.group_prefixes``).
GROUPS = ("encoder-head", "vf-proj", "post-quant", "mapping", "synthesis", "decoder-high")
STAGE_NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass
class StageArgs:
    """One training stage. Loss weights of 0 switch a term off; ``vf`` is the scale of the adaptive
    VF weight; ``gan`` weighs the projected-discriminator hinge loss, ``patchgan`` the multi-scale
    PatchGAN (least squares) and ``feature_matching`` its feature-matching L1."""

    name: str = "main"
    images: int = 0  # stage length in images
    lr: float = 0.0  # 0 = tokenizer.train.lr
    train: list[str] = field(default_factory=lambda: ["encoder-head", "vf-proj", "post-quant", "mapping", "synthesis"])
    l1: float = 1.0
    lpips: float = 10.0
    ssim: float = 0.0
    kl: float = 1e-6
    vf: float = 5.0
    gan: float = 1.0
    patchgan: float = 0.0
    feature_matching: float = 0.0
    multiscale_l1: float = 0.1  # weight of each lower-resolution RGB output's L1
    multiscale_images: int = 0  # the multi-scale L1 is on for the stage's first N images
    equivariance: bool = True


@dataclass
class VfmVaeArgs:
    latent_channels: int = 32
    downsample: int = 16  # latent grid = resolution / downsample (f16d32 -> 32 x 16 x 16 at 256 px)
    layers: list[int] = field(default_factory=list)  # VFM taps; [] = vfm.layers or the VFM spec's default
    compress_width: int = 64  # per-layer compressed width before pixel-unshuffle
    decompress_width: int = 512  # width of the decompressed latent map fed to the decoder
    mlp_ratio: float = 2.0  # GeGLU hidden width / output width in every attention projection
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])  # Adam betas of both phases
    # Projected discriminator on a frozen ViT (any VFM plugin; the paper uses DINO v1 ViT-S/16).
    disc_vfm: str = "dino-s16"
    disc_vfm_weights: str = ""  # local weights (file or folder) of the discriminator ViT, as vfm.weights; else its library cache
    disc_hooks: list[int] = field(default_factory=lambda: [0, 3, 6, 9, 12])  # hidden states: 0 = embedding, k = block k
    disc_resolution: int = 224
    disc_crop_p: float = 0.5  # probability of a random crop (instead of a resize) for larger images
    disc_diffaug: bool = True
    patchgan_ndf: int = 64
    patchgan_layers: int = 3
    patchgan_scales: int = 3
    # Equivariance regulariser.
    eq_latent_p: float = 0.5  # probability of the latent-space branch (rescale + rotate z and the target)
    eq_latent_scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    eq_image_p: float = 0.25  # otherwise: probability of downscaling the input before the VFM
    eq_image_scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # Safe-loss guard.
    safe_loss_factor: float = 10.0  # skip a generator step whose reconstruction term jumps by more than this
    safe_loss_warmup_images: int = 50_000  # images after each (re)start before the jump rule applies
    safe_loss_d_limit: float = 1e4  # skip a discriminator step whose |loss| exceeds this
    lpips_images: int = 0  # LPIPS on at most this many images of each batch (0 = all)
    stages: list[StageArgs] = field(default_factory=list)  # [] = one stage of StageArgs() for tokenizer.train.images


# ---------------------------------------------------------------------------------------------
# Latent head


class GeGlu(nn.Module):
    """LayerNorm -> GELU(tanh)(W0 x) * (W1 x) -> W2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


class HeadAttention(nn.Module):
    """Multi-head attention between tokens that changes the width. Narrowing (in > out): heads of
    width in/heads whose outputs are averaged over heads (then pooled to ``out`` if wider);
    widening: heads of width out/heads, concatenated. Then a linear out -> out. Queries and values
    have biases, keys none."""

    def __init__(self, in_dim: int, out_dim: int, heads: int):
        super().__init__()
        inner = max(in_dim, out_dim)
        if inner % heads:
            raise UserError(f"attention projection {in_dim} -> {out_dim}: width {inner} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.out_dim = heads, inner // heads, out_dim
        self.average = in_dim > out_dim
        self.qkv = nn.Linear(in_dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, d]
        if self.average:
            out = out.mean(dim=1)
            if self.head_dim != self.out_dim:
                out = F.adaptive_avg_pool1d(out, self.out_dim)
        else:
            out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class AttnProjection(nn.Module):
    """Tokens [B, N, in] -> [B, N, out]: Linear(LN(x)) + Attention(LN(x)), then x + GeGLU(LN(x))."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_attn = nn.LayerNorm(in_dim)
        self.attn = HeadAttention(in_dim, out_dim, heads)
        self.norm_skip = nn.LayerNorm(in_dim)
        self.skip = nn.Linear(in_dim, out_dim)
        self.norm_mlp = nn.LayerNorm(out_dim)
        self.mlp = GeGlu(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.skip(self.norm_skip(x)) + self.attn(self.norm_attn(x))
        return x + self.mlp(self.norm_mlp(x))


def init_head(module: nn.Module) -> None:
    """The adapter's init: linear weights trunc-normal(0.02), convs Xavier-normal (gain 0.5), zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight, gain=0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])


def to_tokens(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Equivariance regulariser


@dataclass(frozen=True)
class Equivariance:
    """One draw of the regulariser: the latent is rescaled by ``latent_scale`` and rotated by
    ``rotation`` x 90 degrees (the target alike), or the input is downscaled by ``image_scale``
    before the VFM (the target alike)."""

    latent_scale: float = 1.0
    rotation: int = 0
    image_scale: float = 1.0


def sample_equivariance(a: VfmVaeArgs) -> Equivariance:
    """Draw with the global torch RNG (restored on resume): latent branch with ``eq_latent_p``, else
    the image-space downscale with ``eq_image_p``, else identity."""

    def pick(options: list[float]) -> float:
        return float(options[int(torch.randint(len(options), ()))])

    if float(torch.rand(())) < a.eq_latent_p:
        return Equivariance(latent_scale=pick(a.eq_latent_scales), rotation=int(torch.randint(4, ())))
    if a.eq_image_scales and float(torch.rand(())) < a.eq_image_p:
        return Equivariance(image_scale=pick(a.eq_image_scales))
    return Equivariance()


def scaled_size(n: int, scale: float) -> int:
    return max(1, int(round(n * scale)))


def transform_latent(z: torch.Tensor, scale: float, rotation: int) -> torch.Tensor:
    """Bilinear rescale of the latent grid by ``scale``, then rotation by ``rotation`` x 90 degrees."""
    if scale != 1.0:
        z = F.interpolate(z, size=(scaled_size(z.shape[-2], scale), scaled_size(z.shape[-1], scale)), mode="bilinear", align_corners=False)
    return torch.rot90(z, rotation, dims=(-2, -1)) if rotation % 4 else z


def transform_image(x: torch.Tensor, size: tuple[int, int], rotation: int, mode: str = "bilinear") -> torch.Tensor:
    """Antialiased resize of a target image to ``size``, then the same rotation as ``transform_latent``."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=size[0] < x.shape[-2])
    return torch.rot90(x, rotation, dims=(-2, -1)) if rotation % 4 else x


# ---------------------------------------------------------------------------------------------
# Released weights


# The authors' generator state dict (``Generator`` of tianciB/VFM-VAE, as loaded by their
# tools/reconstruct) -> this module. First match wins; a None target drops the key (the frozen VFM,
# fixed filters, bookkeeping buffers). ``{inject}`` rules are filled per decoder block.
RELEASED_KEY_MAP: list[tuple[str, str | None]] = [
    (r"^vfm_encoder\..*", None),  # the frozen VFM comes from the VFM plugin
    (r"^mapping\.x_avg$", None),  # running mean of w for truncation (unused)
    (r"\.zero_k_bias$", None),
    (r"\.blur_weight$", None),  # the fixed blur is rebuilt
    (r"^ldm_adapter\.patch_quants\.(\d+)\.0\.blocks\.0\.", r"compress.\1."),
    (r"^ldm_adapter\.final_quant\.blocks\.0\.", "fuse."),
    (r"^ldm_adapter\.post_quant\.blocks\.0\.", "post_quant."),
    (r"^ldm_adapter\.linear_proj\.weight$", "vf_proj.weight"),
    (r"^mapping\.mlp\.fc(\d+)\.", r"decoder.mapping.\1."),
    (r"^synthesis\.blocks\.(\d+)\.seperate_upsample_conv\.", r"decoder.blocks.\1.upsample."),
    (r"^synthesis\.blocks\.(\d+)\.last_upsample_conv\.", r"decoder.blocks.\1.skip_up."),
    (r"^synthesis\.blocks\.(\d+)\.conv0\.", r"decoder.blocks.\1.layers.0."),
    (r"^synthesis\.blocks\.(\d+)\.convs1\.(\d+)\.", lambda m: f"decoder.blocks.{m[1]}.layers.{int(m[2]) + 1}."),
    (r"^synthesis\.blocks\.(\d+)\.self_attns\.(\d+)\.ff\.0\.", r"decoder.blocks.\1.attn.\2.ff.norm."),
    (r"^synthesis\.blocks\.(\d+)\.self_attns\.(\d+)\.ff\.1\.", r"decoder.blocks.\1.attn.\2.ff.fc1."),
    (r"^synthesis\.blocks\.(\d+)\.self_attns\.(\d+)\.ff\.3\.", r"decoder.blocks.\1.attn.\2.ff.fc2."),
    (r"^synthesis\.blocks\.(\d+)\.self_attns\.(\d+)\.attn\.", r"decoder.blocks.\1.attn.\2.attn."),
    (r"^synthesis\.blocks\.(\d+)\.torgb\.", r"decoder.blocks.\1.torgb."),
]
# Names inside an attention projection and a ConvNeXt layer (applied after the prefix rules).
RELEASED_LEAF_MAP: list[tuple[str, str]] = [
    (r"^((?:compress\.\d+|fuse|post_quant))\.norm1\.", r"\1.norm_attn."),
    (r"^((?:compress\.\d+|fuse|post_quant))\.norm3\.", r"\1.norm_skip."),
    (r"^((?:compress\.\d+|fuse|post_quant))\.norm2\.", r"\1.norm_mlp."),
    (r"^((?:compress\.\d+|fuse|post_quant))\.proj\.", r"\1.skip."),
    (r"\.layers\.(\d+)\.affine_pw1\.", r".layers.\1.affine."),
    (r"\.layers\.(\d+)\.pwconv1\.weight$", r".layers.\1.pw1_weight"),
    (r"\.layers\.(\d+)\.pwconv1\.bias$", r".layers.\1.pw1_bias"),
]


def injection_rules(exponents: list[int], blocks: list[int]) -> list[tuple[str, str]]:
    """Rules for the authors' latent-injection ``z_convs.{i}``: a Sequential whose indices depend
    on the resampling (unshuffle first, shuffle in the middle, or neither)."""
    rules = []
    for i in blocks:
        e = exponents[i]
        a, b = (1, 2) if e < 0 else (0, 1) if e == 0 else (0, 2)
        p = f"^synthesis\\.z_convs\\.{i}\\."
        rules += [
            (p + f"{a}\\.0\\.weight$", f"decoder.inject.{i}.depthwise.weight"),
            (p + f"{a}\\.1\\.weight$", f"decoder.inject.{i}.pointwise.weight"),
            (p + f"{a}\\.2\\.", f"decoder.inject.{i}.norm1."),
            (p + f"{b}\\.0\\.weight$", f"decoder.inject.{i}.proj.weight"),
            (p + f"{b}\\.1\\.", f"decoder.inject.{i}.norm2."),
        ]
    return rules


def is_released_layout(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("ldm_adapter.", "synthesis.blocks.")) for k in state)


def _sub(rules, key: str) -> tuple[bool, str | None]:
    for pattern, target in rules:
        m = re.search(pattern, key)
        if m:
            if target is None:
                return True, None
            new = target(m) if callable(target) else m.expand(target)
            return True, new + key[m.end():]
    return False, key


def convert_released(state: Mapping[str, torch.Tensor], injection: list[tuple[str, str]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The authors' generator state dict in this module's names, and the keys no rule knows."""
    out, unknown = {}, []
    for key, value in state.items():
        hit, new = _sub(injection + RELEASED_KEY_MAP, key)
        if not hit:
            unknown.append(key)
            continue
        if new is None:
            continue
        for pattern, target in RELEASED_LEAF_MAP:
            new = re.sub(pattern, target, new)
        out[new] = value
    return out, unknown


# ---------------------------------------------------------------------------------------------
# The tokenizer


class VfmVae(Tokenizer):
    frozen_prefixes = ("vfm.", "disc.projected.backbone.")

    def __init__(self, args: VfmVaeArgs, vfm, decoder: nn.Module, layers: list[int], unshuffle: int,
                 disc_embed_dim: int, make_disc_backbone: Callable[[], nn.Module], make_lpips: Callable[[torch.device], nn.Module]):
        super().__init__(args.latent_channels, args.downsample)
        self.args = args
        self.vfm = vfm
        self.vfm.requires_grad_(False)
        self.layers = list(layers)
        self.unshuffle = unshuffle
        self.weights_id = "trained"
        d, w, c = vfm.embed_dim, args.compress_width, args.latent_channels
        self.compress = nn.ModuleList(AttnProjection(d, w, max(1, d // w), args.mlp_ratio) for _ in self.layers)
        fused = len(self.layers) * w * unshuffle**2
        self.fuse = AttnProjection(fused, 2 * c, max(1, fused // (2 * c)), args.mlp_ratio)
        self.post_quant = AttnProjection(c, args.decompress_width, max(1, args.decompress_width // c), args.mlp_ratio)
        self.vf_proj = nn.Conv2d(c, d, 1, bias=False)
        for m in (self.compress, self.fuse, self.post_quant, self.vf_proj):
            init_head(m)
        self.decoder = decoder
        self.disc = nn.ModuleDict({
            "projected": ProjectedDiscriminator(disc_embed_dim, args.disc_hooks, args.disc_resolution, args.disc_crop_p, args.disc_diffaug,
                                               interpolation=vfm.spec.interpolation),  # the generator VFM's resize mode
            "patchgan": MultiScalePatchGan(args.patchgan_ndf, args.patchgan_layers, args.patchgan_scales),
        })
        self.disc.requires_grad_(False)  # trained only inside its own phase
        self._make_disc_backbone = make_disc_backbone
        self._make_lpips = make_lpips
        self._lpips: list[nn.Module] = []  # kept out of the module tree: not saved, not counted
        self.stage: StageArgs | None = None
        self._train_names: list[str] = []
        self._g_guard = SafeLossGuard(args.safe_loss_factor, args.safe_loss_warmup_images)
        self._d_guard = SafeLossGuard(0.0, 0, args.safe_loss_d_limit)
        self._fakes: dict[tuple, tuple] = {}  # this step's reconstructions per micro-batch, for the discriminator phase

    # -- encoder side ---------------------------------------------------------------------------
    def _vfm_tokens(self, images: torch.Tensor, image_scale: float = 1.0):
        """The VFM taps; ``image_scale`` < 1 (image-space equivariance) first downscales the image by it
        (antialiased), then the VFM's own resize applies: two resizes, as the reference encoder does."""
        want = sorted(set(self.layers) | {-1})
        with torch.no_grad():
            return self.vfm(images, want, pre_scale=image_scale)

    def _posterior(self, out) -> DiagonalGaussian:
        gh, gw = out.grid
        r = self.unshuffle
        lh, lw = max(1, round(gh / r)), max(1, round(gw / r))
        maps = []
        for comp, layer in zip(self.compress, self.layers):
            fmap = to_map(comp(out.layers[layer].float()), out.grid)
            if (gh, gw) != (lh * r, lw * r):  # a token grid off the unshuffle ratio (odd input sizes)
                fmap = F.interpolate(fmap, size=(lh * r, lw * r), mode="bilinear", align_corners=False, antialias=gh > lh * r)
            maps.append(F.pixel_unshuffle(fmap, r))
        moments = to_map(self.fuse(to_tokens(torch.cat(maps, dim=1))), (lh, lw))
        mean, logvar = moments.float().chunk(2, dim=1)  # the latent, its sample and the KL in fp32 under autocast
        return DiagonalGaussian(mean, logvar)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return self._posterior(self._vfm_tokens(images))

    def vfm_request(self):
        """The posterior is a function of these frozen VFM taps: the runner may cache them."""
        return self.vfm, list(self.layers)

    def encode_from_vfm(self, tokens) -> DiagonalGaussian:
        return self._posterior(tokens)

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, C, h, w] -> the decoder's feature map [B, decompress_width, h, w]."""
        return to_map(self.post_quant(to_tokens(z)), tuple(z.shape[-2:]))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.decompress(z))

    def decode_multiscale(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(image, lower-resolution RGB outputs) where the decoder provides them, else (image, [])."""
        h = self.decompress(z)
        fn = getattr(self.decoder, "forward_multiscale", None)
        return fn(h) if fn is not None else (self.decoder(h), [])

    # -- precision and speed switches (vfmbench.perf) -------------------------------------------
    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Checkpoint the decoder's heavy blocks (the latent head and discriminators are light)."""
        perf.set_grad_checkpointing(self.decoder, enabled, f"decoder {type(self.decoder).__name__}")

    def set_channels_last(self, enabled: bool) -> None:
        """NHWC for the conv-heavy parts: the decoder (where it supports it) and the PatchGAN."""
        perf.set_channels_last(self.decoder, enabled)
        perf.to_channels_last(self.disc["patchgan"], enabled)

    def compile_targets(self) -> list[nn.Module]:
        return [self.decoder, self.disc["patchgan"]]

    # -- stages ---------------------------------------------------------------------------------
    def group_prefixes(self) -> dict[str, list[str]]:
        """Parameter-name prefixes of each trainable group. Decoders that expose ``trainable_groups``
        name their mapping, synthesis and high-resolution half; any other decoder trains as a whole."""
        dec = getattr(self.decoder, "trainable_groups", None)
        groups = dec() if dec is not None else {"mapping": [], "synthesis": [""], "high": [""]}
        return {
            "encoder-head": ["compress.", "fuse."],
            "vf-proj": ["vf_proj."],
            "post-quant": ["post_quant."],
            "mapping": ["decoder." + p for p in groups["mapping"]],
            "synthesis": ["decoder." + p for p in groups["synthesis"]],
            "decoder-high": ["decoder." + p for p in groups["high"]],
        }

    def trainable_names(self, groups: list[str]) -> list[str]:
        """Names of the generator parameters in ``groups`` (an unknown group is an error)."""
        prefixes = self.group_prefixes()
        bad = [g for g in groups if g not in prefixes]
        if bad:
            raise UserError(f"unknown trainable group {bad[0]!r} in tokenizer.args.stages; known: {', '.join(GROUPS)}")
        chosen = tuple(p for g in groups for p in prefixes[g])
        return [n for n, _ in self.generator_parameters() if chosen and n.startswith(chosen)]

    def generator_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith(("vfm.", "disc."))]

    def training_stages(self, images: int, lr: float) -> list[TrainStage]:
        """The recipe of ``stages`` (or one default stage), capped at ``images`` in total: later
        stages are shortened or dropped when ``tokenizer.train.images`` is smaller than the recipe."""
        recipe = self.args.stages or [StageArgs(name="main", images=images)]
        names = [s.name for s in recipe]
        if len(set(names)) != len(names) or not all(STAGE_NAME_RE.match(n) for n in names):
            raise UserError(f"tokenizer.args.stages names must be distinct lowercase words joined by '-', got {names}")
        out, left = [], int(images)
        for s in recipe:
            if s.images <= 0:
                raise UserError(f"stage {s.name!r} has images={s.images}; every stage needs a positive length in images")
            if not self.trainable_names(s.train):
                raise UserError(f"stage {s.name!r} trains {s.train}, which selects no parameter of this model")
            n = min(s.images, left)
            if n <= 0:
                break
            out.append(TrainStage(s.name, n, s.lr or lr, settings=dataclasses.asdict(dataclasses.replace(s, images=n))))
            left -= n
        return out

    def begin_stage(self, stage: TrainStage) -> None:
        """Freeze everything but the stage's groups, check the losses it asks for, and build the
        discriminator ViT and LPIPS network when the stage needs them."""
        st = StageArgs(**{**stage.settings, "name": stage.name}) if stage.settings else StageArgs(name=stage.name, images=stage.images)
        names = self.trainable_names(st.train)
        if not names:
            raise UserError(f"stage {st.name!r} trains {st.train}, which selects no parameter of this model")
        if st.vf > 0 and "fuse.mlp.w2.weight" not in names:
            raise UserError(f"stage {st.name!r} has vf={st.vf} but freezes the encoder head; the adaptive VF weight needs it trainable")
        chosen = set(names)
        for n, p in self.generator_parameters():
            p.requires_grad_(n in chosen)
        self.stage = st
        self.disc.requires_grad_(False)
        for p in self._disc_params():  # fixed for the whole stage (DistributedDataParallel registers them once)
            p.requires_grad_(True)
        device = self.latent_mean.device
        if device.type != "meta":  # a dry run builds no weights
            if st.gan > 0 and self.disc["projected"].backbone is None:
                self.disc["projected"].attach(self._make_disc_backbone().to(device))
            if st.lpips > 0 and not self._lpips:
                self._lpips.append(self._make_lpips(device))
        self._train_names = names
        self._g_guard = SafeLossGuard(self.args.safe_loss_factor, self.args.safe_loss_warmup_images)
        self._d_guard = SafeLossGuard(0.0, 0, self.args.safe_loss_d_limit)
        self._fakes = {}

    # The safe-loss guards' state travels in training checkpoints, so a resumed stage skips the same steps.
    def get_extra_state(self) -> dict:
        return {"g_guard": vars(self._g_guard).copy(), "d_guard": vars(self._d_guard).copy()}

    def set_extra_state(self, state: dict) -> None:
        for name in ("g_guard", "d_guard"):
            if name in state:
                guard = getattr(self, "_" + name)
                guard.__dict__.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in state[name].items()})

    def _disc_params(self) -> list[nn.Parameter]:
        st = self.stage
        params = []
        if st.gan > 0:
            params += list(self.disc["projected"].heads.parameters())
        if st.patchgan > 0 or st.feature_matching > 0:
            params += list(self.disc["patchgan"].parameters())
        return params

    def training_phases(self, lr: float) -> list[Phase]:
        if self.stage is None:
            self.begin_stage(TrainStage("main", 0, lr, dataclasses.asdict(StageArgs())))
        betas = (float(self.args.betas[0]), float(self.args.betas[1]))
        named = dict(self.named_parameters())
        phases = [Phase("g", [named[n] for n in self._train_names], lr, betas=betas, ema=True)]
        d = self._disc_params()
        if d:
            phases.append(Phase("d", d, lr, betas=betas, ema=False))
        return phases

    # -- losses ---------------------------------------------------------------------------------
    def lpips(self) -> nn.Module:
        if not self._lpips:
            self._lpips.append(self._make_lpips(self.latent_mean.device))
        return self._lpips[0]

    def phase_loss(self, phase: str, images: torch.Tensor, labels: torch.Tensor, nimg: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.stage is None:
            raise RuntimeError("begin_stage() must run before training")
        if phase == "g":
            return self._generator_loss(images, nimg)
        if phase == "d":
            return self._discriminator_loss(images, nimg)
        raise ValueError(f"vfm-vae has phases 'g' and 'd', not {phase!r}")

    def _generator_loss(self, images: torch.Tensor, nimg: int) -> tuple[torch.Tensor, dict[str, float]]:
        st, a = self.stage, self.args
        eq = sample_equivariance(a) if st.equivariance else Equivariance()
        target = to_float(images)
        out = self._vfm_tokens(images, eq.image_scale)
        post = self._posterior(out)
        z = post.sample()
        logs: dict[str, float] = {}
        if st.vf > 0:
            feats = pool_tokens(out.layers[-1].float(), out.grid, tuple(z.shape[-2:]))
            vf, vf_logs = vf_loss(self.vf_proj(z), feats)
            logs.update(vf_logs)
        zt = transform_latent(z, eq.latent_scale, eq.rotation)
        size = (zt.shape[-2] * self.downsample, zt.shape[-1] * self.downsample)
        if eq.rotation % 2:
            size = size[::-1]  # the size before the rotation
        target = transform_image(target, size, eq.rotation, self.vfm.spec.interpolation)
        recon, lower = self.decode_multiscale(zt)
        terms: dict[str, torch.Tensor] = {"l1": (recon - target).abs().mean()}
        if st.lpips > 0:
            k = a.lpips_images or recon.shape[0]
            terms["lpips"] = self.lpips().distance(recon[:k], target[:k]).mean()
        if st.ssim > 0:
            terms["ssim"] = ssim_loss(recon, target)
        if st.multiscale_l1 > 0 and nimg < st.multiscale_images and lower:
            terms["ms_l1"] = multiscale_l1(lower, target, self.vfm.spec.interpolation)
        weights = {"l1": st.l1, "lpips": st.lpips, "ssim": st.ssim, "ms_l1": st.multiscale_l1}
        rec = sum(weights[k] * v for k, v in terms.items())
        total = rec
        if st.kl > 0:
            kl = post.kl().mean()
            total = total + st.kl * kl
            logs["kl"] = float(kl.detach())
        if st.vf > 0:
            lam = adaptive_weight(rec, vf, self.fuse.mlp.w2.weight, st.vf)
            total = total + lam * vf
            logs.update(vf=float(vf.detach()), vf_weight=float(lam))
        if st.gan > 0:
            g = hinge_g_loss(self.disc["projected"](recon))
            total = total + st.gan * g
            logs["gan"] = float(g.detach())
        if st.patchgan > 0 or st.feature_matching > 0:
            fake_feats = self.disc["patchgan"](recon)
            if st.patchgan > 0:
                pg = sum(lsgan_g_loss(f[-1]) for f in fake_feats) / len(fake_feats)
                total = total + st.patchgan * pg
                logs["patchgan"] = float(pg.detach())
            if st.feature_matching > 0:
                with torch.no_grad():
                    real_feats = self.disc["patchgan"](target)
                fm = feature_matching_loss(real_feats, fake_feats)
                total = total + st.feature_matching * fm
                logs["feature_matching"] = float(fm.detach())
        values = {k: float(v.detach()) for k, v in terms.items()}
        logs.update(values)
        logs.update(eq_latent_scale=eq.latent_scale, eq_rotation=float(eq.rotation), eq_image_scale=eq.image_scale)
        if st.gan > 0 or st.patchgan > 0 or st.feature_matching > 0:  # the discriminator phase reuses it
            if any(key[0] != nimg for key in self._fakes):
                self._fakes = {}  # a new step
            self._fakes[(nimg, images.data_ptr(), tuple(images.shape))] = (recon.detach(), target.detach())
        if self._g_guard.check(values, images.shape[0]):
            logs["unsafe_skips"] = float(self._g_guard.skipped)
            return total * float("nan"), logs  # the loop skips (and counts) a non-finite step
        logs["unsafe_skips"] = float(self._g_guard.skipped)
        return total, logs

    def _discriminator_loss(self, images: torch.Tensor, nimg: int) -> tuple[torch.Tensor, dict[str, float]]:
        st = self.stage
        cached = self._fakes.pop((nimg, images.data_ptr(), tuple(images.shape)), None)
        if cached is not None:
            fake, real = cached  # the reconstruction of this micro-batch in this step's generator phase
        else:
            with torch.no_grad():
                fake = self.decode(self.encode(images).sample())
            real = to_float(images)
        loss = fake.new_zeros(())
        logs: dict[str, float] = {}
        if st.gan > 0:
            d = self.disc["projected"]
            real_logits, fake_logits = d(real), d(fake)
            hinge = hinge_d_loss(real_logits, fake_logits)
            loss = loss + hinge
            logs.update(hinge=float(hinge.detach()), real_logit=float(real_logits.detach().mean()), fake_logit=float(fake_logits.detach().mean()))
        if st.patchgan > 0 or st.feature_matching > 0:
            pg = self.disc["patchgan"]
            real_feats, fake_feats = pg(real), pg(fake)
            ls = sum(lsgan_d_loss(r[-1], f[-1]) for r, f in zip(real_feats, fake_feats)) / len(real_feats)
            loss = loss + ls
            logs["patchgan"] = float(ls.detach())
        if self._d_guard.check({"d": float(loss.detach())}, images.shape[0]):
            logs["unsafe_skips"] = float(self._d_guard.skipped)
            return loss * float("nan"), logs
        return loss, logs

    # -- released weights -----------------------------------------------------------------------
    def _compare_vfm_tower(self, state: Mapping[str, Any]) -> None:
        """The released file carries the authors' frozen VFM under ``vfm_encoder.encoder.vision_model.``
        (SigLIP2); the model uses the VFM plugin's weights instead. Where the names meet, say on stderr
        if they differ (another checkpoint than the one the tokenizer was trained with)."""
        prefix = "vfm_encoder.encoder.vision_model."
        model = getattr(self.vfm, "model", None)
        mine = model.state_dict() if isinstance(model, nn.Module) else {}
        pairs = [(k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in mine]
        if not pairs or mine[pairs[0][0]].device.type == "meta":
            return
        differ = [k for k, v in pairs if v.shape != mine[k].shape or not torch.equal(v.to(mine[k]), mine[k])]
        if differ:
            print(f"[vfmbench] the released VFM-VAE file's frozen VFM differs from vfm {self.vfm.spec.name!r} "
                  f"(weights {self.vfm.weights_id}) in {len(differ)} of {len(pairs)} shared tensors, e.g. {differ[:2]}: "
                  "the latents will not match the release; pass the authors' VFM with --set vfm.weights=PATH",
                  file=sys.stderr, flush=True)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Also accepts the authors' generator checkpoint (a state dict, or a dict with ``G_ema``):
        keys are renamed by ``RELEASED_KEY_MAP``; parts the release does not hold (discriminator,
        latent statistics) keep their current values."""
        state = state_dict
        if isinstance(state.get("G_ema"), Mapping):
            state = state["G_ema"]
        if not is_released_layout(state):
            return super().load_state_dict(state, strict=strict, assign=assign)
        exponents = getattr(self.decoder, "exponents", None)
        if exponents is None:
            raise UserError("released VFM-VAE weights need the paper's decoder: use --decoder vfm-vae-decoder")
        self._compare_vfm_tower(state)
        mapped, unknown = convert_released(state, injection_rules(exponents, [int(i) for i in self.decoder.inject]))
        if unknown:
            raise UserError(f"the released checkpoint has {len(unknown)} keys no mapping rule knows, e.g. {unknown[:4]}")
        own = self.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items() if k in own and v.numel() != own[k].numel()]
        if wrong:
            raise UserError(f"the released checkpoint does not match tokenizer.args/decoder.args: {len(wrong)} tensors differ, e.g. {wrong[:3]}")
        mapped = {k: v.reshape(own[k].shape) if k in own else v for k, v in mapped.items()}
        keep = {k: v for k, v in own.items() if k.startswith(("disc.", "latent_")) or (k not in mapped and k.endswith("noise_const"))}
        if "vf_proj.weight" not in mapped:  # the released stage-3 file (use_vf_loss=False) has no VF projector
            keep["vf_proj.weight"] = own["vf_proj.weight"]
            print("[vfmbench] the released VFM-VAE weights hold no VF projector (ldm_adapter.linear_proj): "
                  "keeping the model's own vf_proj (used only by the VF alignment loss in training)", file=sys.stderr, flush=True)
        return super().load_state_dict({**keep, **mapped}, strict=strict, assign=assign)


# ---------------------------------------------------------------------------------------------
# Discriminator settings (checked when the tokenizer is built: a run's preflight builds it on the
# meta device, so bad values stop the run before anything is written)


@contextlib.contextmanager
def disc_errors(args: VfmVaeArgs):
    """Re-raise a VFM error about the discriminator backbone naming it and its own settings."""
    try:
        yield
    except UserError as e:
        msg = str(e).replace("`--set vfm.weights=PATH`", "`--set tokenizer.args.disc_vfm_weights=PATH`")
        msg = msg.replace("vfm.weights=", "tokenizer.args.disc_vfm_weights=")
        raise type(e)(f"discriminator backbone (tokenizer.args.disc_vfm={args.disc_vfm!r}): {msg}") from None


def trains_gan(args: VfmVaeArgs, cfg) -> bool:
    """Whether this run trains the tokenizer with a stage that uses the projected discriminator."""
    from vfmbench.build import tokenizer_is_trained

    stages = args.stages or [StageArgs()]
    return "tokenizer" in cfg.run.stages and tokenizer_is_trained(cfg) and any(s.gan > 0 for s in stages)


def check_disc_settings(args: VfmVaeArgs, spec, disc_cfg, backbone, gan: bool, locate: bool) -> None:
    """Hooks, resolution, crop probability and weights of the projected discriminator. A local
    weights path must exist. With ``locate`` (a run's preflight; not a dry run) and a stage that
    trains with the discriminator, weights are located, never read: without a local path, a tiny
    backbone has none and, offline, the library cache must hold them."""
    from pathlib import Path

    from vfmbench.errors import MissingWeightsError
    from vfmbench.vfm import is_offline

    name = f"the discriminator backbone {spec.name!r} ({disc_cfg.size}, {backbone.num_blocks} blocks)"
    hooks = [int(h) for h in args.disc_hooks]
    if not hooks or any(not 0 <= h <= backbone.num_blocks for h in hooks):
        raise UserError(f"tokenizer.args.disc_hooks={args.disc_hooks} must be a non-empty list of hidden-state indices of {name}: "
                        f"0..{backbone.num_blocks} (0 = patch embedding, k = output of block k)")
    if args.disc_resolution < backbone.patch_size:
        raise UserError(f"tokenizer.args.disc_resolution={args.disc_resolution} is smaller than one {backbone.patch_size} px patch of {name}")
    if not 0.0 <= args.disc_crop_p <= 1.0:
        raise UserError(f"tokenizer.args.disc_crop_p={args.disc_crop_p} is a probability: give a value in [0, 1]")
    if args.disc_vfm_weights and not Path(args.disc_vfm_weights).expanduser().exists():
        raise MissingWeightsError(f"tokenizer.args.disc_vfm_weights={args.disc_vfm_weights!r} ({name}) does not exist; "
                                  f"pass an existing file or folder ({spec.adapter.how_to_fetch(spec)})")
    if not (locate and gan and disc_cfg.pretrained) or args.disc_vfm_weights:
        return
    if disc_cfg.size != "full":
        raise MissingWeightsError(f"{name} at size {disc_cfg.size!r} has no published weights: pass your own with "
                                  "`--set tokenizer.args.disc_vfm_weights=PATH`, or use `--set vfm.pretrained=false` for a smoke run")
    if is_offline():
        found, looked = spec.adapter.cached(spec)
        if found is None:
            raise MissingWeightsError(
                f"pretrained weights of {name} were not found (looked in: {'; '.join(looked)}; offline). Fetch them "
                f"({spec.adapter.how_to_fetch(spec)}) and pass `--set tokenizer.args.disc_vfm_weights=PATH`")


# ---------------------------------------------------------------------------------------------
# Factory


def build(args: VfmVaeArgs, ctx) -> VfmVae:
    from vfmbench.config import VfmConfig
    from vfmbench.vfm import build_vfm, target_size

    cfg = ctx.config
    vfm = ctx.vfm()
    layers = args.layers or cfg.vfm.layers or list(vfm.default_layers)
    for layer in layers:
        vfm.hidden_index(layer)
    res = cfg.data.resolution
    token_grid = target_size(res, vfm.input_scale, vfm.patch_size) // vfm.patch_size
    latent_grid = res // args.downsample
    if latent_grid < 1 or token_grid < latent_grid or token_grid % latent_grid:
        raise UserError(
            f"the VFM gives a {token_grid}x{token_grid} token grid at {res} px, which is not a multiple of the "
            f"{latent_grid}x{latent_grid} latent grid; change vfm.input_scale or tokenizer.args.downsample"
        )
    if args.lpips_images < 0:
        raise UserError("tokenizer.args.lpips_images must be >= 0")
    if len(args.betas) != 2:
        raise UserError(f"tokenizer.args.betas must be [beta1, beta2], got {args.betas}")
    if not args.eq_latent_scales or not all(0 < s <= 1 for s in args.eq_latent_scales + args.eq_image_scales):
        raise UserError("tokenizer.args.eq_latent_scales must be non-empty and every equivariance scale must lie in (0, 1]")
    decoder = ctx.decoder(args.decompress_width, args.downsample, default="vfm-vae-decoder")
    with disc_errors(args):
        disc_spec = ctx.host.vfms.get(args.disc_vfm)
        # local weights are always used; else the discriminator follows vfm.pretrained (random init only in smoke runs)
        disc_cfg = VfmConfig(name=args.disc_vfm, size=cfg.vfm.size, pretrained=cfg.vfm.pretrained or bool(args.disc_vfm_weights),
                             weights=args.disc_vfm_weights)
        meta_backbone = build_vfm(disc_spec, disc_cfg, meta=True)  # the heads' width, without reading weights
    check_disc_settings(args, disc_spec, disc_cfg, meta_backbone, trains_gan(args, cfg), locate=ctx.preflight or not ctx.meta)
    device = ctx.device

    def make_disc_backbone():
        with disc_errors(args):
            return build_vfm(disc_spec, disc_cfg, cache_dir=ctx.cache_dir)

    def make_lpips(dev):
        from vfmbench.metrics.image import LpipsVgg

        return LpipsVgg(cfg.metrics.lpips_weights, smoke=cfg.run.smoke, cache_dir=ctx.cache_dir, device=dev or device)

    tok = VfmVae(args, vfm, decoder, layers, token_grid // latent_grid, meta_backbone.embed_dim, make_disc_backbone, make_lpips)
    if ctx.meta:
        tok.disc["projected"].attach(meta_backbone)
    return tok


@hookimpl
def register_tokenizers(register):
    register(
        TokenizerSpec(
            name="vfm-vae",
            description="Frozen VFM encoder + attention-projection KL latent head + VFM-VAE decoder, four-stage recipe (Bi et al. 2025)",
            factory=build,
            config=VfmVaeArgs,
            version="3",  # 3: the reference's discriminator (DINO v1, class-token readout, cutout 0.2, FM weight) and equivariance resize
            source="https://github.com/tianciB/VFM-VAE @ b3a752a (re-implemented; generator checked against its golden outputs)",
            paper="Bi et al. 2025, Vision Foundation Models Can Be Good Tokenizers for Latent Diffusion Models (arXiv 2510.18457)",
            license="Apache-2.0",
            latent_channels=32,
            downsample=16,
            uses_vfm=True,
            uses_decoder=True,
            default_decoder="vfm-vae-decoder",
            normalisation="per-channel",
        )
    )
