"""Datasets: the procedural ``shapes`` and the ``imagefolder`` (ADM centre crop)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vfmbench.config import DataConfig
from vfmbench.data import BatchLoader, SkipCounter, iter_batches
from vfmbench.errors import UserError
from vfmbench.specs import DatasetSpec
from vfmbench_plugins.datasets import imagefolder, shapes
from vfmbench_plugins.datasets.imagefolder import ImageFolderDataset, center_crop_arr
from vfmbench_plugins.datasets.shapes import ShapesDataset


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# shapes


def test_shapes_deterministic_by_seed_split_index():
    a = ShapesDataset("train", 32, 100, seed=0)
    x, y = a[17]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y == 7
    assert torch.equal(x, a[17][0])
    assert torch.equal(x, ShapesDataset("train", 32, 100, seed=0)[17][0])  # a fresh object
    assert not torch.equal(x, ShapesDataset("train", 32, 100, seed=1)[17][0])
    assert not torch.equal(x, ShapesDataset("val", 32, 100, seed=0)[17][0])
    assert not torch.equal(x, a[27][0])  # same class, different image
    # batched rendering (DataLoader's __getitems__) equals one-by-one, in any order
    batch = a.__getitems__([40, 3, 17])
    for (im, lab), i in zip(batch, [40, 3, 17]):
        assert torch.equal(im, a[i][0]) and lab == a[i][1]


def test_shapes_any_resolution_and_same_scene():
    for res in (8, 17, 33, 100):
        x, _ = ShapesDataset("val", res, 10)[3]
        assert x.shape == (3, res, res) and x.dtype == torch.uint8
    # the same index renders the same scene: a 64 px image pooled to 16 px matches the 16 px
    # rendering of its own index far better than that of any other index (noise aside)
    big, small = ShapesDataset("train", 64, 20), ShapesDataset("train", 16, 20)
    pooled = torch.nn.functional.avg_pool2d(big[5][0].float()[None], 4)[0]
    errs = [(pooled - small[i][0].float()).abs().mean().item() for i in range(20)]
    assert int(np.argmin(errs)) == 5 and errs[5] < 0.5 * sorted(errs)[1]


def test_shapes_lengths_labels_and_cache_id():
    tr, va = shapes.factory(DataConfig(resolution=16), "train"), shapes.factory(DataConfig(resolution=16), "val")
    assert (len(tr), len(va)) == (10000, 1000) and tr.num_classes == 10
    ds = shapes.factory(DataConfig(resolution=16, train_images=123, val_images=45, seed=3), "train")
    assert len(ds) == 123
    assert [ds[i][1] for i in range(20)] == [i % 10 for i in range(20)]
    ids = {
        ds.cache_id,
        shapes.factory(DataConfig(resolution=16, train_images=123, val_images=45, seed=3), "val").cache_id,
        shapes.factory(DataConfig(resolution=16, train_images=124, seed=3), "train").cache_id,
        shapes.factory(DataConfig(resolution=32, train_images=123, seed=3), "train").cache_id,
        shapes.factory(DataConfig(resolution=16, train_images=123, seed=4), "train").cache_id,
    }
    assert len(ids) == 5
    assert all(k in ds.cache_id for k in ("shapes", "v1", "seed=3", "split=train", "res=16", "n=123"))
    with pytest.raises(IndexError):
        ds[123]
    with pytest.raises(UserError, match="split"):
        ShapesDataset("test", 16, 10)


def test_shapes_classes_are_distinguishable_but_not_trivial():
    # nearest class centroid, fit on 1500 train images and scored on 500 val images (chance 0.1)
    def images(split, n):
        x = torch.stack([im for im, _ in ShapesDataset(split, 32, n).__getitems__(list(range(n)))]).float() / 255
        return x, torch.arange(n) % 10

    def foreground_colour(x):
        # mean and spread of the 10% of pixels farthest from the image's median (background) colour
        px = x.flatten(2)
        dist = (px - px.median(2, keepdim=True).values).norm(dim=1)
        idx = dist.topk(px.shape[2] // 10, dim=1).indices
        sel = torch.gather(px, 2, idx[:, None].expand(-1, 3, -1))
        return torch.cat([sel.mean(2), sel.std(2)], 1)

    def accuracy(f_tr, y_tr, f_va, y_va):
        centroids = torch.stack([f_tr[y_tr == k].mean(0) for k in range(10)])
        return (torch.cdist(f_va, centroids).argmin(1) == y_va).float().mean().item()

    xtr, ytr = images("train", 1500)
    xva, yva = images("val", 500)
    pooled = accuracy(torch.nn.functional.avg_pool2d(xtr, 4).flatten(1), ytr, torch.nn.functional.avg_pool2d(xva, 4).flatten(1), yva)
    assert pooled > 0.16, pooled  # 8x8 pooled pixels: clearly above chance (sd 0.013) though backgrounds dominate
    colour = accuracy(foreground_colour(xtr), ytr, foreground_colour(xva), yva)
    assert 0.5 < colour < 0.95, colour  # colour separates most classes, not all (hue jitter, lighting, texture)
    # per-image variation: images of one class are far from identical
    assert xtr[ytr == 0].flatten(1).std(0).mean() > 0.1


def test_shapes_through_a_dataloader():
    ds = ShapesDataset("train", 24, 40)
    x, y = next(iter(DataLoader(ds, batch_size=16, shuffle=False)))
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.uint8
    assert torch.equal(y, torch.arange(16) % 10) and torch.equal(x[3], ds[3][0])


# ---------------------------------------------------------------------------------------------
# imagefolder


def _noise_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imnet"
    layout = {
        "train": {"zebra": [(100, 60, "png"), (48, 64, "JPEG")], "cat": [(70, 70, "jpg"), (90, 40, "png"), (33, 80, "PNG")], "dog": [(64, 64, "jpeg")]},
        "val": {"dog": [(50, 75, "png")], "cat": [(80, 80, "JPEG")]},
    }
    seed = 0
    for split, classes in layout.items():
        for cls, images in classes.items():
            (root / split / cls).mkdir(parents=True)
            for j, (w, h, ext) in enumerate(images):
                im = _noise_image(w, h, seed, "L" if ext == "PNG" else "RGB")
                im.save(root / split / cls / f"im{j}.{ext}", format="JPEG" if ext.lower() in ("jpg", "jpeg") else "PNG")
                seed += 1
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_classes_labels_and_tensors(folder):
    tr = imagefolder.factory(DataConfig(root=str(folder), resolution=16), "train")
    va = imagefolder.factory(DataConfig(root=str(folder), resolution=16), "val")
    assert tr.classes == ["cat", "dog", "zebra"] and tr.num_classes == va.num_classes == 3
    assert len(tr) == 6 and len(va) == 2  # notes.txt is skipped; extensions are case-insensitive
    assert [lab for _, lab in tr.files] == [0, 0, 0, 1, 2, 2]
    assert [lab for _, lab in va.files] == [0, 1]  # val uses the train folder's indices
    for i in range(len(tr)):
        x, y = tr[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == tr.files[i][1]
    assert str(folder.resolve()) in tr.cache_id and "files=6" in tr.cache_id and "res=16" in tr.cache_id
    assert tr.cache_id != va.cache_id


def test_adm_center_crop_matches_hand_computation(folder):
    path = folder / "train" / "zebra" / "im0.png"  # 100 x 60 (w x h)
    ds = ImageFolderDataset(str(folder), "train", resolution=16)
    got = ds[ds.files.index(("zebra/im0.png", 2))][0].permute(1, 2, 0).numpy()
    # by hand: 60 >= 32 -> BOX halve to 50 x 30; 30 < 32 stop; BICUBIC to (round(50 * 16 / 30), 16) = (27, 16);
    # centre crop x offset (27 - 16) // 2 = 5, y offset 0
    im = Image.open(path).convert("RGB").resize((50, 30), resample=Image.BOX)
    im = im.resize((27, 16), resample=Image.BICUBIC)
    expected = np.asarray(im)[0:16, 5:21]
    assert np.array_equal(got, expected)
    # without halving (60 < 64): BICUBIC to (53, 32), x offset 10
    im = Image.open(path).convert("RGB").resize((53, 32), resample=Image.BICUBIC)
    assert np.array_equal(center_crop_arr(Image.open(path).convert("RGB"), 32), np.asarray(im)[:, 10:42])


def test_adm_center_crop_geometry():
    # columns hold 2 * (x // 2): BOX halving keeps pairs exact, so crop offsets can be read off
    w, h = 200, 100
    arr = np.repeat((2 * (np.arange(w) // 2)).astype(np.uint8)[None, :], h, axis=0)
    out = center_crop_arr(Image.fromarray(arr).convert("RGB"), 50)
    # 100 >= 100: halve to 100 x 50; then scale 1; crop columns 25..74 of the halved image
    assert out.shape == (50, 50, 3)
    assert np.array_equal(out[10, :, 0], 2 * np.arange(25, 75))
    tall = center_crop_arr(Image.fromarray(arr.T.copy()).convert("RGB"), 50)  # 100 x 200: rows cropped
    assert np.array_equal(tall[:, 10, 0], 2 * np.arange(25, 75))


def test_imagefolder_deterministic_subset(folder):
    def pick(seed, n=3):
        return imagefolder.factory(DataConfig(root=str(folder), resolution=8, train_images=n, seed=seed), "train")

    a, b = pick(0), pick(0)
    assert a.files == b.files and len(a) == 3
    assert a.files == sorted(a.files, key=lambda f: (f[1], f[0]))  # kept in folder order
    assert len({tuple(pick(s).files) for s in range(8)}) > 1  # the seed chooses the subset
    assert "subset-seed=0" in a.cache_id and a.cache_id != pick(1).cache_id
    with pytest.raises(UserError, match="train_images=7.*6 images"):
        pick(0, n=7)


def test_imagefolder_missing_root_errors(tmp_path, folder):
    with pytest.raises(UserError, match=r"--set data\.root=PATH"):
        imagefolder.factory(DataConfig(root=""), "train")
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=r"nowhere.*--set data\.root=PATH"):
        imagefolder.factory(DataConfig(root=str(missing)), "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=r"empty.*train.*no class folders"):
        imagefolder.factory(DataConfig(root=str(tmp_path / "empty")), "train")
    (tmp_path / "empty" / "train" / "a").mkdir()
    with pytest.raises(UserError, match=r"no images"):
        imagefolder.factory(DataConfig(root=str(tmp_path / "empty")), "train")
    with pytest.raises(UserError, match=r"val.*does not exist"):
        imagefolder.factory(DataConfig(root=str(tmp_path / "empty")), "val")


def test_imagefolder_truncated_jpeg_names_the_file(folder):
    bad = folder / "train" / "dog" / "im0.jpeg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(str(folder), "train", resolution=16)
    i = ds.files.index(("dog/im0.jpeg", 1))
    with pytest.raises(UserError, match=r"dog/im0\.jpeg"):
        ds[i]
    (folder / "train" / "dog" / "im1.png").write_bytes(b"\x89PNG garbage")
    ds = ImageFolderDataset(str(folder), "train", resolution=16)
    with pytest.raises(UserError, match=r"dog/im1\.png"):
        ds[ds.files.index(("dog/im1.png", 1))]


def test_registration():
    specs = []
    shapes.register_datasets(register=specs.append)
    imagefolder.register_datasets(register=specs.append)
    by_name = {s.name: s for s in specs}
    assert set(by_name) == {"shapes", "imagefolder"} and all(isinstance(s, DatasetSpec) for s in specs)
    assert by_name["shapes"].num_classes == 10 and not by_name["shapes"].needs_root
    assert by_name["imagefolder"].num_classes == 0 and by_name["imagefolder"].needs_root


# ---------------------------------------------------------------------------------------------
# batched loading (vfmbench.data): workers and the corrupt-image policy


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_imagefolder_workers_give_the_same_batches(folder):
    ds = ImageFolderDataset(str(folder), "train", resolution=16)
    order = [5, 0, 3, 3, 1, 4, 2]  # any order, repeats allowed
    zero = list(iter_batches(ds, order, 3, num_workers=0))
    two = list(iter_batches(ds, order, 3, num_workers=2))
    assert [len(y) for _, y in zero] == [3, 3, 1] and _same(zero, two)
    assert torch.equal(zero[0][0][0], ds[5][0]) and zero[1][1].tolist() == [ds.files[i][1] for i in (3, 1, 4)]
    # the training loader: persistent workers, one batch of arbitrary indices per call
    inline, pooled = BatchLoader(ds, num_workers=0), BatchLoader(ds, num_workers=2)
    for batch in ([4, 1, 0, 5], [2], [3, 3, 0, 1, 2, 5, 4]):
        assert _same([inline.load(batch)], [pooled.load(batch)])
    assert pooled._loader is not None and pooled._loader.persistent_workers


def test_skip_policy_raise_drop_replace(folder, tmp_path):
    _truncate(folder / "train" / "cat" / "im0.jpg")
    ds = ImageFolderDataset(str(folder), "train", resolution=16)
    bad = ds.files.index(("cat/im0.jpg", 0))
    assert bad == 0
    for workers in (0, 2):
        with pytest.raises(UserError, match=r"cat/im0\.jpg.*skip_corrupt=true") as e:
            list(iter_batches(ds, range(6), 4, num_workers=workers))
        assert "Traceback" not in str(e.value)  # raised in the main process, not re-raised from a worker
        with pytest.raises(UserError, match=r"cat/im0\.jpg"):
            BatchLoader(ds, num_workers=workers).load([3, 0])
    log = []
    skips = SkipCounter(path=tmp_path / "skipped-images.json", log=log.append)
    dropped = list(iter_batches(ds, range(6), 4, split="train", num_workers=2, on_corrupt="drop", skips=skips))
    assert [len(y) for _, y in dropped] == [3, 2] and torch.equal(dropped[0][0][0], ds[1][0])
    # replace: the batch keeps its size; the corrupt index is filled by the next one that decodes
    loader = BatchLoader(ds, split="train", num_workers=0, on_corrupt="replace", skips=skips)
    x, y = loader.load([3, 0, 5])
    assert x.shape[0] == 3 and torch.equal(x[1], ds[1][0]) and y[1] == ds.files[1][1] and torch.equal(x[0], ds[3][0])
    assert _same([loader.load([3, 0, 5])], [BatchLoader(ds, split="train", num_workers=2, on_corrupt="replace", skips=skips).load([3, 0, 5])])
    # counted once however often it is met, logged once, and written for later processes
    assert skips.counts() == {"train": 1} and len(log) == 1 and "cat/im0.jpg" in log[0]
    again = SkipCounter(path=tmp_path / "skipped-images.json")
    assert again.counts() == {"train": 1}
    other = tmp_path / "skipped-images.rank1.json"
    other.write_text(json.dumps({"val": {"'x.png'": "OSError"}, "train": {next(iter(skips.items["train"])): "same"}}))
    merged = SkipCounter(path=tmp_path / "skipped-images.json", others=lambda: [tmp_path / "skipped-images.json", other])
    assert merged.counts() == {"train": 1, "val": 1} and merged.total() == 2


def test_replace_skips_runs_of_corrupt_images_and_fails_when_all_are(folder):
    for name in ("cat/im0.jpg", "dog/im0.jpeg"):
        _truncate(folder / "train" / name)
    (folder / "train" / "cat" / "im1.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(str(folder), "train", resolution=16)
    skips = SkipCounter()
    x, y = BatchLoader(ds, split="train", on_corrupt="replace", skips=skips).load([0, 5])
    assert torch.equal(x[0], ds[2][0])  # 0 and 1 are corrupt: the next good index is 2
    assert skips.counts() == {"train": 2}  # index 3 (dog) not met yet
    list(iter_batches(ds, range(6), 6, split="train", on_corrupt="drop", skips=skips))
    assert skips.counts() == {"train": 3}
    for rel in ("cat/im2.PNG", "zebra/im0.png", "zebra/im1.JPEG"):
        (folder / "train" / rel).write_bytes(b"garbage")
    with pytest.raises(UserError, match="every image of the 'train' split is corrupt"):
        BatchLoader(ImageFolderDataset(str(folder), "train", resolution=16), split="train", on_corrupt="replace", skips=SkipCounter()).load([0])


# ---------------------------------------------------------------------------------------------
# the runner: corrupt images and workers in a real run


def _run(root: Path, out: Path, *extra: str) -> "object":
    from vfmbench.config import parse_set
    from vfmbench.plugins import get_plugin_manager
    from vfmbench.runner import Run

    host = get_plugin_manager()
    layers = [host.presets.get("smoke").values]
    for s in ("data.dataset=imagefolder", f"data.root={root}", "data.resolution=16", "data.train_images=0", "data.val_images=0", "tokenizer.name=kl-vae",
              "tokenizer.train.images=0", f"run.out={out}", "run.device=cpu", "run.stages=[tokenizer]", "metrics.batch_size=4", *extra):
        layers.append(parse_set(s))
    from vfmbench.config import resolve

    return Run.prepare(host, resolve(layers))


def test_runner_batches_workers_shards_and_corrupt_file(folder, tmp_path, monkeypatch):
    from vfmbench import dist

    run = _run(folder, tmp_path / "runs", "data.num_workers=2")
    ref = _run(folder, tmp_path / "runs", "data.num_workers=0")
    a, b = list(run.iter_split("train", 0, "t")), list(ref.iter_split("train", 0, "t"))
    assert [len(y) for _, y in a] == [4, 2] and _same(a, b)
    assert _same([run.image_batch("train", torch.tensor([5, 1, 1]))], [ref.image_batch("train", torch.tensor([5, 1, 1]))])
    assert _same(list(ref.iter_split("train", 5, "t", shard=True)), list(ref.iter_split("train", 5, "t")))  # not distributed
    # under torchrun: each rank a contiguous block of batches; together every index exactly once
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "world", lambda: 2)
    seen = []
    for r in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        seen.append(torch.cat([y for _, y in ref.iter_split("train", 0, "t", shard=True)]))
    monkeypatch.undo()
    assert torch.equal(torch.cat(seen), torch.cat([y for _, y in b])) and len(seen[0]) == 4 and len(seen[1]) == 2
    _truncate(folder / "train" / "dog" / "im0.jpeg")
    fresh = _run(folder, tmp_path / "runs")
    with pytest.raises(UserError, match=r"train/dog/im0\.jpeg.*data\.skip_corrupt=true"):
        fresh.image_batch("train", torch.arange(6))
    with pytest.raises(UserError, match=r"train/dog/im0\.jpeg"):
        list(fresh.iter_split("train", 0, "t"))
    with pytest.raises(UserError, match=r"data\.num_workers must be >= 0"):
        _run(folder, tmp_path / "runs", "data.num_workers=-1")
