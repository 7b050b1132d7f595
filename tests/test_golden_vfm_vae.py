"""Golden fixture ``vfm-vae`` (../shared/golden/vfm-vae, README section 1): the official VFM-VAE
Generator (tianciB/VFM-VAE @ b3a752a) at a tiny 64 px config, saved in the released stage-3 layout
(no VF projector), with a tiny SigLIP as a ``save_pretrained`` folder. Loaded the way a user loads
released weights (``tokenizer.weights`` + ``vfm.weights``), every output is compared with what the
official code produced: SigLIP taps, posterior mean / log-variance, decompressed latent, style
vectors, decode(mean) and its multi-scale images, and the seeded posterior sample path."""
import json

import pytest
import torch
from helpers import golden
from safetensors.torch import load_file, save_file

from vfmbench.build import BuildContext, build_tokenizer
from vfmbench.checkpoint import load_torch
from vfmbench.config import resolve
from vfmbench.context import load_tokenizer_state

GOLD = golden("vfm-vae")
FIX = json.loads((GOLD / "fixture.json").read_text())
KW = FIX["generator_kwargs"]
ENC_ATOL, IMG_ATOL = 1e-5, 1e-4  # fixture.json "tolerances"

pytestmark = pytest.mark.usefixtures("one_thread")


def golden_config(weights):
    """The fixture's Generator settings as this suite's config (values read from fixture.json where
    they have a direct counterpart; the decoder's per-block widths, depths and kernels are those of
    the official SynthesisNetwork at channel_base 4096 / channel_max 64, as the state dict holds them)."""
    blocks = KW["num_blocks"]
    return resolve([{
        "run": {"smoke": True, "device": "cpu", "stages": ["tokenizer", "recon-eval", "results"]},
        "data": {"dataset": "shapes", "resolution": KW["img_resolution"]},
        "vfm": {"name": "siglip2-l16-512", "weights": str(GOLD / "siglip"), "layers": KW["patch_from_layers"],
                "input_scale": KW["scale_factor"]},
        "tokenizer": {"name": "vfm-vae", "weights": str(weights)},
        "component_args": {
            "vfm-vae": {"latent_channels": KW["z_dimension"], "downsample": KW["resolution_compression_factor"],
                        "compress_width": KW["patch_out_dimensions"][0],
                        "decompress_width": KW["z_dimension"] * KW["decompress_factor"]},
            "vfm-vae-decoder": {"channels": [64, 64, 32, 16], "layers": [1 + 3 * KW["synthesis_kwargs"]["num_res_blocks"]] * blocks,
                                "kernel_sizes": [5, 5, 7, 7], "blur": [3, 3, 3, 5],
                                "inject_blocks": KW["concat_z_block_indices"], "inject_channels": KW["concat_z_mapped_dims"],
                                "attn_blocks": KW["attn_block_indices"], "attn_depth": KW["attn_depths"][0], "attn_heads": 8,
                                "w_dim": KW["z_dim_for_mapping_mlp_output"], "const_noise": KW["legacy"],
                                "noise_resolution": KW["img_resolution"]},
        },
    }])


def load_released(host, weights):
    """Build from the config and load ``tokenizer.weights`` as the tokenizer stage does."""
    cfg = golden_config(weights)
    torch.manual_seed(0)
    tok = build_tokenizer(BuildContext(host=host, config=cfg))
    load_tokenizer_state(tok, load_torch(cfg.tokenizer.weights))
    return tok.eval()


@pytest.fixture(scope="module")
def io():
    return load_file(str(GOLD / "io.safetensors"))


@pytest.fixture(scope="module")
def released():
    from vfmbench.plugins import get_plugin_manager

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_released(get_plugin_manager(), GOLD / "generator.safetensors")
    finally:
        torch.set_num_threads(n)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a - b).abs().max())


