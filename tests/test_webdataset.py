"""The ``webdataset`` dataset: tiny shards written in the imagenet-1k-wds layout, read indexed
(seek into the tar) and streamed (node, worker and buffer shuffling)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vfmbench.config import DataConfig
from vfmbench.data import CorruptImageError, SkipCounter, iter_batches
from vfmbench.errors import UserError
from vfmbench.specs import DatasetSpec
from vfmbench_plugins.datasets import webdataset as wdsplugin
from vfmbench_plugins.datasets.imagefolder import center_crop_arr
from vfmbench_plugins.datasets.webdataset import WebDatasetShards, split_key

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _jpeg(rng, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, split: str = "train", shards: int = 4, per_shard: int = 5, seed: int = 0, prefix: str | None = None) -> list[str]:
    """Shards in the imagenet-1k-wds layout (``imagenet1k-{train,validation}-NNNN.tar``), each sample
    a .jpg, a .cls and a .json; returns the sample ids (``shard.tar/key``) in shard order."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    for s in range(shards):
        name = f"{prefix or ('imagenet1k-' + ('train' if split == 'train' else 'validation') + '-')}{s:04d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for j in range(per_shard):
                key = f"n{s:02d}_{j:03d}"
                label = (s * per_shard + j) % 7
                w.write({"__key__": key, "jpg": _jpeg(rng, 40 + 3 * j, 30 + 2 * s), "cls": str(label).encode(),
                         "json": f'{{"label": {label}}}'.encode()})
                ids.append(f"{name}/{key}")
    return ids


