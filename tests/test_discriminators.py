"""DiffAugment, local batch norm, the projected ViT discriminator and the multi-scale PatchGAN."""
import pytest
import torch

from vfmbench.config import VfmConfig
from vfmbench.vfm import build_vfm
from vfmbench_plugins.discriminators import (BatchNormLocal, DiscHead, MultiScalePatchGan, ProjectedDiscriminator, augment_color,
                                             augment_cutout, augment_translation, diff_augment)


pytestmark = pytest.mark.usefixtures("one_thread")


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[y, x] = img[y + dy, x + dx], zero outside (an independent, loop-based shift)."""
    h, w = img.shape[-2:]
    out = torch.zeros_like(img)
    for y in range(h):
        for x in range(w):
            if 0 <= y + dy < h and 0 <= x + dx < w:
                out[..., y, x] = img[..., y + dy, x + dx]
    return out


def test_translation_shifts_each_image_and_fills_zeros():
    torch.manual_seed(0)
    x = torch.arange(1.0, 65.0).view(1, 1, 8, 8).repeat(12, 2, 1, 1)
    y = augment_translation(x, ratio=0.25)  # shifts of up to 2 px
    found = set()
    for img in y:
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(img, shifted(x[0], dy, dx))]
        assert len(match) == 1
        found.add(match[0])
    assert len(found) > 1  # drawn per image


def test_cutout_zeroes_a_quarter_of_the_area_inside_the_image():
    torch.manual_seed(0)
    y = augment_cutout(torch.ones(64, 1, 16, 16), ratio=0.5)
    zeros = (y == 0).flatten(1).sum(1)
    assert zeros.max() == 64 and zeros.min() > 0  # an 8x8 square, clipped at the border


def test_color_is_per_image_and_differentiable():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    y = augment_color(x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    diffs = (y - x).detach().mean(dim=(1, 2, 3))
    assert diffs.unique().numel() == 4
    assert diff_augment(x.detach()).shape == x.shape


def test_batchnorm_local_uses_virtual_batches():
    x = torch.randn(16, 3, 5) * 4 + 2
    y = BatchNormLocal(3, virtual_bs=8)(x)
    for chunk in y.split(8):
        assert torch.allclose(chunk.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(chunk.var(dim=(0, 2), unbiased=False), torch.ones(3), atol=1e-3)
    assert BatchNormLocal(3, virtual_bs=8)(torch.randn(5, 3, 4, 4)).shape == (5, 3, 4, 4)  # ragged last group


def test_paper_discriminator_parameter_counts():
    with torch.device("meta"):
        heads = torch.nn.ModuleList(DiscHead(384) for _ in range(5))  # DINO ViT-S/16 width, 5 taps
        patchgan = MultiScalePatchGan(64, 3, 3)
    assert sum(p.numel() for p in heads.parameters()) == 7_386_245  # the brief's 7.4 M
    assert sum(p.numel() for p in patchgan.parameters()) == 8_299_587  # the brief's 8.3 M


def test_patchgan_returns_every_layer_per_scale():
    feats = MultiScalePatchGan(8, 3, 2)(torch.randn(2, 3, 32, 32))
    assert len(feats) == 2 and all(len(f) == 5 for f in feats)
    assert feats[0][-1].shape[1] == 1 and feats[1][0].shape[-1] < feats[0][0].shape[-1]


@pytest.fixture(scope="module")
def tiny_vit():
    from vfmbench.plugins import get_plugin_manager

    spec = get_plugin_manager().vfms.get("dinov2-s14")
    return build_vfm(spec, VfmConfig(name="dinov2-s14", size="tiny", pretrained=False))


def test_projected_discriminator_gradients_reach_the_image_not_the_vit(tiny_vit):
    torch.manual_seed(0)
    d = ProjectedDiscriminator(tiny_vit.embed_dim, [0, 2, 4], resolution=64)
    with pytest.raises(RuntimeError, match="attach"):
        d(torch.zeros(1, 3, 64, 64))
    d.attach(tiny_vit)
    x = torch.rand(4, 3, 96, 96, requires_grad=True) * 2 - 1
    x.retain_grad()
    logits = d(x)
    assert logits.shape == (4, 3 * 64)  # 3 taps x an 8x8 token grid at 64 px
    logits.mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_vit.parameters())
    assert all(p.grad is not None for p in d.heads.parameters())
    with pytest.raises(ValueError, match="out of range"):
        ProjectedDiscriminator(tiny_vit.embed_dim, [0, 9], resolution=64).attach(tiny_vit)


def test_cutout_default_is_vfm_vaes_0_2_square():
    """DiffAugment as VFM-VAE configures it: a square of round(0.2 * size) per image, centred at
    (cy, cx) drawn uniformly (rows first), zeroed where it falls inside the image; written as a loop."""
    h = w = 20
    side = int(h * 0.2 + 0.5)  # 4
    torch.manual_seed(3)
    y = augment_cutout(torch.ones(16, 1, h, w))
    torch.manual_seed(3)
    cy = torch.randint(0, h + (1 - side % 2), (16, 1, 1))
    cx = torch.randint(0, w + (1 - side % 2), (16, 1, 1))
    for i in range(16):
        want = torch.ones(h, w)
        top, left = int(cy[i]) - side // 2, int(cx[i]) - side // 2
        for r in range(max(0, top), min(h, top + side)):
            for c in range(max(0, left), min(w, left + side)):
                want[r, c] = 0.0
        assert torch.equal(y[i, 0], want), i
    assert int((y == 0).flatten(1).sum(1).max()) == side * side


def test_batchnorm_local_splits_a_batch_into_equal_groups():
    """StyleGAN-T's grouping: B = 12 with virtual batch 8 is two groups of 6 (not 8 + 4)."""
    x = torch.randn(12, 3, 5) * 3 + 1
    y = BatchNormLocal(3, virtual_bs=8)(x)
    for chunk in y.split(6):
        assert torch.allclose(chunk.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(chunk.var(dim=(0, 2), unbiased=False), torch.ones(3), atol=1e-3)


def test_projected_discriminator_adds_the_class_token_and_resizes_with_the_given_mode(tiny_vit):
    """Logits = heads(patch tokens + class token) on the image resized with the generator VFM's mode
    (here bilinear on a bicubic ViT) and normalised with the ViT's statistics; computed by hand."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    d = ProjectedDiscriminator(tiny_vit.embed_dim, [0, 2, 4], resolution=64, crop_p=0.0, augment=False, interpolation="bilinear")
    d.attach(tiny_vit)
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    small = F.interpolate((x + 1) / 2, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(tiny_vit.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_vit.spec.std).view(1, 3, 1, 1)
    assert tiny_vit.spec.interpolation == "bicubic" and tiny_vit.num_prefix_tokens == 1
    inp = (small - mean) / std
    assert torch.allclose(d._prepare(x), inp, atol=1e-6)
    with torch.no_grad():
        hidden, _ = tiny_vit.adapter.hidden_states(tiny_vit.model, inp, {0, 2, 4}, final=False)
        want = torch.cat([head((hidden[k][:, 1:] + hidden[k][:, :1]).transpose(1, 2)) for k, head in zip([0, 2, 4], d.heads)], 1)
        got = d(x)
        without = torch.cat([head(hidden[k][:, 1:].transpose(1, 2)) for k, head in zip([0, 2, 4], d.heads)], 1)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, without, atol=1e-3)
