"""VFM-VAE's projected-discriminator backbone: DINO (v1) ViT-S/16 through timm, local weights
through ``tokenizer.args.disc_vfm_weights``, errors that name the discriminator backbone, and bad
discriminator settings stopping ``vfmbench run`` (dry or real) before anything is written."""
import json

import pytest
import torch

from vfmbench.build import BuildContext, build_tokenizer
from vfmbench.cli import main
from vfmbench.config import resolve
from vfmbench.errors import UserError
from vfmbench.interfaces import TrainStage

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dino_file(path):
    """A tiny random DINO ViT (the library class at CPU size) saved as timm writes it."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(11)
    model = timm.create_model("vit_small_patch16_224.dino", pretrained=False, img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2)
    save_file(model.state_dict(), str(path))
    return model.state_dict()


def smoke_tokenizer(host, **disc):
    cfg = resolve([dict(host.presets.get("smoke").values), {"component_args": {"vfm-vae": disc}}])
    torch.manual_seed(0)
    return build_tokenizer(BuildContext(host=host, config=cfg))


def gan_stage(tok):
    stage = next(s for s in tok.training_stages(1024, 1e-3) if s.settings["gan"] > 0)
    return TrainStage(stage.name, stage.images, stage.lr, stage.settings)


def test_paper_preset_uses_dino_v1_vits16(host):
    values = host.presets.get("vfm-vae-paper").values["component_args"]["vfm-vae"]
    spec = host.vfms.get(values["disc_vfm"])
    assert (spec.name, spec.library, spec.model_id, spec.patch_size, spec.width, spec.depth) == (
        "dino-s16", "timm", "vit_small_patch16_224.dino", 16, 384, 12)
    assert values["disc_hooks"] == [0, 3, 6, 9, 12] and values["disc_resolution"] == 224
    assert host.vfms.canonical("dino") == "dino-s16"


def test_discriminator_backbone_loads_local_weights_and_uses_the_generator_vfms_interpolation(host, tmp_path):
    state = tiny_dino_file(tmp_path / "model.safetensors")
    tok = smoke_tokenizer(host, disc_vfm="dino-s16", disc_vfm_weights=str(tmp_path / "model.safetensors"))
    tok.begin_stage(gan_stage(tok))
    disc = tok.disc["projected"]
    bb = disc.backbone
    assert bb.spec.name == "dino-s16" and not bb.weights_id.startswith("random-init")
    mine = bb.model.state_dict()
    for k, v in state.items():
        if k in mine:
            assert torch.equal(mine[k], v), k
    assert disc.interpolation == tok.vfm.spec.interpolation == "bilinear"  # SigLIP's, not DINO's bicubic
    assert bb.spec.interpolation == "bicubic"
    with torch.no_grad():
        assert disc(torch.rand(2, 3, 64, 64) * 2 - 1).shape[0] == 2


def test_discriminator_weight_errors_name_the_discriminator_backbone(host, tmp_path):
    with pytest.raises(UserError, match=r"tokenizer\.args\.disc_vfm_weights=.*does not exist") as e:
        smoke_tokenizer(host, disc_vfm="dino-s16", disc_vfm_weights=str(tmp_path / "missing.safetensors"))
    assert "discriminator backbone" in str(e.value) and "vfm.weights" not in str(e.value)
    # a file of another architecture: the library's error, attributed to the discriminator
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    tok = smoke_tokenizer(host, disc_vfm="dino-s16", disc_vfm_weights=str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError) as e:
        tok.begin_stage(gan_stage(tok))
    msg = str(e.value)
    assert msg.startswith("discriminator backbone (tokenizer.args.disc_vfm='dino-s16')") and "tokenizer.args.disc_vfm_weights=" in msg
    assert " vfm.weights" not in msg
    with pytest.raises(UserError, match="discriminator backbone.*unknown vfm 'dino-s17'"):
        smoke_tokenizer(host, disc_vfm="dino-s17")


@pytest.mark.parametrize("setting, value, message", [
    ("disc_hooks", [0, 9], r"disc_hooks=\[0, 9\].*discriminator backbone 'dino-s16' \(tiny, 4 blocks\)"),
    ("disc_vfm", "dinov9", "discriminator backbone.*unknown vfm"),
    ("disc_crop_p", 1.5, "disc_crop_p=1.5"),
    ("disc_vfm_weights", "/nonexistent/dino.safetensors", "disc_vfm_weights='/nonexistent/dino.safetensors'.*does not exist"),
])
def test_bad_discriminator_settings_stop_dry_and_real_runs_before_any_write(tmp_path, capsys, setting, value, message):
    import re

    out = tmp_path / "runs"
    sets = ["--set", f"component_args.vfm-vae.{setting}={json.dumps(value)}", "--out", str(out)]
    assert main(["run", "--preset", "smoke", "--dry-run", *sets]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert main(["run", "--preset", "smoke", *sets]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() or not any(out.iterdir())


def test_real_run_preflight_finds_missing_discriminator_weights_without_writing(tmp_path, capsys):
    """Offline, pretrained, nothing cached: the run names the discriminator backbone before writing."""
    out = tmp_path / "runs"
    sig = tmp_path / "siglip"
    import transformers

    from vfmbench_plugins.backbones.siglip import TINY

    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY)).save_pretrained(str(sig))
    rc = main(["run", "--preset", "smoke", "--set", "vfm.pretrained=true", "--set", f"vfm.weights={sig}",
               "--set", "vfm.size=full", "--set", "vfm.input_scale=1.0", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "discriminator backbone 'dino-s16' (full, 12 blocks)" in err and "tokenizer.args.disc_vfm_weights" in err
    assert not out.exists() or not any(out.iterdir())
