"""`vfmbench eval alignment` protocol pieces: the seeded image sample, the reference's per-image
seeded transforms (noise, rotation + scale fed at the reduced size), and the diffusion block
features (REG gets its class token; only patch tokens are pooled)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import perturb

from vfmbench import alignment_eval as ae
from vfmbench.errors import UserError
from vfmbench_plugins.diffusion.sit import SiTArgs, factory


def test_sample_is_seeded_random_not_a_prefix():
    a = ae.sample_indices(50_000, 1000, 42)
    assert len(a) == 1000 == len(set(a.tolist())) and torch.equal(a, a.sort().values)
    assert torch.equal(a, ae.sample_indices(50_000, 1000, 42)) and not torch.equal(a, ae.sample_indices(50_000, 1000, 43))
    # a class-sorted split (50 per class): the first 1000 cover 20 classes, the sample nearly all 1000
    assert len(set((a // 50).tolist())) > 600 and a.max() > 45_000
    assert len(ae.sample_indices(30, 100, 0)) == 30
    with pytest.raises(UserError):
        ae.sample_indices(30, 0, 0)


def _reference_noise(img_hwc, level, idx, seed):
    """The reference preprocess.py's apply_noise, written from its description (global numpy seed)."""
    np.random.seed(seed + idx)
    noise = np.random.normal(0, level, img_hwc.shape).astype(np.float32)
    return np.clip(img_hwc + noise * 255.0, 0, 255).astype(np.uint8)


def test_noise_matches_the_reference_per_image_seeding():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
    positions = torch.tensor([5, 6, 7])
    out = ae.noisy(images, 0.1, positions, 42)
    for im, o, pos in zip(images, out, positions.tolist()):
        ref = _reference_noise(im.permute(1, 2, 0).numpy(), 0.1, pos, 42)
        np.testing.assert_array_equal(o.permute(1, 2, 0).numpy(), ref)
    # the image at position 6 gets the same noise alone as in a batch: per-image seeds
    assert torch.equal(ae.noisy(images[1:2], 0.1, positions[1:2], 42)[0], out[1])


def test_equivariance_params_as_the_reference():
    seen = set()
    for pos in range(200):
        np.random.seed(42 + pos)
        rot, sc = int(np.random.choice([0, 90, 180, 270])), float(np.random.choice([1.0, 0.75, 0.5, 0.25]))
        assert ae.equivariance_params(pos, 42) == (rot, sc)
        seen.add((rot, sc))
    assert len(seen) == 16


def test_rotation_and_reduced_size():
    g = torch.Generator().manual_seed(1)
    im = torch.randint(0, 256, (1, 3, 8, 8), generator=g, dtype=torch.uint8)
    for rot in (0, 90, 180, 270):
        ref = np.rot90(im[0].permute(1, 2, 0).numpy(), k=rot // 90, axes=(0, 1))
        np.testing.assert_array_equal(ae.rotate_downscale(im, rot, 8)[0].permute(1, 2, 0).numpy(), ref)
    assert [ae.reduced_size(256, s, 16) for s in ae.SCALES] == [256, 192, 128, 64]
    assert [ae.reduced_size(64, s, 16) for s in ae.SCALES] == [64, 48, 32, 16]
    flat = torch.full((1, 3, 64, 64), 77, dtype=torch.uint8)
    small = ae.rotate_downscale(flat, 90, 32)
    assert small.shape == (1, 3, 32, 32) and small.dtype == torch.uint8 and (small == 77).all()


def test_transformed_sets_feed_scaled_images_at_their_reduced_size():
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (24, 3, 64, 64), generator=g, dtype=torch.uint8)
    positions = torch.arange(100, 124)
    sets = ae.transformed_sets(images, positions, 42, 16)
    assert len(sets) == len(ae.NOISE_SIGMAS) + 1
    eq = sets[-1]
    rows = torch.cat([r for r, _ in eq]).sort().values
    assert torch.equal(rows, torch.arange(24))  # every image once
    for r, x in eq:
        for i in r.tolist():
            rot, sc = ae.equivariance_params(100 + i, 42)
            assert x.shape[-1] == ae.reduced_size(64, sc, 16)
    assert {x.shape[-1] for _, x in eq} > {64}  # some images really are smaller
    # features of groups are put back in batch order
    feats = ae._ordered(eq, lambda x: x.float().mean(dim=(1, 2, 3))[:, None], 24)
    for r, x in eq:
        torch.testing.assert_close(feats[r, 0], x.float().mean(dim=(1, 2, 3)))


def _sit(align):
    torch.manual_seed(0)
    args = SiTArgs(size="tiny", width=32, depth=3, heads=2, align=align, align_dim=8, align_depth=2, projector_dim=16)
    m = factory(args, (4, 4, 4), 10)
    perturb(m)
    return m.eval()


def test_reg_block_features_get_the_class_token_and_pool_patches_only():
    model = _sit("reg")
    z = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    images = torch.zeros(5, 3, 16, 16, dtype=torch.uint8)
    cls = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError):  # what the old evaluation did: no class token
        model(z, torch.full((5,), 0.5), torch.full((5,), 10))
    full: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: full.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, b in enumerate(model.blocks, 1)]
    feats = ae.BlockFeatures(model, lambda x: cls)(z, images, torch.Generator().manual_seed(5))
    for h in hooks:
        h.remove()
    assert sorted(feats) == [1, 2, 3]
    for k, f in feats.items():
        assert full[k].shape[1] == 17 and f.shape == (5, 32)  # class token + 16 patches
        torch.testing.assert_close(f, full[k][:, 1:].mean(1))
        assert not torch.allclose(f, full[k].mean(1))
    # the class token is used: another one changes the features
    other = ae.BlockFeatures(model, lambda x: cls + 3.0)(z, images, torch.Generator().manual_seed(5))
    assert not torch.allclose(other[3], feats[3])
    with pytest.raises(ValueError):
        ae.BlockFeatures(model, None)


def test_plain_block_features_pool_every_token():
    model = _sit("none")
    z = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    a = ae.BlockFeatures(model, None)(z, torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.Generator().manual_seed(7))
    b = ae.BlockFeatures(model, None)(z, torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.Generator().manual_seed(7))
    assert sorted(a) == [1, 2, 3] and all(torch.equal(a[k], b[k]) for k in a) and a[1].shape == (4, 32)
