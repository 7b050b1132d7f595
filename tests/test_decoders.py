"""Decoders of the VFM-VAE ablation axis: shapes, parameter counts, and their building blocks
against independent computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from vfmbench.errors import UserError
from vfmbench_plugins.decoders.sd_vae_decoder import SdVaeDecoder, SdVaeDecoderArgs, SdVaeMsfDecoderArgs
from vfmbench_plugins.decoders.vfm_vae_decoder import (ConvNeXtLayer, EqualLinear, FixedBlur, NullKvSelfAttention,
                                                       VfmVaeDecoder, VfmVaeDecoderArgs, modulated_conv1x1)

TINY = dict(channels=[32, 32, 16, 8], layers=[1, 1, 1, 1], kernel_sizes=[3, 3, 5, 5], blur=[3, 3, 3, 5],
            inject_blocks=[0, 1], inject_channels=[16, 8], attn_blocks=[0], attn_depth=1, attn_heads=4, w_dim=16,
            noise_resolution=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_paper_decoder_parameter_count_matches_the_released_generator():
    with torch.device("meta"):
        d = VfmVaeDecoder(512, 16, VfmVaeDecoderArgs())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # The brief's count of the released generator: mapping 525,312; synthesis 125,712,312.
    assert count(d.mapping) == 525_312
    assert count(d.inject) == 5_512_960
    assert [count(b) for b in d.blocks] == [28_462_090, 30_043_402, 29_865_866, 23_565_194, 6_120_200, 2_142_600]
    assert d.exponents == [-2, -1, 0, 1, 2, 3]  # block 0 input 4x4 from 16x16 (unshuffle 4) ... block 3 from a x2 shuffle


def test_vfm_vae_decoder_shapes_and_multiscale_outputs():
    torch.manual_seed(0)
    d = VfmVaeDecoder(24, 16, VfmVaeDecoderArgs(**TINY))
    img, lower = d.forward_multiscale(torch.randn(2, 24, 4, 4))
    assert img.shape == (2, 3, 64, 64)
    assert [t.shape[-1] for t in lower] == [8, 16, 32]
    # Fully convolutional over the latent size (equivariance): a 2x2 latent decodes to 32 px.
    assert d(torch.randn(1, 24, 2, 2)).shape == (1, 3, 32, 32)
    assert torch.equal(d(torch.zeros(1, 24, 4, 4)), d.forward_multiscale(torch.zeros(1, 24, 4, 4))[0])


def test_vfm_vae_decoder_groups_name_existing_parameters():
    d = VfmVaeDecoder(24, 16, VfmVaeDecoderArgs(**TINY))
    names = [n for n, _ in d.named_parameters()]
    groups = d.trainable_groups()
    for key, prefixes in groups.items():
        for p in prefixes:
            assert any(n.startswith(p) for n in names), (key, p)
    assert groups["high"] == ["blocks.2.", "blocks.3."]  # injection only at blocks 0-1 in this config


def test_decoder_argument_errors():
    with pytest.raises(UserError, match="one per block"):
        VfmVaeDecoder(8, 16, VfmVaeDecoderArgs(**{**TINY, "layers": [1, 1]}))
    with pytest.raises(UserError, match="include block 0"):
        VfmVaeDecoder(8, 16, VfmVaeDecoderArgs(**{**TINY, "inject_blocks": [1], "inject_channels": [8]}))
    with pytest.raises(UserError, match="channel_mult"):
        SdVaeDecoder(8, 16, SdVaeDecoderArgs(base_channels=8, channel_mult=[1, 2]))


def test_modulated_conv_matches_per_sample_weights():
    g = torch.Generator().manual_seed(0)
    x, weight, style = torch.randn(2, 5, 3, 3, generator=g), torch.randn(7, 5, 1, 1, generator=g), torch.randn(2, 5, generator=g)
    y = modulated_conv1x1(x, weight, style, demodulate=True)
    for b in range(2):  # StyleGAN2: w' = w * s, then w'' = w' / ||w'|| over inputs
        w = weight[:, :, 0, 0] * style[b][None]
        w = w / (w.square().sum(1, keepdim=True) + 1e-8).sqrt()
        assert torch.allclose(y[b], torch.einsum("oi,ihw->ohw", w, x[b]), atol=1e-5)
    y = modulated_conv1x1(x, weight, style, demodulate=False)
    assert torch.allclose(y[1], torch.einsum("oi,ihw->ohw", weight[:, :, 0, 0] * style[1][None], x[1]), atol=1e-5)


def test_equalised_linear_and_blur():
    lin = EqualLinear(4, 3, lr_mult=0.01, bias_init=1.0)
    x = torch.randn(2, 4)
    expected = x @ (lin.weight * 0.01 / 2.0).t() + lin.bias * 0.01
    assert torch.allclose(lin(x), expected, atol=1e-6) and torch.allclose(lin.bias * 0.01, torch.ones(3))
    blur = FixedBlur(2, 5)
    assert torch.allclose(blur(torch.full((1, 2, 6, 6), 3.0)), torch.full((1, 2, 6, 6), 3.0))  # normalised, replicate pad
    k = torch.tensor([1.0, 4, 6, 4, 1])
    assert torch.allclose(blur.kernel[0, 0], torch.outer(k, k) / 256)


def test_convnext_layer_starts_near_identity_and_attention_is_zero_initialised():
    torch.manual_seed(0)
    layer = ConvNeXtLayer(8, 16, 3, layer_scale=1e-5, noise_size=8)
    x, w = torch.randn(2, 8, 8, 8), torch.randn(2, 16)
    assert (layer(x, w) - x).abs().max() < 1e-3
    attn = NullKvSelfAttention(8, 2)
    assert torch.equal(attn(x), torch.zeros_like(x))
    # With the output projection set, the null key/value take part: one extra key per head.
    torch.nn.init.eye_(attn.to_out.weight.view(8, 8))
    q = attn.to_q(attn.norm(x)).view(2, 2, 4, 64).transpose(2, 3)
    k = attn.to_k(attn.norm(x)).view(2, 2, 4, 64).transpose(2, 3)
    v = attn.to_v(attn.norm(x)).view(2, 2, 4, 64).transpose(2, 3)
    k = torch.cat([attn.null_kv[0][None, :, None].expand(2, -1, 1, -1), k], 2)
    v = torch.cat([attn.null_kv[1][None, :, None].expand(2, -1, 1, -1), v], 2)
    ref = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(4), -1) @ v
    assert torch.allclose(attn(x), ref.transpose(2, 3).reshape(2, 8, 8, 8), atol=1e-5)


@pytest.mark.parametrize("args", [SdVaeDecoderArgs(base_channels=8, channel_mult=[1, 1, 2, 2, 2], blocks=1),
                                  SdVaeMsfDecoderArgs(base_channels=8, channel_mult=[1, 1, 2, 2, 2], blocks=1)])
def test_sd_vae_decoders(args):
    torch.manual_seed(0)
    d = SdVaeDecoder(12, 16, args)
    img, lower = d.forward_multiscale(torch.randn(2, 12, 4, 4))
    assert img.shape == (2, 3, 64, 64)
    if args.multiscale:
        assert [t.shape[-1] for t in lower] == [4, 8, 16, 32] and set(d.inject) == {"1", "2", "3"}
        feats = []
        hooks = [lv.register_forward_hook(lambda m, i, o: feats.append(o)) for lv in d.levels]
        h = torch.randn(1, 12, 4, 4)
        img, lower = d.forward_multiscale(h)
        for hk in hooks:
            hk.remove()
        # the skip path: each level's image is the upsampled previous image plus its own ToRGB
        up = F.interpolate(lower[0], scale_factor=2.0, mode="bilinear", align_corners=False)
        assert torch.allclose(lower[1], up + d.torgb[1](feats[1]), atol=1e-5)
        assert torch.allclose(lower[0], d.torgb[0](feats[0]), atol=1e-6)
    else:
        assert lower == [] and not d.inject
    names = [n for n, _ in d.named_parameters()]
    assert all(any(n.startswith(p) for n in names) for p in d.trainable_groups()["high"])