def test_fixture_is_the_released_stage3_layout():
    state = load_file(str(GOLD / "generator.safetensors"))
    assert len(state) == FIX["weights"]["n_tensors"]
    assert not any(k.startswith("ldm_adapter.linear_proj") for k in state)  # use_vf_loss=False
    assert KW["use_vf_loss"] is False and KW["legacy"] is True


def test_vfm_weights_folder_is_the_generators_siglip_tower(released):
    """``vfm.weights`` (the save_pretrained folder) gives the same tower the Generator file carries."""
    state = load_file(str(GOLD / "generator.safetensors"))
    prefix = "vfm_encoder.encoder.vision_model."
    tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    mine = released.vfm.model.state_dict()
    assert len(tower) == FIX["weights"]["n_vfm_encoder_tensors"]
    for k, v in tower.items():
        assert torch.equal(mine[k], v), k


def test_siglip_taps(released, io):
    with torch.no_grad():
        out = released.vfm(io["images"], sorted(set(KW["patch_from_layers"])))
    for i, layer in enumerate(KW["patch_from_layers"]):
        assert maxdiff(out.layers[layer].float(), io[f"vfm_patch_features_{i}"]) < ENC_ATOL, layer


def test_posterior_mean_and_logvar(released, io):
    with torch.no_grad():
        post = released.encode(io["images"])
    assert maxdiff(post.mean, io["posterior_mean"]) < ENC_ATOL
    assert maxdiff(post.logvar, io["posterior_logvar"]) < ENC_ATOL
    assert maxdiff(torch.cat([post.mean, post.logvar], 1), io["moments"]) < ENC_ATOL  # logvar within [-30, 20] here


def test_decompressed_latent_and_style(released, io):
    with torch.no_grad():
        h = released.decompress(io["posterior_mean"])
        w = released.decoder.style(h)
    assert maxdiff(h, io["decompressed_mean"]) < ENC_ATOL
    assert maxdiff(w[:, None].expand_as(io["ws_mean"]), io["ws_mean"]) < ENC_ATOL  # one w broadcast to every layer


def test_decode_mean_and_multiscale(released, io):
    with torch.no_grad():
        img, lower = released.decode_multiscale(io["posterior_mean"])
    assert maxdiff(img, io["decoded_mean"]) < IMG_ATOL
    official = [io[f"multiscale_mean_{i}"] for i in range(KW["num_blocks"] - 1)]  # official order: largest first
    assert len(lower) == len(official)
    for mine, ref in zip(lower[::-1], official):
        assert maxdiff(mine, ref) < IMG_ATOL, tuple(ref.shape)


def test_seeded_posterior_sample_and_forward(released, io):
    """The official ``Generator.encode`` returns a sample drawn right after the seed: our
    ``encode(x).sample()`` draws the same eps, and decoding it is the official forward pass."""
    with torch.no_grad():
        post = released.encode(io["images"])
        torch.manual_seed(FIX["seeds"]["posterior_sample"])
        z = post.sample()
        img, lower = released.decode_multiscale(z)
    assert maxdiff((z - post.mean) / post.std, io["posterior_eps"]) < 1e-4
    assert maxdiff(z, io["posterior_sample"]) < ENC_ATOL
    assert maxdiff(img, io["decoded_sample"]) < IMG_ATOL
    assert maxdiff(img, io["forward_gen_img"]) < IMG_ATOL
    for i, mine in enumerate(lower[::-1]):
        assert maxdiff(mine, io[f"forward_multiscale_{i}"]) < IMG_ATOL


def test_missing_vf_projector_keeps_the_models_own(host, capfd):
    """The stage-3 file has no ``ldm_adapter.linear_proj``: the load keeps the model's projector and says so."""
    cfg = golden_config(GOLD / "generator.safetensors")
    torch.manual_seed(0)
    tok = build_tokenizer(BuildContext(host=host, config=cfg))
    before = tok.vf_proj.weight.detach().clone()
    capfd.readouterr()
    load_tokenizer_state(tok, load_torch(cfg.tokenizer.weights))
    assert torch.equal(tok.vf_proj.weight, before)
    assert "no VF projector" in capfd.readouterr().err


