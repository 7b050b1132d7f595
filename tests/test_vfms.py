"""VFM plugins: library equivalence from each library's on-disk format, preprocessing, layer
indices, freezing, weights lookup and ids, parameter counts, tiny-size speed."""
from __future__ import annotations

import hashlib
import json
import os
import time
from importlib import metadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub miss must fail at once, never retry for 46 s

import pytest
import torch
import torch.nn.functional as F

from vfmbench.config import VfmConfig
from vfmbench.errors import MissingWeightsError, UserError
from vfmbench.interfaces import Vfm
from vfmbench.plugins import get_plugin_manager
from vfmbench.vfm import FrozenVfm, build_vfm, preprocess, target_size, vfm_param_count

VFM_PLUGINS = ("vfm-clip", "vfm-dino", "vfm-dinov2", "vfm-eva-clip", "vfm-mae", "vfm-siglip")
TINY_DEPTH, TINY_WIDTH = 4, 64


@pytest.fixture(scope="module")
def host():
    """A plugin host with only the VFM plugins (the other kinds are not under test here)."""
    others = [ep.name for ep in metadata.entry_points(group="vfmbench") if ep.name not in VFM_PLUGINS]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VFMBENCH_DISABLE_PLUGINS", ",".join(others))
        yield get_plugin_manager()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The weights-id index goes to a temporary folder, not ~/.cache/vfmbench."""
    monkeypatch.setenv("VFMBENCH_CACHE_DIR", str(tmp_path / "vfmbench-cache"))


def images(n=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def normalise(imgs, spec):
    """Hand normalisation at scale 1: x / 255, then (x - mean) / std per channel."""
    x = imgs.float() / 255.0
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def tiny_random(host, name, **kw):
    spec = host.vfms.get(name)
    return build_vfm(spec, VfmConfig(name=name, size="tiny", pretrained=False, **kw))


def sha16(*paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(open(p, "rb").read())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reference models, written in each library's own format. Each maker returns
# (weights path, files hashed, reference fn x -> (final full sequence, [hidden 0..depth] full sequences)).


def _hf_reference(model):
    def run(x):
        out = model(pixel_values=x, output_hidden_states=True)
        return out.last_hidden_state, list(out.hidden_states)

    return run


def make_siglip(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(1)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    full = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()  # the hub's format: text + vision
    full.save_pretrained(tmp_path / "siglip")
    return tmp_path / "siglip", [tmp_path / "siglip" / "model.safetensors"], _hf_reference(full.vision_model)


def _make_hf(cls_name, cfg_name, dirname, **extra):
    def make(tmp_path):
        import transformers

        torch.manual_seed(2)
        cfg = getattr(transformers, cfg_name)(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=8, **extra)
        model = getattr(transformers, cls_name)(cfg).eval()
        model.save_pretrained(tmp_path / dirname)
        return tmp_path / dirname, [tmp_path / dirname / "model.safetensors"], _hf_reference(model)

    return make


def make_mae(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(3)
    model = ViTMAEModel(ViTMAEConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=8)).eval()
    assert model.config.mask_ratio == 0.75  # saved as published: the loader must switch masking off
    model.save_pretrained(tmp_path / "mae")

    def run(x):
        model.config.mask_ratio = 0.0
        noise = torch.arange(64, dtype=torch.float32).expand(x.shape[0], 64)
        out = model(pixel_values=x, noise=noise, output_hidden_states=True)
        return out.last_hidden_state, list(out.hidden_states)

    return tmp_path / "mae", [tmp_path / "mae" / "model.safetensors"], run


def make_open_clip(tmp_path):
    import open_clip

    torch.manual_seed(4)
    vision = dict(image_size=64, patch_size=8, width=64, layers=4, head_width=32)
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()  # OpenAI CLIP uses QuickGELU
    path = tmp_path / "open_clip_tiny.pt"
    torch.save(model.state_dict(), path)
    visual = model.visual

    def run(x):
        visual.output_tokens = True
        _, tokens = visual(x)  # ln_post over the patch tokens
        res = visual.forward_intermediates(x, indices=None, output_fmt="NLC", output_extra_tokens=True)
        blocks = [torch.cat([p, t], 1) for p, t in zip(res["image_intermediates_prefix"], res["image_intermediates"])]
        final = torch.cat([visual.ln_post(blocks[-1])[:, :1], tokens], 1)
        return final, [visual._embeds(x)] + blocks

    return path, [path], run


def _make_timm(model_name):
    def make(tmp_path):
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(5)
        model = timm.create_model(model_name, pretrained=False, img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2).eval()
        path = tmp_path / "model.safetensors"
        save_file(model.state_dict(), str(path))

        def run(x):
            taken = []
            hooks = [model.norm_pre.register_forward_hook(lambda m, i, o: taken.append(o))]
            hooks += [b.register_forward_hook(lambda m, i, o: taken.append(o)) for b in model.blocks]
            try:
                final = model.forward_features(x)
            finally:
                for h in hooks:
                    h.remove()
            return final, taken

        return path, [path], run

    return make


CASES = {
    "siglip2": ("siglip2-l16-512", make_siglip),
    "dino": ("dino-s16", _make_timm("vit_small_patch16_224.dino")),
    "dinov2": ("dinov2-l14", _make_hf("Dinov2Model", "Dinov2Config", "dinov2")),
    "dinov2-reg": ("dinov2-reg-l14", _make_hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", "dinov2reg")),
    "mae": ("mae-l16", make_mae),
    "clip": ("clip-l14", make_open_clip),
    "eva-clip": ("eva-clip-g14-336", _make_timm("eva_giant_patch14_336.clip_ft_in1k")),
    "eva02-clip": ("eva02-clip-l14", _make_timm("eva02_large_patch14_clip_224.merged2b")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loads_library_format_and_matches_library(host, case, tmp_path):
    name, make = CASES[case]
    path, files, reference = make(tmp_path)
    spec = host.vfms.get(name)
    vfm = build_vfm(spec, VfmConfig(name=name, weights=str(path), size="tiny"), cache_dir=tmp_path / "cache")
    spec = vfm.spec
    assert isinstance(vfm, Vfm) and (vfm.embed_dim, vfm.patch_size, vfm.num_blocks) == (TINY_WIDTH, 8, TINY_DEPTH)
    assert vfm.weights_id == sha16(*files)
    assert vfm.default_layers == (0, 2, -1)  # the spec's [0, depth/2, -1] scaled to the tiny depth
    registered = host.vfms.get(name)
    assert (vfm.spec.width, vfm.spec.depth, vfm.spec.patch_size, vfm.spec.resolution, vfm.spec.input_scale) == (TINY_WIDTH, TINY_DEPTH, 8, 64, 1.0)
    assert vfm.spec.default_layers == (0, 2, -1) and vfm.spec.name == registered.name
    assert registered.depth > TINY_DEPTH and registered.default_layers != (0, 2, -1)  # the registry is untouched

    imgs = images()
    with torch.no_grad():
        final, hidden = reference(normalise(imgs, spec))
    assert len(hidden) == TINY_DEPTH + 1
    p = spec.num_prefix_tokens
    layers = [0, 1, 2, 3, 4, -1, -2, -3, -6]
    out = vfm(imgs, layers)
    assert out.grid == (8, 8)
    for i in layers:
        assert out.layers[i].shape == (4, 64, TINY_WIDTH) and out.layers[i].dtype == torch.float32
        assert out.prefix[i].shape == (4, p, TINY_WIDTH)
    torch.testing.assert_close(out.layers[-1], final[:, p:], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.prefix[-1], final[:, :p], atol=1e-6, rtol=0)
    for k in range(TINY_DEPTH + 1):
        torch.testing.assert_close(out.layers[k], hidden[k][:, p:], atol=1e-6, rtol=0)
    assert torch.equal(out.layers[-2], out.layers[TINY_DEPTH]) and torch.equal(out.layers[-3], out.layers[TINY_DEPTH - 1])
    assert torch.equal(out.layers[-6], out.layers[0])
    if case == "eva-clip":  # timm's in1k fine-tune norms only the pooled feature (fc_norm): -1 is -2
        assert torch.equal(out.layers[-1], out.layers[-2])
    else:
        assert not torch.equal(out.layers[-1], out.layers[-2])  # -1 is normed, -2 is not


def test_mae_keeps_patches_in_raster_order(host, tmp_path):
    path, _, _ = make_mae(tmp_path)
    vfm = build_vfm(host.vfms.get("mae"), VfmConfig(name="mae", weights=str(path), size="tiny"))
    assert vfm.model.config.mask_ratio == 0.0
    imgs = images(2)
    x = normalise(imgs, vfm.spec)
    emb = vfm.model.embeddings
    with torch.no_grad():  # embedding output in raster order = patch embedding + position embedding
        expected = emb.patch_embeddings(x) + emb.position_embeddings[:, 1:]
    torch.testing.assert_close(vfm(imgs, [0]).layers[0], expected, atol=1e-6, rtol=0)


def test_siglip_loads_a_single_weights_file(host, tmp_path):
    path, files, reference = make_siglip(tmp_path)
    vfm = build_vfm(host.vfms.get("siglip"), VfmConfig(name="siglip", weights=str(files[0]), size="tiny"))
    imgs = images(2)
    with torch.no_grad():
        final, _ = reference(normalise(imgs, vfm.spec))
    torch.testing.assert_close(vfm(imgs).layers[-1], final, atol=1e-6, rtol=0)


def test_wrong_weights_are_a_user_error(host, tmp_path):
    path, _, _ = make_siglip(tmp_path)
    with pytest.raises(UserError, match="does not hold a Dinov2Model"):
        build_vfm(host.vfms.get("dinov2"), VfmConfig(name="dinov2", weights=str(path / "model.safetensors"), size="tiny"))
    timm_path, _, _ = _make_timm("eva02_large_patch14_clip_224.merged2b")(tmp_path)
    with pytest.raises(UserError, match="does not match timm model"):
        build_vfm(host.vfms.get("eva"), VfmConfig(name="eva", weights=str(timm_path), size="tiny"))


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_target_size_rounds_to_patch_multiples():
    assert target_size(256, 2.0, 16) == 512
    assert target_size(256, 0.875, 14) == 224
    assert target_size(256, 1.75, 14) == 448
    assert target_size(100, 1.0, 16) == 96
    assert target_size(8, 0.25, 16) == 16  # at least one patch


def test_preprocess_upsample_bilinear_matches_hand_computation(host):
    vfm = tiny_random(host, "siglip", input_scale=2.0)
    assert vfm.input_scale == 2.0 and vfm.spec.interpolation == "bilinear"
    imgs = images(2, 32)
    x = imgs.float() / 255.0
    expected = (F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False).clamp(0, 1) - 0.5) / 0.5
    torch.testing.assert_close(vfm.preprocess(imgs), expected, atol=1e-6, rtol=0)
    assert vfm(imgs).grid == (8, 8)
    const = torch.full((1, 3, 16, 16), 51, dtype=torch.uint8)  # 51 / 255 = 0.2 -> (0.2 - 0.5) / 0.5 = -0.6
    torch.testing.assert_close(vfm.preprocess(const), torch.full((1, 3, 32, 32), -0.6), atol=1e-6, rtol=0)


def test_preprocess_downscale_is_antialiased_bicubic_with_imagenet_stats(host):
    vfm = tiny_random(host, "dinov2")
    assert vfm.input_scale == 1.0  # tiny defaults to scale 1 (64 px -> 8x8 grid)
    imgs = images(2, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = imgs.float() / 255.0
    expected = (F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1) - mean) / std
    got = vfm.preprocess(imgs, scale=0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    aliased = (F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1) - mean) / std
    assert (got - aliased).abs().max() > 1e-2
    torch.testing.assert_close(vfm.preprocess(imgs), (x - mean) / std, atol=1e-6, rtol=0)
    white = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    torch.testing.assert_close(vfm.preprocess(white)[0, :, 0, 0], ((1 - mean) / std).flatten(), atol=1e-6, rtol=0)


def test_preprocess_rejects_float_images():
    with pytest.raises(TypeError):
        preprocess(torch.zeros(1, 3, 8, 8), 1.0, 8, "bilinear", (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("name", ["siglip", "dinov2", "dinov2-reg", "clip", "mae", "eva", "eva02-clip"])
def test_dynamic_input_size(host, name):
    """The equivariance regulariser feeds downscaled images: the grid follows the input size."""
    vfm = tiny_random(host, name)
    for scale, grid in ((0.5, (4, 4)), (0.75, (6, 6)), (1.0, (8, 8))):
        out = vfm(images(2), [0, -1], scale=scale)
        assert out.grid == grid
        assert out.layers[-1].shape == (2, grid[0] * grid[1], TINY_WIDTH) and torch.isfinite(out.layers[-1]).all()
    rect = vfm(images(2)[:, :, :48, :], [-1])
    assert rect.grid == (6, 8)


# ---------------------------------------------------------------------------------------------
# Freezing, layer indices, random init


def test_frozen_no_gradients_and_eval(host):
    vfm = tiny_random(host, "siglip")
    assert all(not p.requires_grad for p in vfm.parameters())
    vfm.train()
    assert not vfm.model.training
    with torch.enable_grad():
        out = vfm(images(2), [0, -1])
    assert all(not t.requires_grad for t in out.layers.values())


def test_layer_index_range(host):
    vfm = tiny_random(host, "dinov2")
    with pytest.raises(UserError, match="out of range"):
        vfm(images(1), [5])
    with pytest.raises(UserError, match="out of range"):
        vfm(images(1), [-7])
    with pytest.raises(UserError, match="out of range"):
        build_vfm(vfm.spec, VfmConfig(name="dinov2", size="tiny", pretrained=False, layers=[0, 12, -1]))


def test_random_init_is_seeded_and_identified(host):
    a, b = tiny_random(host, "clip"), tiny_random(host, "clip")
    assert a.weights_id == b.weights_id and a.weights_id.startswith("random-init-")
    imgs = images(2)
    assert torch.equal(a(imgs).layers[-1], b(imgs).layers[-1])
    assert tiny_random(host, "dinov2").weights_id != a.weights_id


def test_weights_id_is_cached_by_path_size_mtime(host, tmp_path):
    path, files, _ = _make_timm("eva02_large_patch14_clip_224.merged2b")(tmp_path)
    cache = tmp_path / "cache"
    cfg = VfmConfig(name="eva02-clip", weights=str(path), size="tiny")
    spec = host.vfms.get("eva02-clip")
    assert build_vfm(spec, cfg, cache).weights_id == sha16(path)
    index_path = cache / "weights-ids.json"
    index = json.loads(index_path.read_text())
    assert list(index.values()) == [sha16(path)]
    index_path.write_text(json.dumps({k: "f" * 16 for k in index}))
    assert build_vfm(spec, cfg, cache).weights_id == "f" * 16  # read from the cache, not re-hashed
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert build_vfm(spec, cfg, cache).weights_id == sha16(path)


# ---------------------------------------------------------------------------------------------
# Weights lookup


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("name", ["siglip", "clip", "eva", "dinov2", "mae"])
def test_missing_weights_offline_fail_fast_with_fix(host, empty_caches, name):
    spec = host.vfms.get(name)
    t = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        build_vfm(spec, VfmConfig(name=name))
    assert time.perf_counter() - t < 10
    msg = str(err.value)
    assert spec.model_id in msg and "--set vfm.weights=PATH" in msg and str(empty_caches) in msg
    assert isinstance(err.value, UserError)


def test_missing_weights_path_is_named(host, tmp_path):
    with pytest.raises(MissingWeightsError, match="nope.safetensors"):
        build_vfm(host.vfms.get("siglip"), VfmConfig(name="siglip", weights=str(tmp_path / "nope.safetensors")))


def _fake_hub_file(root, repo, filename, payload=b"x"):
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / "abc123"
    snap.mkdir(parents=True, exist_ok=True)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text("abc123")
    (snap / filename).write_bytes(payload)
    return snap / filename


def test_library_caches_are_found_without_network(host, empty_caches):
    hf = empty_caches / "hf"
    spec = host.vfms.get("eva")
    f = _fake_hub_file(hf, "timm/eva_giant_patch14_336.clip_ft_in1k", "model.safetensors")
    assert spec.adapter.cached(spec)[0] == f
    spec = host.vfms.get("clip")
    f = _fake_hub_file(hf, "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors")
    assert spec.adapter.cached(spec)[0] == f
    spec = host.vfms.get("clip-b16")
    legacy = empty_caches / "home" / ".cache" / "clip" / "ViT-B-16.pt"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"x")
    assert spec.adapter.cached(spec)[0] == legacy
    spec = host.vfms.get("siglip")
    assert spec.adapter.cached(spec)[0] is None  # config.json but no weights is not a hit
    _fake_hub_file(hf, spec.model_id, "config.json", b"{}")
    assert spec.adapter.cached(spec)[0] is None
    _fake_hub_file(hf, spec.model_id, "model.safetensors")
    assert spec.adapter.cached(spec)[0] == hf / "models--google--siglip2-large-patch16-512" / "snapshots" / "abc123"


# ---------------------------------------------------------------------------------------------
# Registry data, parameter counts, speed


def test_registered_names_and_aliases(host):
    expected = {
        "siglip": "siglip2-l16-512", "siglip2": "siglip2-l16-512", "dinov2": "dinov2-l14", "dinov2-l": "dinov2-l14",
        "dinov2-reg": "dinov2-reg-l14", "clip": "clip-l14", "openclip": "openclip-l14", "mae": "mae-l16",
        "eva-clip": "eva-clip-g14-336", "eva": "eva-clip-g14-336",
    }
    for alias, name in expected.items():
        assert host.vfms.canonical(alias) == name
    assert len(host.vfms) == 31
    for spec in host.vfms:
        assert spec.factory is not None and spec.adapter is not None and spec.library == spec.adapter.library
        assert spec.description and spec.source and spec.paper and spec.license and spec.model_id
        assert spec.interpolation in ("bilinear", "bicubic") and len(spec.mean) == len(spec.std) == 3
        assert spec.default_layers[-1] == -1 and spec.published_params > 0


def test_paper_default_is_siglip2_l16_512(host):
    spec = host.vfms.get("siglip")
    assert (spec.model_id, spec.input_scale, spec.interpolation, spec.mean, spec.std) == (
        "google/siglip2-large-patch16-512", 2.0, "bilinear", (0.5,) * 3, (0.5,) * 3)
    assert spec.default_layers == (0, 12, -1)


def test_spec_metadata_matches_the_architecture(host):
    """width / depth / patch are data on the spec: they must equal the built model's, and the count must be near the published one."""
    for spec in host.vfms:
        with torch.device("meta"):
            model = spec.adapter.build(spec, "full")
        assert spec.adapter.dims(model) == (spec.width, spec.patch_size, spec.depth), spec.name
        count = sum(p.numel() for p in model.parameters())
        assert abs(count / spec.published_params - 1) < 0.1, (spec.name, count)