@pytest.fixture
def shards(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "imagenet-1k-wds"
    ids = write_shards(root, "train", shards=4, per_shard=5)
    write_shards(root, "val", shards=2, per_shard=3, seed=1)
    return root, ids


def test_split_key_follows_webdataset_naming():
    assert split_key("n01440764_10026.jpg") == ("n01440764_10026", "jpg")
    assert split_key("a/b/c.seg.PNG") == ("a/b/c", "seg.png")
    assert split_key("noext") == ("noext", "")


def test_indexed_access_matches_decoding_the_tar_member(shards, tmp_path):
    root, ids = shards
    ds = WebDatasetShards(str(root), "train", resolution=16, cache_dir=tmp_path / "idx")
    assert len(ds) == 20 and ds.num_classes == 1000 and ds.layout == "imagenet-1k-wds"
    assert [f"{ds.shards[ds.shard_of[i]].name}/{ds.keys[ds.shard_of[i]][ds.position[i]]}" for i in range(20)] == ids
    for i in (0, 7, 19):
        shard, key = ids[i].split("/")
        with tarfile.open(root / shard) as tf:
            raw = tf.extractfile(f"{key}.jpg").read()
            label = int(tf.extractfile(f"{key}.cls").read())
        expected = center_crop_arr(Image.open(io.BytesIO(raw)).convert("RGB"), 16).transpose(2, 0, 1)
        x, y = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
        assert np.array_equal(x.numpy(), expected) and y == label == (i % 7)
    batch = ds.__getitems__([19, 0, 7])  # read in file order, returned in the requested order
    for (x, y), i in zip(batch, [19, 0, 7]):
        assert torch.equal(x, ds[i][0]) and y == ds[i][1]
    # the index is cached per shard and reused (same arrays) by a new dataset object
    assert len(list((tmp_path / "idx").glob("*.npz"))) == 4
    again = WebDatasetShards(str(root), "train", resolution=16, cache_dir=tmp_path / "idx")
    assert np.array_equal(again.offset, ds.offset) and torch.equal(again[7][0], ds[7][0])
    va = WebDatasetShards(str(root), "val", resolution=16, cache_dir=None)
    assert len(va) == 6 and va.cache_id != ds.cache_id and "split=val" in va.cache_id


def test_subset_and_cache_id(shards):
    root, _ = shards
    a = wdsplugin.factory(DataConfig(dataset="webdataset", root=str(root), resolution=8, train_images=6, seed=3), "train")
    b = wdsplugin.factory(DataConfig(dataset="webdataset", root=str(root), resolution=8, train_images=6, seed=4), "train")
    assert len(a) == 6 and list(a.subset) == sorted(a.subset) and list(a.subset) != list(b.subset)
    assert "subset-seed=3" in a.cache_id and a.cache_id != b.cache_id
    full = wdsplugin.factory(DataConfig(dataset="webdataset", root=str(root), resolution=8), "train")
    assert torch.equal(a[2][0], full[int(a.subset[2])][0])
    with pytest.raises(UserError, match=r"train_images=21.*20 samples"):
        wdsplugin.factory(DataConfig(dataset="webdataset", root=str(root), resolution=8, train_images=21), "train")


def test_split_folder_layout_takes_classes_from_train(tmp_path):
    root = tmp_path / "generic"
    write_shards(root / "train", shards=2, per_shard=4, prefix="part-")
    write_shards(root / "val", shards=1, per_shard=2, prefix="part-", seed=2)
    tr = WebDatasetShards(str(root), "train", resolution=8, cache_dir=None)
    va = WebDatasetShards(str(root), "val", resolution=8, cache_dir=None)
    assert tr.layout == "split-folders" and len(tr) == 8 and len(va) == 2
    assert tr.num_classes == va.num_classes == 7  # labels 0..6 of the train shards


def _all_ids(ds, world, workers, **kw):
    out = []
    for rank in range(world):
        out.append([i for ids, _, _ in ds.stream(rank=rank, world=world, num_workers=workers, batch_size=3, **kw) for i in ids])
    return out


def test_stream_reads_every_sample_exactly_once_over_ranks_and_workers(shards):
    root, ids = shards
    ds = WebDatasetShards(str(root), "train", resolution=8, cache_dir=None)
    per_rank = _all_ids(ds, world=2, workers=2, seed=5, epoch=0, shuffle_buffer=4)
    union = per_rank[0] + per_rank[1]
    assert sorted(union) == sorted(ids) and len(union) == len(set(union)) == 20
    assert all(len(r) == 10 for r in per_rank)  # 2 shards of 5 per rank
    # the shard order, and so which rank reads which shard, changes with the epoch
    shards_of = lambda ranks: [sorted({i.split("/")[0] for i in r}) for r in ranks]  # noqa: E731
    epochs = [shards_of(_all_ids(ds, world=2, workers=1, seed=5, epoch=e)) for e in range(6)]
    assert len({str(e) for e in epochs}) > 1
    # one rank, no workers: the whole split
    assert sorted(_all_ids(ds, world=1, workers=0)[0]) == sorted(ids)
    with pytest.raises(UserError, match="4 train shards cannot be split over 5 ranks"):
        next(ds.stream(rank=0, world=5))


def test_stream_shuffle_buffer_changes_order_not_content_and_is_seeded(shards):
    root, ids = shards
    ds = WebDatasetShards(str(root), "train", resolution=8, cache_dir=None)
    plain = _all_ids(ds, world=1, workers=0, seed=0)[0]
    shuffled = _all_ids(ds, world=1, workers=0, seed=0, shuffle_buffer=8)[0]
    again = _all_ids(ds, world=1, workers=0, seed=0, shuffle_buffer=8)[0]
    other = _all_ids(ds, world=1, workers=0, seed=1, shuffle_buffer=8)[0]
    assert sorted(shuffled) == sorted(plain) == sorted(ids)
    assert shuffled != plain and shuffled == again and other != shuffled
    # shards are read whole and in order without a buffer: the samples of a shard stay together
    assert [len({i.split("/")[0] for i in plain[k : k + 5]}) for k in range(0, 20, 5)] == [1, 1, 1, 1]
    assert [len({i.split("/")[0] for i in shuffled[k : k + 5]}) for k in range(0, 20, 5)] != [1, 1, 1, 1]


def test_stream_split_uses_the_run_settings(shards):
    root, ids = shards
    cfg = DataConfig(dataset="webdataset", root=str(root), resolution=8, num_workers=2, shuffle_buffer=5, seed=3)
    batches = list(wdsplugin.stream_split(cfg, "train", epoch=1, batch_size=6))
    assert sorted(i for b, _, _ in batches for i in b) == sorted(ids)
    assert max(len(b) for b, _, _ in batches) == 6 and batches[0][1].shape[1:] == (3, 8, 8)
    again = [i for b, _, _ in wdsplugin.stream_split(cfg, "train", epoch=1, batch_size=6) for i in b]
    assert again == [i for b, _, _ in batches for i in b]  # deterministic by (seed, epoch)


def test_stream_pixels_and_labels_match_indexed_access(shards):
    root, _ = shards
    ds = WebDatasetShards(str(root), "train", resolution=12, cache_dir=None)
    pos = {f"{ds.shards[ds.shard_of[i]].name}/{ds.keys[ds.shard_of[i]][ds.position[i]]}": i for i in range(len(ds))}
    seen = 0
    for ids, images, labels in ds.stream(num_workers=2, batch_size=4, shuffle_buffer=6, seed=2):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 12, 12)
        for sid, x, y in zip(ids, images, labels):
            ref_x, ref_y = ds[pos[sid]]
            assert torch.equal(x, ref_x) and int(y) == ref_y
            seen += 1
    assert seen == 20
    sub = WebDatasetShards(str(root), "train", resolution=12, max_images=7, seed=1, cache_dir=None)
    got = sorted(i for ids, _, _ in sub.stream(num_workers=0) for i in ids)
    assert got == sorted(f"{sub.shards[sub.shard_of[g]].name}/{sub.keys[sub.shard_of[g]][sub.position[g]]}" for g in sub.subset)


