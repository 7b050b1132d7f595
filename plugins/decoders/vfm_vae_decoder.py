"""Plugin: ``vfm-vae-decoder``, the VFM-VAE synthesis network (Bi et al. 2025, after StyleGAN-T).

A latent feature map ``h`` [B, C, g, g] (VFM-VAE passes its 512-channel decompressed latent) is
decoded by progressive blocks that each double the resolution, from ``g * downsample / 2**n`` to
``g * downsample`` (n = number of blocks; the paper's six blocks run 8 -> 256 px for g = 16):

* global style: w = MLP(normalize_2nd_moment(mean-pooled h)), equalised learning rate with a
  0.01 multiplier, shared by every modulated layer;
* spatial latent injection into the first blocks: h brought to the block's input resolution
  (pixel-unshuffle, same size, or a conv + pixel-shuffle), a separable conv + GroupNorm +
  activation, a 1x1 conv + GroupNorm, concatenated to the incoming features;
* separable upsampling: depthwise 3x3, pointwise to 4 C_out, pixel shuffle, then a fixed
  normalised binomial blur with replicate padding (GroupNorm before, or after for block 0);
* modulated ConvNeXt layers: depthwise k x k, optional constant noise, GroupNorm, a modulated
  and demodulated 1x1 conv C -> 4C (style a*b + c from w), GELU, 1x1 conv 4C -> C, layer scale;
* self-attention blocks (channel RMSNorm, a learned null key/value, zero-initialised output,
  then a 1x1-conv feed-forward) at the chosen low resolutions;
* a multi-scale skip path: s_i = up(s_{i-1}) + x_i and RGB_i = ToRGB(s_i) (modulated 1x1,
  no demodulation); the last RGB is the output, the earlier ones feed multi-scale losses.

``channels`` sets width and depth; ``layers``, ``kernel_sizes``, ``blur``, ``inject_*`` and
``attn_*`` configure each block. Defaults are the paper's 256 px decoder (126.2 M parameters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vfmbench import perf
from vfmbench.errors import UserError
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import DecoderSpec
from vfmbench_plugins.layers import SpeedSwitches

BLUR_TAPS = {3: (1.0, 2.0, 1.0), 5: (1.0, 4.0, 6.0, 4.0, 1.0)}


@dataclass
class VfmVaeDecoderArgs:
    channels: list[int] = field(default_factory=lambda: [512, 512, 512, 512, 256, 128])  # per block, lowest resolution first
    layers: list[int] = field(default_factory=lambda: [7, 7, 7, 7, 5, 5])  # modulated ConvNeXt layers per block
    kernel_sizes: list[int] = field(default_factory=lambda: [5, 5, 7, 7, 7, 7])  # depthwise kernel per block
    blur: list[int] = field(default_factory=lambda: [3, 3, 3, 5, 5, 5])  # blur taps after upsampling: 3 = [1,2,1], 5 = [1,4,6,4,1]
    inject_blocks: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # blocks that receive the latent map (must include 0)
    inject_channels: list[int] = field(default_factory=lambda: [512, 256, 128, 128])  # injected width, one per inject_blocks entry
    inject_activation: str = "lrelu"  # lrelu | gelu | silu
    attn_blocks: list[int] = field(default_factory=lambda: [0, 1, 2])  # blocks with self-attention
    attn_depth: int = 2  # attention + feed-forward pairs per attention block
    attn_heads: int = 8
    attn_ff_mult: int = 4
    w_dim: int = 512  # global style width
    mapping_layers: int = 2
    mapping_lr_mult: float = 0.01
    layer_scale_init: float = 1e-5
    const_noise: bool = True  # StyleGAN-T's constant per-layer noise (present in the released 256 px weights)
    noise_resolution: int = 256  # output size the constant noise maps are laid out for (resampled to any other)


# ---------------------------------------------------------------------------------------------
# Building blocks


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def _activation(name: str) -> nn.Module:
    acts = {"lrelu": lambda: nn.LeakyReLU(0.2), "gelu": nn.GELU, "silu": nn.SiLU}
    if name not in acts:
        raise UserError(f"inject_activation must be one of {', '.join(acts)}, got {name!r}")
    return acts[name]()


def _gn(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with min(32, groups) groups (at least one)."""
    return nn.GroupNorm(max(1, min(32, groups)), channels)


class EqualLinear(nn.Module):
    """Linear layer with StyleGAN's equalised learning rate: weights are stored as N(0, 1) / lr_mult
    and scaled by lr_mult / sqrt(fan_in) at run time; the bias by lr_mult."""

    def __init__(self, in_features: int, out_features: int, lr_mult: float = 1.0, bias_init: float = 0.0, lrelu: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full((out_features,), bias_init / lr_mult))
        self.weight_gain = lr_mult / math.sqrt(in_features)
        self.bias_gain = lr_mult
        self.lrelu = lrelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, 0.2) if self.lrelu else x