@pytest.mark.parametrize("key, index, what", [
    ("ldm_adapter.final_quant.blocks.0.proj.weight", (0, 0), "encoder"),
    ("synthesis.blocks.3.conv0.dwconv.weight", (0, 0, 3, 3), "decoder"),
])
def test_a_perturbed_fixture_fails_the_comparison(host, io, tmp_path, key, index, what):
    """One weight of the file changed: the comparison that passes above now fails."""
    state = load_file(str(GOLD / "generator.safetensors"))
    state[key] = state[key].clone()
    state[key][index] += 0.5
    save_file(state, str(tmp_path / "perturbed.safetensors"))
    tok = load_released(host, tmp_path / "perturbed.safetensors")
    with torch.no_grad():
        if what == "encoder":
            err = maxdiff(tok.encode(io["images"]).mean, io["posterior_mean"])
            assert err > ENC_ATOL
        else:
            err = maxdiff(tok.decode(io["posterior_mean"]), io["decoded_mean"])
            assert err > IMG_ATOL


def test_eval_reconstruction_cli_loads_and_reconstructs_the_released_file(tmp_path, capfd):
    """``vfmbench eval reconstruction --tokenizer vfm-vae --weights FILE`` on the stage-3 file (smoke metrics)."""
    import yaml

    from vfmbench.cli import main
    from vfmbench.results import read_rows

    cfg = golden_config(GOLD / "generator.safetensors")
    layer = {"data": {"dataset": "shapes", "resolution": 64, "val_images": 8}, "metrics": {"recon_images": 8, "batch_size": 8},
             "vfm": {"name": cfg.vfm.name, "weights": cfg.vfm.weights, "layers": cfg.vfm.layers, "input_scale": cfg.vfm.input_scale,
                     "size": "full", "pretrained": True},
             "component_args": {k: cfg.component_args[k] for k in ("vfm-vae", "vfm-vae-decoder")}}
    (tmp_path / "golden.yaml").write_text(yaml.safe_dump(layer))
    rc = main(["eval", "reconstruction", "--preset", "smoke", "--smoke", "--tokenizer", "vfm-vae", "--weights",
               str(GOLD / "generator.safetensors"), "--config", str(tmp_path / "golden.yaml"), "--out", str(tmp_path / "runs")])
    assert rc == 0
    run_dir = next((tmp_path / "runs").iterdir())
    rows = {r["metric"]: r for r in read_rows(run_dir / "results.jsonl")}
    assert {"psnr", "lpips", "ssim", "rfid"} <= set(rows)
    assert all(r["label"] == "smoke" for r in rows.values())
    assert 5.0 < rows["psnr"]["value"] < 60.0  # a real reconstruction, not a blank image
    assert rows["psnr"]["protocol"]["eval_transform"] == "dataset-native"  # shapes draws its own images
    assert "no VF projector" in capfd.readouterr().err


def test_a_release_with_another_vfm_tower_is_reported(host, tmp_path, capfd):
    """The file's own SigLIP tower (ignored: the VFM comes from vfm.weights) is compared with the
    loaded VFM: identical here (nothing said), one changed tensor is reported on stderr."""
    capfd.readouterr()
    load_released(host, GOLD / "generator.safetensors")
    assert "frozen VFM differs" not in capfd.readouterr().err
    state = load_file(str(GOLD / "generator.safetensors"))
    key = "vfm_encoder.encoder.vision_model.post_layernorm.weight"
    state[key] = state[key] + 0.1
    save_file(state, str(tmp_path / "other-tower.safetensors"))
    load_released(host, tmp_path / "other-tower.safetensors")
    assert "frozen VFM differs from vfm 'siglip2-l16-512'" in capfd.readouterr().err