def _corrupt_member(root: Path, shard: str, key: str) -> None:
    """Rewrite ``shard`` with ``key.jpg`` cut to half its bytes (a truncated JPEG, same tar layout)."""
    src = root / shard
    members = []
    with tarfile.open(src) as tf:
        for m in tf:
            data = tf.extractfile(m).read()
            if m.name == f"{key}.jpg":
                data = data[: len(data) // 2]
            members.append((m, data))
    with tarfile.open(src, "w") as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def test_corrupt_image_names_shard_and_member_or_is_skipped(shards):
    root, ids = shards
    _corrupt_member(root, "imagenet1k-train-0002.tar", "n02_003")
    ds = WebDatasetShards(str(root), "train", resolution=8, cache_dir=None)
    bad = ids.index("imagenet1k-train-0002.tar/n02_003")
    with pytest.raises(CorruptImageError, match=r"imagenet1k-train-0002\.tar.*n02_003\.jpg.*data\.skip_corrupt=true"):
        ds[bad]
    with pytest.raises(UserError, match=r"imagenet1k-train-0002\.tar.*n02_003\.jpg"):
        list(iter_batches(ds, range(len(ds)), 8))
    skips = SkipCounter()
    kept = [y for _, y in iter_batches(ds, range(len(ds)), 8, split="train", on_corrupt="drop", skips=skips)]
    assert sum(len(y) for y in kept) == 19 and skips.counts() == {"train": 1}
    # streaming: the same error, or the sample left out and counted
    with pytest.raises(CorruptImageError, match=r"imagenet1k-train-0002\.tar.*n02_003\.jpg"):
        list(ds.stream(num_workers=2))
    skips = SkipCounter()
    got = [i for ids_, _, _ in ds.stream(num_workers=2, skip_corrupt=True, skips=skips) for i in ids_]
    assert sorted(got) == sorted(set(ids) - {ids[bad]}) and skips.counts() == {"train": 1}


def test_truncated_shard_is_an_error_naming_it(tmp_path):
    root = tmp_path / "wds"
    write_shards(root, shards=2, per_shard=3)
    shard = root / "imagenet1k-train-0001.tar"
    with tarfile.open(shard) as tf:
        jpg = tf.getmember("n01_002.jpg")
    data = shard.read_bytes()
    shard.write_bytes(data[: jpg.offset_data + jpg.size // 2])  # a download cut off in the last image
    with pytest.raises(UserError, match=r"imagenet1k-train-0001\.tar.*truncated.*re-download"):
        WebDatasetShards(str(root), "train", resolution=8, cache_dir=None)
    # a shard that shrinks after it was indexed: reading the cut image names it
    shard.write_bytes(data)
    ds = WebDatasetShards(str(root), "train", resolution=8, cache_dir=None)
    shard.write_bytes(data[: jpg.offset_data + jpg.size // 2])
    with pytest.raises(CorruptImageError, match=r"imagenet1k-train-0001\.tar.*n01_002\.jpg.*truncated"):
        ds[5]
    (root / "imagenet1k-train-0000.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(UserError, match=r"imagenet1k-train-0000\.tar.*not a tar file"):
        WebDatasetShards(str(root), "train", resolution=8, cache_dir=None)


def test_bad_roots_and_members(tmp_path):
    with pytest.raises(UserError, match=r"--set data\.root=PATH"):
        wdsplugin.factory(DataConfig(dataset="webdataset"), "train")
    with pytest.raises(UserError, match=r"nowhere.*not a folder"):
        WebDatasetShards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no train shards.*imagenet1k"):
        WebDatasetShards(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="split"):
        WebDatasetShards(str(tmp_path / "empty"), "test")
    root = tmp_path / "nocls"
    root.mkdir()
    with wds.TarWriter(str(root / "imagenet1k-train-0000.tar")) as w:
        w.write({"__key__": "a", "jpg": _jpeg(np.random.default_rng(0), 8, 8)})
    with pytest.raises(UserError, match=r"'a'.*imagenet1k-train-0000\.tar.*no \.cls"):
        WebDatasetShards(str(root), cache_dir=None)


def test_registration_and_entry_point():
    specs = []
    wdsplugin.register_datasets(register=specs.append)
    (spec,) = specs
    assert isinstance(spec, DatasetSpec) and spec.name == "webdataset" and spec.needs_root and spec.splits == ("train", "val")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dataset-webdataset = "vfmbench_plugins.datasets.webdataset"' in pyproject and '"webdataset>=0.2"' in pyproject


def test_runner_reads_webdataset_shards_with_workers(shards, tmp_path):
    from vfmbench.config import parse_set, resolve
    from vfmbench.plugins import get_plugin_manager
    from vfmbench.runner import Run

    root, _ = shards
    host = get_plugin_manager()
    if "webdataset" not in {s.name for s in host.datasets}:  # entry point not installed yet (pip install -e . adds it)
        host = get_plugin_manager(extra_plugins=[("dataset-webdataset", wdsplugin)])

    def run(*sets):
        layers = [host.presets.get("smoke").values] + [parse_set(s) for s in (
            "data.dataset=webdataset", f"data.root={root}", "data.resolution=16", "data.train_images=0", "data.val_images=0",
            "tokenizer.name=kl-vae", f"run.out={tmp_path / 'runs'}", "run.device=cpu", "run.stages=[tokenizer]", "metrics.batch_size=8", *sets)]
        return Run.prepare(host, resolve(layers))

    inline, pooled = run("data.num_workers=0"), run("data.num_workers=2")
    ds = inline.dataset("train")
    assert inline.num_classes == 1000 and len(inline.dataset("val")) == 6
    a, b = list(inline.iter_split("train", 0, "t")), list(pooled.iter_split("train", 0, "t"))
    assert [len(y) for _, y in a] == [8, 8, 4]
    assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))
    assert torch.cat([y for _, y in a]).tolist() == ds.labels.tolist()
    idx = torch.tensor([19, 3, 3, 11])
    x, y = pooled.image_batch("train", idx)
    assert torch.equal(x, torch.stack([ds[int(i)][0] for i in idx])) and y.tolist() == [int(ds.labels[int(i)]) for i in idx]