class StyleSplit(nn.Module):
    """Style from w: one affine layer gives (a, b, c) and the style is a * b + c (bias init 1)."""

    def __init__(self, w_dim: int, channels: int):
        super().__init__()
        self.proj = EqualLinear(w_dim, 3 * channels, bias_init=1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a, b, c = self.proj(w).chunk(3, dim=1)
        return a * b + c


def modulated_conv1x1(x: torch.Tensor, weight: torch.Tensor, style: torch.Tensor, demodulate: bool) -> torch.Tensor:
    """1x1 convolution with per-sample input scaling by ``style`` [B, I] and, optionally, output
    demodulation to unit expected norm (scaling the activations is equivalent to scaling the weights)."""
    w = weight.flatten(1)  # [O, I]
    y = torch.einsum("oi,bihw->bohw", w, x * style[:, :, None, None])
    if demodulate:
        d = (style.square() @ w.square().t() + 1e-8).rsqrt()  # [B, O]
        y = y * d[:, :, None, None]
    return y


class FixedBlur(nn.Module):
    """Depthwise normalised binomial blur with replicate padding (a fixed, non-learned filter)."""

    def __init__(self, channels: int, taps: int):
        super().__init__()
        if taps not in BLUR_TAPS:
            raise UserError(f"blur taps must be one of {sorted(BLUR_TAPS)}, got {taps}")
        k = torch.tensor(BLUR_TAPS[taps])
        k2 = torch.outer(k, k)
        self.register_buffer("kernel", (k2 / k2.sum()).expand(channels, 1, taps, taps).clone(), persistent=False)
        self.pad = taps // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad,) * 4, mode="replicate")
        return F.conv2d(x, self.kernel.to(x.dtype), groups=x.shape[1])


class SepUpsample(nn.Module):
    """x2 upsampling: [GroupNorm] -> depthwise 3x3 -> pointwise to 4 C_out -> pixel shuffle -> [GroupNorm] -> blur."""

    def __init__(self, cin: int, cout: int, blur: int, norm_first: bool = True):
        super().__init__()
        self.norm_first = norm_first
        self.norm = _gn(cin, cin // 4) if norm_first else _gn(cout, cout // 4)
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, 4 * cout, 1, bias=False)
        self.blur = FixedBlur(cout, blur)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = self.norm(x)
        x = F.pixel_shuffle(self.pointwise(self.depthwise(x)), 2)
        if not self.norm_first:
            x = self.norm(x)
        return self.blur(x)


class ConvNeXtLayer(nn.Module):
    """Modulated ConvNeXt layer with a residual: dw k x k -> (+ const noise) -> GroupNorm ->
    modulated/demodulated 1x1 C -> 4C -> GELU -> 1x1 4C -> C -> layer scale."""

    def __init__(self, channels: int, w_dim: int, kernel: int, layer_scale: float, noise_size: int):
        super().__init__()
        c = channels
        self.affine = StyleSplit(w_dim, c)
        self.dwconv = nn.Conv2d(c, c, kernel, padding=kernel // 2, groups=c)
        self.norm = _gn(c, c // 4)
        self.pw1_weight = nn.Parameter(torch.empty(4 * c, c, 1, 1))
        self.pw1_bias = nn.Parameter(torch.zeros(1, 4 * c, 1, 1))
        self.pwconv2 = nn.Conv2d(4 * c, c, 1)
        self.gamma = nn.Parameter(torch.full((1, c, 1, 1), float(layer_scale)))
        if noise_size:
            self.register_buffer("noise_const", torch.randn(noise_size, noise_size))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        else:
            self.noise_const = None
        for t in (self.dwconv.weight, self.pw1_weight, self.pwconv2.weight):
            nn.init.trunc_normal_(t, std=0.02)
        nn.init.zeros_(self.dwconv.bias)
        nn.init.zeros_(self.pwconv2.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x)
        if self.noise_const is not None:
            noise = self.noise_const[None, None] * self.noise_strength
            if noise.shape[-2:] != h.shape[-2:]:
                noise = F.interpolate(noise, size=h.shape[-2:], mode="bilinear", align_corners=False)
            h = h + noise
        h = modulated_conv1x1(self.norm(h), self.pw1_weight, self.affine(w), demodulate=True) + self.pw1_bias
        h = self.pwconv2(F.gelu(h))
        return x + self.gamma * h


class ChannelRMSNorm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class NullKvSelfAttention(nn.Module):
    """Multi-head self-attention over positions with one learned null key/value per head (so a
    query can attend to nothing) and a zero-initialised output projection."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise UserError(f"attention width {channels} is not divisible by attn_heads={heads}")
        self.heads, self.head_dim = heads, channels // heads
        self.norm = ChannelRMSNorm(channels)
        self.to_q = nn.Conv2d(channels, channels, 1, bias=False)
        self.to_k = nn.Conv2d(channels, channels, 1, bias=False)
        self.to_v = nn.Conv2d(channels, channels, 1, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, self.head_dim) * 0.02)
        self.to_out = nn.Conv2d(channels, channels, 1, bias=False)
        nn.init.zeros_(self.to_out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        x = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, self.heads, self.head_dim, hh * ww).transpose(2, 3)  # [B, h, N, d]

        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        nk, nv = (t[None, :, None, :].expand(b, -1, 1, -1) for t in self.null_kv)
        out = F.scaled_dot_product_attention(q, torch.cat([nk, k], dim=2), torch.cat([nv, v], dim=2))
        return self.to_out(out.transpose(2, 3).reshape(b, c, hh, ww))


class FeedForward(nn.Module):
    def __init__(self, channels: int, mult: int):
        super().__init__()
        self.norm = ChannelRMSNorm(channels)
        self.fc1 = nn.Conv2d(channels, channels * mult, 1)
        self.fc2 = nn.Conv2d(channels * mult, channels, 1)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, heads: int, ff_mult: int):
        super().__init__()
        self.attn = NullKvSelfAttention(channels, heads)
        self.ff = FeedForward(channels, ff_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ff(x)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB without demodulation; the style is scaled by 1/sqrt(C)."""

    def __init__(self, channels: int, w_dim: int, out_channels: int = 3):
        super().__init__()
        self.affine = StyleSplit(w_dim, channels)
        self.weight = nn.Parameter(0.1 * torch.randn(out_channels, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.gain = 1.0 / math.sqrt(channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return modulated_conv1x1(x, self.weight, self.affine(w) * self.gain, demodulate=False) + self.bias


class LatentInjection(nn.Module):
    """The latent map h (grid g) brought to a block's input grid g * 2**e: pixel-unshuffle (e < 0),
    as is (e = 0), or widened and pixel-shuffled (e > 0), through a separable conv + GroupNorm +
    activation and a 1x1 conv + GroupNorm."""

    def __init__(self, cin: int, cout: int, exponent: int, activation: str):
        super().__init__()
        self.exponent = exponent
        width = cin * 4 ** (-exponent) if exponent < 0 else cin
        mid = cout * 4**exponent if exponent > 0 else cout
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.pointwise = nn.Conv2d(width, mid, 1, bias=False)
        self.norm1 = _gn(mid, mid)
        self.act = _activation(activation)
        self.proj = nn.Conv2d(cout, cout, 1, bias=False)
        self.norm2 = _gn(cout, cout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.exponent < 0:
            r = 2 ** (-self.exponent)
            if h.shape[-1] % r or h.shape[-2] % r:
                raise ValueError(f"latent grid {tuple(h.shape[-2:])} is not divisible by the injection unshuffle factor {r}")
            h = F.pixel_unshuffle(h, r)
        h = self.act(self.norm1(self.pointwise(self.depthwise(h))))
        if self.exponent > 0:
            h = F.pixel_shuffle(h, 2**self.exponent)
        return self.norm2(self.proj(h))


class SynthesisBlock(nn.Module):
    def __init__(self, index: int, cin: int, cout: int, cprev: int, a: VfmVaeDecoderArgs, noise_size: int):
        super().__init__()
        self.upsample = SepUpsample(cin, cout, a.blur[index], norm_first=index > 0)
        self.layers = nn.ModuleList(
            ConvNeXtLayer(cout, a.w_dim, a.kernel_sizes[index], a.layer_scale_init, noise_size) for _ in range(a.layers[index])
        )
        depth = a.attn_depth if index in a.attn_blocks else 0
        self.attn = nn.ModuleList(AttentionBlock(cout, a.attn_heads, a.attn_ff_mult) for _ in range(depth))
        self.skip_up = SepUpsample(cprev, cout, a.blur[index]) if index > 0 else None
        self.torgb = ToRGB(cout, a.w_dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.upsample(x)
        for layer in self.layers:
            x = layer(x, w)
        for blk in self.attn:
            x = blk(x)
        skip = x if self.skip_up is None else self.skip_up(skip) + x
        return x, skip, self.torgb(skip, w)


# ---------------------------------------------------------------------------------------------
# The decoder


class VfmVaeDecoder(SpeedSwitches, nn.Module):
    """Latent feature map [B, C, g, g] -> image [B, 3, g * downsample, g * downsample] in about [-1, 1].

    ``set_grad_checkpointing(True)`` recomputes each synthesis block (and latent injection) in the
    backward pass; ``set_channels_last(True)`` keeps weights and activations in NHWC.
    """


    def __init__(self, in_channels: int, downsample: int, a: VfmVaeDecoderArgs):
        super().__init__()
        n = len(a.channels)
        for name in ("layers", "kernel_sizes", "blur"):
            if len(getattr(a, name)) != n:
                raise UserError(f"decoder.args.{name} has {len(getattr(a, name))} entries; channels has {n} (one per block)")
        if len(a.inject_channels) != len(a.inject_blocks):
            raise UserError("decoder.args.inject_channels needs one width per inject_blocks entry")
        if 0 not in a.inject_blocks or any(not 0 <= i < n for i in a.inject_blocks + a.attn_blocks):
            raise UserError(f"decoder.args.inject_blocks must include block 0, and every block index must lie in 0..{n - 1}")
        log_ds = int(round(math.log2(downsample)))
        if 2**log_ds != downsample:
            raise UserError(f"vfm-vae-decoder needs a power-of-two downsampling factor, got {downsample}")
        self.num_blocks = n
        # Block i's input grid is the latent grid times 2**(log2(downsample) - n + i).
        self.exponents = [log_ds - n + i for i in range(n)]
        self.mapping = nn.Sequential(
            *[EqualLinear(in_channels if j == 0 else a.w_dim, a.w_dim, lr_mult=a.mapping_lr_mult, lrelu=j < a.mapping_layers - 1)
              for j in range(a.mapping_layers)]
        )
        inject = dict(zip(a.inject_blocks, a.inject_channels))
        self.inject = nn.ModuleDict(
            {str(i): LatentInjection(in_channels, c, self.exponents[i], a.inject_activation) for i, c in sorted(inject.items())}
        )
        blocks = []
        for i in range(n):
            cin = (a.channels[i - 1] if i > 0 else 0) + inject.get(i, 0)
            noise = a.noise_resolution >> (n - 1 - i) if a.const_noise else 0
            blocks.append(SynthesisBlock(i, cin, a.channels[i], a.channels[i - 1] if i > 0 else 0, a, noise))
        self.blocks = nn.ModuleList(blocks)

    def style(self, h: torch.Tensor) -> torch.Tensor:
        return self.mapping(normalize_2nd_moment(h.mean(dim=(2, 3))))

    def forward_multiscale(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(final image, RGB outputs of the earlier blocks from the lowest resolution up)."""
        h = perf.channels_last_input(h, self.channels_last)
        w = self.style(h)
        x = skip = None
        rgbs = []
        for i, block in enumerate(self.blocks):
            if str(i) in self.inject:
                z = self.run(self.inject[str(i)], h)
                x = z if x is None else torch.cat([x, z], dim=1)
            x, skip, rgb = self.run(block, x, skip, w)
            rgbs.append(rgb.contiguous() if self.channels_last else rgb)
        return rgbs[-1], rgbs[:-1]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.forward_multiscale(h)[0]

    def trainable_groups(self) -> dict[str, list[str]]:
        """Module-name prefixes of the parts a training stage can select: the style mapping, the
        synthesis network, and its high-resolution half (the upper half of the blocks with their
        latent injections; the paper's 64-256 px blocks)."""
        high = range(self.num_blocks // 2, self.num_blocks)
        return {
            "mapping": ["mapping."],
            "synthesis": ["blocks.", "inject."],
            "high": [f"blocks.{i}." for i in high] + [f"inject.{i}." for i in high if str(i) in self.inject],
        }


def build(args: VfmVaeDecoderArgs, latent_channels: int, downsample: int) -> VfmVaeDecoder:
    return VfmVaeDecoder(latent_channels, downsample, args)


@hookimpl
def register_decoders(register):
    register(
        DecoderSpec(
            name="vfm-vae-decoder",
            description="VFM-VAE synthesis network: style mapping, latent injection, modulated ConvNeXt + null-KV attention, multi-scale skip RGB",
            factory=build,
            config=VfmVaeDecoderArgs,
            version="1",
            source="https://github.com/tianciB/VFM-VAE (re-implemented from the paper's description)",
            paper="Bi et al. 2025, Vision Foundation Models Can Be Good Tokenizers for Latent Diffusion Models (arXiv 2510.18457)",
            license="Apache-2.0",
        )
    )
