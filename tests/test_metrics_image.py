"""PSNR / SSIM against closed forms and a SciPy SSIM; LPIPS-VGG against torchmetrics' LPIPS module."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from vfmbench.errors import MissingWeightsError
from vfmbench.metrics import image


def _pair(seed, n=3, size=24):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    noise = torch.randint(-30, 31, a.shape, generator=g)
    return a, (a.int() + noise).clamp(0, 255).to(torch.uint8)


def test_psnr_closed_form_and_data_range():
    a, b = _pair(0)
    x, y = a.double().numpy() / 255, b.double().numpy() / 255
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(1)
    got = image.psnr_per_image(a, b)
    np.testing.assert_allclose(got, 10 * np.log10(1.0 / mse), rtol=1e-7)  # torchmetrics: float32 ln(10)
    # the paper's [-1, 1] images with data range 2 give the same numbers
    mse2 = (((2 * x - 1) - (2 * y - 1)) ** 2).reshape(len(x), -1).mean(1)
    np.testing.assert_allclose(got, 10 * np.log10(4.0 / mse2), rtol=1e-7)
    assert np.isinf(image.psnr_per_image(a, a)).all()


def _scipy_ssim(x, y, data_range=1.0):
    """SSIM with a Gaussian window (sigma 1.5, radius 5), mirrored borders, mean over channels and pixels."""
    def blur(z):
        return scipy.ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5, mode="mirror")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for xi, yi in zip(x, y):
        vals = []
        for xc, yc in zip(xi, yi):
            mx, my = blur(xc), blur(yc)
            vx = np.maximum(blur(xc * xc) - mx * mx, 0)
            vy = np.maximum(blur(yc * yc) - my * my, 0)
            cxy = blur(xc * yc) - mx * my
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
        out.append(np.mean(vals))
    return np.array(out)


def test_ssim_matches_scipy_reference():
    a, b = _pair(1)
    x, y = a.double().numpy() / 255, b.double().numpy() / 255
    got = image.ssim_per_image(a, b, "[0, 1]")
    np.testing.assert_allclose(got, _scipy_ssim(x, y), rtol=1e-9)
    assert (got < 1).all() and np.allclose(image.ssim_per_image(a, a, "[0, 1]"), 1.0)
    # VFM-VAE's protocol (the default): (x - 0.5) / 0.5 with data range 2; SSIM's luminance term is
    # not shift invariant, so this is another number
    vfm = image.ssim_per_image(a, b)
    np.testing.assert_allclose(vfm, _scipy_ssim(2 * x - 1, 2 * y - 1, data_range=2.0), rtol=1e-9)
    assert np.abs(vfm - got).max() > 1e-3 and np.allclose(image.ssim_per_image(a, a), 1.0)
    with pytest.raises(ValueError, match="value range"):
        image.ssim_per_image(a, b, "[0, 255]")


@pytest.fixture(scope="module")
def smoke_lpips(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty-th")))
        return image.LpipsVgg(smoke=True, batch_size=2)


def test_lpips_smoke_is_deterministic_and_labelled(smoke_lpips, tmp_path, monkeypatch):
    a, b = _pair(2, n=3, size=16)
    d = smoke_lpips(a, b)
    assert d.shape == (3,) and (d > 0).all()
    np.testing.assert_allclose(smoke_lpips(a, a), 0.0, atol=1e-12)
    assert smoke_lpips.weights_id.startswith("smoke-") and not smoke_lpips.is_official
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    scores, wid, official = image.lpips_per_image(a, b, smoke=True)
    assert wid == smoke_lpips.weights_id and not official
    np.testing.assert_allclose(scores, d, rtol=1e-5)  # batch 32 vs 2
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth") as e:
        image.LpipsVgg(smoke=False)
    assert "--set metrics.lpips_weights=PATH" in str(e.value)


def test_lpips_matches_torchmetrics_module(smoke_lpips):
    from torchmetrics.functional.image.lpips import _LPIPS

    ref = _LPIPS(pretrained=True, net="vgg", pnet_rand=True).eval()
    feats = smoke_lpips.features.state_dict()
    slices = [(1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30))]
    mapped = {f"net.slice{s}.{i}.{p}": feats[f"{i}.{p}"] for s, idx in slices for i in idx for p in ("weight", "bias") if f"{i}.{p}" in feats}
    missing, _ = ref.load_state_dict(mapped, strict=False)
    assert not [m for m in missing if m.startswith("net.")]
    a, b = _pair(3, n=2, size=16)
    with torch.no_grad():
        expected = ref(a.float() / 127.5 - 1, b.float() / 127.5 - 1).reshape(-1).double().numpy()
    np.testing.assert_allclose(smoke_lpips(a, b), expected, rtol=1e-4)


def test_lpips_loads_a_local_vgg16_file(smoke_lpips, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    hub = tmp_path / "th" / "hub" / "checkpoints" / image.VGG16_FILENAME
    hub.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in smoke_lpips.features.state_dict().items()}, hub)
    net = image.LpipsVgg(smoke=False, cache_dir=tmp_path / "cache")
    a, b = _pair(4, n=2, size=16)
    np.testing.assert_array_equal(net(a, b), smoke_lpips(a, b))
    assert len(net.weights_id) == 16 and not net.is_official  # not torchvision's file content
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(MissingWeightsError, match="not a torchvision VGG16"):
        image.LpipsVgg(weights=str(tmp_path / "other.pth"))
