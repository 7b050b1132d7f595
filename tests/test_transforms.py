"""vfmbench.transforms: VFM-VAE's training augmentation and reconstruction-eval transforms, checked
against independent computations (PIL directly, torchvision), and their use by imagefolder, the
runner (training view, protocol field) and the vfm-vae-paper preset."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfmbench import transforms
from vfmbench.config import DataConfig
from vfmbench.errors import UserError
from vfmbench_plugins.datasets import imagefolder


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imnet"
    sizes = {"train": {"a": [(300, 200), (120, 260)], "b": [(256, 256), (180, 400)]}, "val": {"a": [(320, 240)], "b": [(200, 333)]}}
    seed = 0
    for split, classes in sizes.items():
        for cls, images in classes.items():
            (root / split / cls).mkdir(parents=True)
            for j, (w, h) in enumerate(images):
                noise_image(w, h, seed).save(root / split / cls / f"im{j}.png")
                seed += 1
    return root


def test_random_crop_is_pil_crop_lanczos_flip_with_the_same_draws():
    im = noise_image(310, 230, 3)
    seen_flips, seen_sides = set(), set()
    for seed in range(12):
        got = transforms.vfm_vae_random_crop(im, 64, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)  # the same draws, in the reference's order: ratio, top, left, flip
        ratio = rng.uniform(0.5, 1.0)
        side = int(230 * ratio)
        top, left = int(rng.integers(0, 230 - side + 1)), int(rng.integers(0, 310 - side + 1))
        flip = rng.uniform() < 0.5
        arr = np.asarray(im)[top : top + side, left : left + side]
        want = np.asarray(Image.fromarray(arr).resize((64, 64), Image.Resampling.LANCZOS))
        if flip:
            want = want[:, ::-1]
        assert got.shape == (64, 64, 3) and got.dtype == np.uint8
        assert np.array_equal(got, want), seed
        seen_flips.add(flip)
        seen_sides.add(side)
    assert seen_flips == {True, False} and len(seen_sides) > 6 and min(seen_sides) >= 115


def test_resize_center_crop_is_torchvision_resize_and_center_crop():
    import torchvision.transforms as T

    ref = T.Compose([T.Resize(64), T.CenterCrop(64)])
    for w, h in ((300, 200), (120, 261), (64, 64), (201, 99)):
        im = noise_image(w, h, w + h)
        assert np.array_equal(transforms.resize_center_crop(im, 64), np.asarray(ref(im))), (w, h)


def test_adm_and_resize_crops_differ():
    im = noise_image(500, 375, 9)
    a, b = transforms.adm_center_crop(im, 64), transforms.resize_center_crop(im, 64)
    assert a.shape == b.shape == (64, 64, 3) and np.abs(a.astype(int) - b.astype(int)).mean() > 1


def test_imagefolder_eval_transform_training_view_and_min_short_side(folder):
    cfg = DataConfig(dataset="imagefolder", root=str(folder), resolution=32, eval_transform="resize-center-crop")
    val = imagefolder.factory(cfg, "val")
    img, _ = val[0]
    with Image.open(val.path(0)) as im:
        want = transforms.resize_center_crop(im.convert("RGB"), 32)
    assert torch.equal(img, torch.from_numpy(want.transpose(2, 0, 1).copy()))
    assert val.transform == "resize-center-crop" and "transform=resize-center-crop" in val.cache_id
    assert transforms.protocol(val) == {"eval_transform": "resize-center-crop"}
    train = imagefolder.factory(DataConfig(dataset="imagefolder", root=str(folder), resolution=32), "train")
    assert train.transform == "adm-center-crop"  # the latent cache and evaluation stay deterministic
    view = transforms.training_view(train, DataConfig(root=str(folder), train_transform="vfm-vae-random-crop", min_short_side=256))
    assert len(train) == 4 and len(view) == 1  # only the 256 x 256 image has a short side >= 256
    assert view.path(0).parent.name == "b" and view.path(0).name == "im0.png"
    assert view.cache_id != train.cache_id and len(train) == 4
    first, again = view[0][0], view[0][0]  # a fresh draw on every visit, reproducible per (seed, index, visit)
    assert not torch.equal(first, again)
    with Image.open(view.path(0)) as im:
        want = transforms.vfm_vae_random_crop(im.convert("RGB"), 32, np.random.default_rng([0, 0, 0]))
    assert torch.equal(first, torch.from_numpy(want.transpose(2, 0, 1).copy()))
    assert transforms.training_view(train, DataConfig(root=str(folder))) is train


def test_bad_transform_settings(folder, host):
    with pytest.raises(UserError, match="data.train_transform='random' is not a transform"):
        transforms.check_names(DataConfig(train_transform="random"))
    with pytest.raises(UserError, match="data.min_short_side must be >= 0"):
        transforms.check_names(DataConfig(min_short_side=-1))
    shapes = host.datasets.get("shapes").factory(DataConfig(dataset="shapes", resolution=16, val_images=2), "val")
    with pytest.raises(UserError, match="dataset 'shapes' does not decode images"):
        transforms.check_dataset(DataConfig(eval_transform="resize-center-crop"), shapes)
    assert transforms.protocol(shapes) == {"eval_transform": "dataset-native"}


def test_paper_preset_uses_the_reference_data_pipeline(host):
    data = host.presets.get("vfm-vae-paper").values["data"]
    assert (data["train_transform"], data["min_short_side"], data["eval_transform"]) == ("vfm-vae-random-crop", 256, "resize-center-crop")


def test_run_trains_on_the_view_and_records_the_eval_transform(folder, tmp_path):
    """A smoke run on imagefolder: tokenizer batches come from the random-crop view, reconstruction
    rows carry eval_transform in their protocol, and a bad transform stops the run before any write."""
    from vfmbench.cli import main
    from vfmbench.results import read_rows

    out = tmp_path / "runs"
    common = ["run", "--preset", "smoke", "--dataset", "imagefolder", "--set", f"data.root={folder}", "--set", "data.resolution=64",
              "--set", "data.train_images=0", "--set", "data.val_images=0", "--set", "metrics.recon_images=2",
              "--set", "metrics.batch_size=2", "--set", "data.batch_size=2", "--stages", "tokenizer,recon-eval,results",
              "--set", "tokenizer.train.images=4", "--set", "tokenizer.train.batch_size=2",
              "--set", 'component_args.vfm-vae.stages=[{"name": "main", "images": 4, "lpips": 0.0, "gan": 0.0}]',
              "--set", "data.train_transform=vfm-vae-random-crop", "--set", "data.eval_transform=resize-center-crop", "--out", str(out)]
    bad = [a if a != "data.eval_transform=resize-center-crop" else "data.eval_transform=lanczos" for a in common]
    assert main(bad) == 2 and not out.exists()
    assert main(common) == 0
    run_dir = next(out.iterdir())
    rows = read_rows(run_dir / "results.jsonl")
    recon = [r for r in rows if r["family"] == "reconstruction"]
    assert recon and all(r["protocol"]["eval_transform"] == "resize-center-crop" for r in recon)