def test_spec_preprocessing_matches_library_pretrained_configs(host):
    import open_clip
    import timm

    for spec in host.vfms:
        if spec.library == "timm":
            cfg = timm.models.get_pretrained_cfg(spec.model_id)
            assert (tuple(cfg.mean), tuple(cfg.std)) == (spec.mean, spec.std), spec.name
        elif spec.library == "open_clip":
            cfg = open_clip.get_pretrained_cfg(spec.model_id, spec.weights_tag)
            assert (tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"]) == (spec.mean, spec.std, spec.interpolation), spec.name
            assert f"{cfg['hf_hub'].rstrip('/')}" == spec.source


@pytest.mark.parametrize("name, expected", [("dinov2-l14", 304e6), ("siglip2-l16-512", 317e6), ("clip-b16", 86e6)])
def test_full_size_param_counts(host, name, expected):
    count = vfm_param_count(host.vfms.get(name))
    assert abs(count / expected - 1) < 0.01, count


def test_param_count_exact_for_the_paper_default(host):
    assert vfm_param_count(host.vfms.get("siglip")) == 316_742_656  # SigLIP-L/16 @ 512 incl. attention-pooling head
    assert vfm_param_count(host.vfms.get("siglip"), "tiny") < 1_000_000


@pytest.mark.parametrize("name", ["siglip", "dinov2", "clip", "mae", "eva"])
def test_tiny_forward_is_fast(host, name):
    """The smoke size: 32 images at 64 px in milliseconds. Measured as single-thread CPU time,
    which other processes on a shared machine do not inflate the way they inflate wall time."""
    vfm = tiny_random(host, name)
    assert isinstance(vfm, FrozenVfm)
    imgs = images(32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vfm(imgs, vfm.default_layers)
        best = float("inf")
        for _ in range(5):
            t = time.process_time()
            out = vfm(imgs, vfm.default_layers)
            best = min(best, time.process_time() - t)
    finally:
        torch.set_num_threads(threads)
    assert out.grid == (8, 8) and set(out.layers) == {0, 2, -1}
    assert best < 0.25, f"{name}: {best * 1000:.1f} ms CPU for 32 images"  # ~15-35 ms measured


def test_open_clip_folder_prefers_the_open_clip_file(host, tmp_path):
    from safetensors.torch import save_file

    path, _, reference = make_open_clip(tmp_path)
    folder = tmp_path / "repo"
    folder.mkdir()
    save_file(torch.load(path, weights_only=True), str(folder / "open_clip_model.safetensors"))
    save_file({"unrelated": torch.zeros(3)}, str(folder / "model.safetensors"))  # the timm-format file of the same hub repo
    vfm = build_vfm(host.vfms.get("clip"), VfmConfig(name="clip", weights=str(folder), size="tiny"))
    assert vfm.weights_id == sha16(folder / "open_clip_model.safetensors")
    imgs = images(2)
    with torch.no_grad():
        final, _ = reference(normalise(imgs, vfm.spec))
    torch.testing.assert_close(vfm(imgs).layers[-1], final[:, 1:], atol=1e-6, rtol=0)


def test_size_mismatch_is_a_user_error(host, tmp_path):
    path, files, _ = make_siglip(tmp_path)
    with pytest.raises(UserError, match="could not be loaded"):
        build_vfm(host.vfms.get("siglip"), VfmConfig(name="siglip", weights=str(files[0]), size="full"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_uses_bf16_autocast_and_returns_float32(host):
    cpu = tiny_random(host, "siglip")
    gpu = tiny_random(host, "siglip").cuda()
    imgs = images(4)
    ref = cpu(imgs, [-1]).layers[-1]
    out = gpu(imgs.cuda(), [-1]).layers[-1]
    assert out.dtype == torch.float32 and out.is_cuda
    assert not torch.equal(out.cpu(), ref)  # bf16 compute differs from fp32 ...
    torch.testing.assert_close(out.cpu(), ref, atol=0.1, rtol=0.05)  # ... within bf16 precision


def test_open_clip_off_grid_matches_library_pos_embed_resize(host, tmp_path):
    """Off the native grid, tokens equal an open_clip model built at that size whose weights went
    through open_clip's own ``resize_pos_embed``."""
    import open_clip
    from open_clip.factory import resize_pos_embed

    path, _, _ = make_open_clip(tmp_path)
    vfm = build_vfm(host.vfms.get("clip"), VfmConfig(name="clip", weights=str(path), size="tiny"))
    vision = dict(image_size=48, patch_size=8, width=64, layers=4, head_width=32)
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    at48 = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    sd = torch.load(path, weights_only=True)
    resize_pos_embed(sd, at48)
    at48.load_state_dict(sd)
    at48.visual.output_tokens = True
    imgs = images(2, 48)
    with torch.no_grad():
        _, expected = at48.visual(normalise(imgs, vfm.spec))
    out = vfm(imgs, [-1])
    assert out.grid == (6, 6)
    torch.testing.assert_close(out.layers[-1], expected, atol=1e-5, rtol=0)


def test_meta_build_for_dry_runs(host, empty_caches):
    """No weights anywhere, yet a dry run gets the real architecture (and reads nothing)."""
    spec = host.vfms.get("siglip")
    vfm = build_vfm(spec, VfmConfig(name="siglip"), meta=True)
    assert vfm.weights_id == "meta" and vfm.device.type == "meta" and vfm.spec == spec  # full size: nothing to resolve
    assert (vfm.embed_dim, vfm.patch_size, vfm.num_blocks, vfm.input_scale, vfm.default_layers) == (1024, 16, 24, 2.0, (0, 12, -1))
    assert sum(p.numel() for p in vfm.parameters()) == vfm_param_count(spec)


@pytest.mark.parametrize("name", ["siglip", "clip", "eva"])
def test_unreadable_weights_file_is_a_user_error(host, tmp_path, name):
    for bad in (tmp_path / "weights.bin", tmp_path / "weights.safetensors"):
        bad.write_bytes(b"not a checkpoint")
        with pytest.raises(UserError, match=bad.name):
            build_vfm(host.vfms.get(name), VfmConfig(name=name, weights=str(bad), size="tiny"))


def test_open_clip_reads_torchscript_archives(host, tmp_path):
    """OpenAI distributes CLIP as TorchScript .pt files; their ``visual.*`` tensors load."""
    import warnings

    import open_clip

    path, _, reference = make_open_clip(tmp_path)
    vision = dict(image_size=64, patch_size=8, width=64, layers=4, head_width=32)
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    jit_path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is what OpenAI ships
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model.visual), str(jit_path))
    vfm = build_vfm(host.vfms.get("clip"), VfmConfig(name="clip", weights=str(jit_path), size="tiny"))
    imgs = images(2)
    with torch.no_grad():
        final, _ = reference(normalise(imgs, vfm.spec))
    torch.testing.assert_close(vfm(imgs).layers[-1], final[:, 1:], atol=1e-6, rtol=0)
