"""Golden tests: LightningDiT (+ CFG + Euler ODE sampler) and REG SiT (+ Euler-Maruyama sampler) against the
outputs of the reference code (../shared/golden/{lightningdit,reg-sit}; README sections 2 and 3), the
reference-layout weights loaded through ``diffusion.weights`` as a user's released checkpoint is."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vfmbench.config import resolve
from vfmbench.diffusion_weights import denormalize_released, read_latent_stats, sample_to_latents, sampling_model
from vfmbench.errors import UserError
from vfmbench.sampling import sample, sampler_protocol, time_grid

from helpers import golden

pytestmark = pytest.mark.usefixtures("one_thread")

LDIT = golden("lightningdit")
REG = golden("reg-sit")
LDIT_FIX = json.loads((LDIT / "fixture.json").read_text())
REG_FIX = json.loads((REG / "fixture.json").read_text())
LATENT = (32, 4, 4)


def ldit_args() -> dict:
    k = LDIT_FIX["constructor"]["kwargs"]
    return {"width": k["hidden_size"], "depth": k["depth"], "heads": k["num_heads"], "patch_size": k["patch_size"],
            "mlp_ratio": k["mlp_ratio"], "qk_norm": k["use_qknorm"], "swiglu": k["use_swiglu"], "rope": k["use_rope"],
            "rmsnorm": k["use_rmsnorm"]}


def reg_args() -> dict:
    k = REG_FIX["constructor"]["kwargs"]
    return {"width": k["hidden_size"], "depth": k["depth"], "heads": k["num_heads"], "patch_size": k["patch_size"],
            "mlp_ratio": k["mlp_ratio"], "qk_norm": k["qk_norm"], "align": "reg", "align_dim": k["z_dims"][0],
            "projector_dim": k["projector_dim"], "align_depth": k["encoder_depth"]}


def load(host, name: str, args: dict, weights, **diffusion):
    """Build and load exactly as the sample stage does (``diffusion.weights`` -> ``sampling_model``)."""
    cfg = resolve([{"diffusion": {"name": name, "args": args, "weights": str(weights), **diffusion}}])
    model, info = sampling_model(host, cfg, LATENT, 1000)
    return model, info, cfg


@pytest.fixture(scope="module")
def ldit():
    from vfmbench.plugins import get_plugin_manager

    model, info, _ = load(get_plugin_manager(), "lightningdit", ldit_args(), LDIT / "model.safetensors")
    assert info["layout"] == "reference" and info["tensors"] == LDIT_FIX["weights"]["n_tensors"] - 3  # pos_embed, RoPE tables: checked
    return model


@pytest.fixture(scope="module")
def reg():
    from vfmbench.plugins import get_plugin_manager

    model, info, _ = load(get_plugin_manager(), "sit", reg_args(), REG / "model.safetensors")
    assert info["layout"] == "reference" and info["tensors"] == REG_FIX["weights"]["n_tensors"] - 1  # pos_embed: checked
    return model


# ---------------------------------------------------------------------------------------------
# LightningDiT


def test_lightningdit_forward(ldit):
    f = load_file(LDIT / "forward.safetensors")
    with torch.no_grad():
        out = ldit(f["x"], f["t"], f["y"])
    torch.testing.assert_close(out, f["out"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["guided", "unguided"])
def test_lightningdit_guided_velocity(ldit, which):
    """forward_with_cfg: CFG 4.0 on output channels 0-2 only, off for t < 0.125; the first half is the guided velocity."""
    from vfmbench.sampling import GuidedVelocity, _guidance_mask

    c = load_file(LDIT / "cfg.safetensors")
    s = LDIT_FIX["sample_settings"]
    half = c["x"].shape[0] // 2
    t = c[f"t_{which}"]
    assert (float(t[0]) >= s["cfg_interval_start"]) == (which == "guided")
    mask, scale = _guidance_mask(LATENT, 0, 3, s["cfg_scale"], None, torch.device("cpu"), torch.float32)
    vel = GuidedVelocity(ldit, c["y"][:half], s["null_label"], s["cfg_scale"], (s["cfg_interval_start"], 1.0), mask=mask, scale=scale)
    with torch.no_grad():
        v = vel(c["x"][:half], float(t[0]))
    torch.testing.assert_close(v, c[f"out_{which}"][:half], atol=1e-5, rtol=1e-5)
    if which == "guided":  # channels 3.. are the conditional output, channels 0-2 are not
        torch.testing.assert_close(v[:, 3:], c["cond_guided"][:, 3:], atol=1e-5, rtol=1e-5)
        assert (v[:, :3] - c["cond_guided"][:, :3]).abs().max() > 1e-2


def test_lightningdit_time_grid_is_exact():
    s = load_file(LDIT / "sampler.safetensors")
    shift = LDIT_FIX["sample_settings"]["timestep_shift"]
    g250 = time_grid(249, shift=shift, dtype=torch.float32)  # num_sampling_steps 250 = 250 points = 249 Euler steps
    assert torch.equal(g250, s["grid_250"])
    assert torch.equal(time_grid(s["grid_n"].numel() - 1, shift=shift, dtype=torch.float32), s["grid_n"])
    assert int((g250[:-1] < LDIT_FIX["sample_settings"]["cfg_interval_start"]).sum()) == LDIT_FIX["grid_250_summary"]["steps_with_cfg_off"]


@pytest.mark.parametrize("cfg", [True, False])
def test_lightningdit_sampling_run(ldit, cfg):
    s = load_file(LDIT / "sampler.safetensors")
    st = LDIT_FIX["sample_settings"]
    steps = s["grid_n"].numel() - 1
    guide = dict(cfg_scale=st["cfg_scale"], cfg_interval=(st["cfg_interval_start"], 1.0), guided_channels=3) if cfg else {}
    traj: list = []
    z = sample(ldit, s["z"], s["y"], sampler="euler", steps=steps, timestep_shift=st["timestep_shift"], trajectory=traj, **guide)
    key = "cfg" if cfg else "nocfg"
    ref_traj = s[f"trajectory_{key}"][:, : s["z"].shape[0]]  # CFG: the conditional half of the doubled batch
    torch.testing.assert_close(torch.stack(traj), ref_traj, atol=1e-4, rtol=0)
    torch.testing.assert_close(z, s[f"sample_{key}"], atol=1e-4, rtol=0)
    if cfg:
        mean, std = s["latent_mean"].flatten(), s["latent_std"].flatten()
        torch.testing.assert_close(denormalize_released(z, mean, std, st["latent_multiplier"]), s["sample_cfg_denormalized"], atol=1e-4, rtol=0)


def test_lightningdit_denormalisation_through_config(tmp_path):
    """``diffusion.latent_stats`` (a latents_stats.pt of [1, C, 1, 1] mean/std) de-normalises the samples as inference.py does."""
    s = load_file(LDIT / "sampler.safetensors")
    torch.save({"mean": s["latent_mean"], "std": s["latent_std"]}, tmp_path / "latents_stats.pt")
    cfg = resolve([{"diffusion": {"latent_stats": str(tmp_path / "latents_stats.pt")}}])
    out = sample_to_latents(None, s["sample_cfg"], cfg.diffusion)
    torch.testing.assert_close(out, s["sample_cfg_denormalized"], atol=1e-6, rtol=0)
    mean, std = read_latent_stats(tmp_path / "latents_stats.pt")
    assert mean.shape == std.shape == (32,)


# ---------------------------------------------------------------------------------------------
# REG SiT


def test_reg_forward(reg):
    f = load_file(REG / "forward.safetensors")
    with torch.no_grad():
        v, v_cls, hidden = reg.reference(f["x"], f["t"], f["y"], f["cls_token"], capture=True)
        zs = reg.projector(hidden)
        # vfmbench's convention: t' = 1 - t, velocities data - noise
        v2, v2_cls = reg(f["x"], 1 - f["t"].double(), f["y"], joint=f["cls_token"])
    torch.testing.assert_close(v, f["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cls, f["cls_out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zs, f["zs_0"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(-v2, f["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(-v2_cls, f["cls_out"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [True, False])
def test_reg_euler_maruyama_replay(reg, cfg):
    s = load_file(REG / "sampler.safetensors")
    st = REG_FIX["sample_settings"]
    steps = st["num_steps"]
    assert torch.equal(1 - time_grid(steps, last_step=0.04), s["t_steps"]) or torch.allclose(1 - time_grid(steps, last_step=0.04), s["t_steps"], atol=1e-15, rtol=0)
    guide = dict(cfg_scale=st["cfg_scale"], joint_cfg_scale=st["cls_cfg_scale"],
                 cfg_interval=(1 - st["guidance_high"], 1 - st["guidance_low"])) if cfg else {}
    traj: list = []
    calls: list = []
    hook = reg.register_forward_pre_hook(lambda mod, args: calls.append((args[0].shape[0], args[1][0].item(), args[0].dtype)))
    try:
        z = sample(reg, s["z"].double(), s["y"], sampler="euler-maruyama", steps=steps, joint_noise=s["cls_z"].double(),
                   sde_noise=(s["noise_x"], s["noise_cls"]), trajectory=traj, **guide)
    finally:
        hook.remove()
    key = "cfg" if cfg else "nocfg"
    assert z.dtype == torch.float64
    # one model call per step, in float32, batched 2B exactly where REG guides (t_REG <= 0.8), at REG's times
    assert [c[0] for c in calls] == s[f"model_batch_{key}"].tolist() and {c[2] for c in calls} == {torch.float32}
    torch.testing.assert_close(1 - torch.tensor([c[1] for c in calls]), s[f"t_model_{key}"], atol=1e-7, rtol=0)
    torch.testing.assert_close(z, s[f"sample_{key}"], atol=1e-4, rtol=0)
    # the state at every model call (the trajectory's points but the last)
    torch.testing.assert_close(torch.stack(traj[:-1]).float(), s[f"states_x_{key}"], atol=1e-4, rtol=0)


def test_reg_noise_is_drawn_from_the_generator_without_replay(reg):
    s = load_file(REG / "sampler.safetensors")
    kw = dict(sampler="euler-maruyama", steps=4, joint_noise=s["cls_z"].double())
    a = sample(reg, s["z"].double(), s["y"], generator=torch.Generator().manual_seed(0), **kw)
    b = sample(reg, s["z"].double(), s["y"], generator=torch.Generator().manual_seed(0), **kw)
    c = sample(reg, s["z"].double(), s["y"], generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------
# A perturbed fixture fails; released-file layouts


def test_one_changed_weight_fails_the_comparison(host, tmp_path):
    sd = load_file(LDIT / "model.safetensors")
    sd["blocks.1.mlp.w3.weight"][0, 0] += 0.05
    save_file(sd, tmp_path / "perturbed.safetensors")
    model, _, _ = load(host, "lightningdit", ldit_args(), tmp_path / "perturbed.safetensors")
    f = load_file(LDIT / "forward.safetensors")
    with torch.no_grad():
        out = model(f["x"], f["t"], f["y"])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, f["out"], atol=1e-5, rtol=1e-5)

    sd = load_file(REG / "model.safetensors")
    sd["wg_norm.bias"][0] += 0.05
    save_file(sd, tmp_path / "perturbed-reg.safetensors")
    model, _, _ = load(host, "sit", reg_args(), tmp_path / "perturbed-reg.safetensors")
    f = load_file(REG / "forward.safetensors")
    with torch.no_grad():
        v, v_cls, _ = model.reference(f["x"], f["t"], f["y"], f["cls_token"])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(v_cls, f["cls_out"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wrap", ["ema", "model", "module-prefix"])
def test_released_pt_files_load_safely(host, tmp_path, wrap, ldit):
    """A released LightningDiT .pt nests the state dict under 'ema' (or 'model'); DDP adds 'module.'."""
    sd = load_file(LDIT / "model.safetensors")
    if wrap == "module-prefix":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = {wrap: sd, "opt": {"step": torch.tensor(3)}, "args": argparse.Namespace(lr=1e-4, model="LightningDiT-XL/1")}
    torch.save(obj, tmp_path / "released.pt")
    model, info, _ = load(host, "lightningdit", ldit_args(), tmp_path / "released.pt")
    assert info["nested_under"] == ("" if wrap == "module-prefix" else wrap)
    f = load_file(LDIT / "forward.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(f["x"], f["t"], f["y"]), ldit(f["x"], f["t"], f["y"]), atol=0, rtol=0)


class Payload:  # an arbitrary class: unpickling it needs weights_only=False, which vfmbench never uses
    pass


def test_unsafe_pickles_and_wrong_configs_are_user_errors(host, tmp_path):
    torch.save({"ema": {}, "obj": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(UserError, match="weights_only=True"):
        load(host, "lightningdit", ldit_args(), tmp_path / "unsafe.pt")
    with pytest.raises(UserError, match="pos_embed differs"):  # the file is width 64; the model asked for 96
        load(host, "lightningdit", {**ldit_args(), "width": 96}, LDIT / "model.safetensors")
    with pytest.raises(UserError, match="missing .*blocks.2"):  # the file has 2 blocks
        load(host, "lightningdit", {**ldit_args(), "depth": 3}, LDIT / "model.safetensors")
    with pytest.raises(UserError, match="has shape"):  # SwiGLU hidden width from mlp_ratio
        load(host, "lightningdit", {**ldit_args(), "mlp_ratio": 2.0}, LDIT / "model.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        load(host, "lightningdit", ldit_args(), tmp_path / "missing.pt")
    with pytest.raises(UserError, match="pos_embed|rope|RoPE"):  # the file's RoPE tables belong to a 4x4 grid
        cfg = resolve([{"diffusion": {"name": "lightningdit", "args": ldit_args(), "weights": str(LDIT / "model.safetensors")}}])
        sampling_model(host, cfg, (32, 8, 8), 1000)


def test_sampler_protocol_records_guided_channels_and_shift():
    cfg = resolve([{"diffusion": {"sample": {"guided_channels": 3, "timestep_shift": 0.3, "cfg_scale": 4.0, "cfg_interval": [0.125, 1.0]}}}])
    p = sampler_protocol(cfg.diffusion.sample)
    assert p["guided_channels"] == 3 and p["timestep_shift"] == 0.3 and p["cfg_interval"] == [0.125, 1.0]
    assert sampler_protocol(resolve([{}]).diffusion.sample)["guided_channels"] == "all"


def test_bad_diffusion_settings_stop_before_any_work(host, tmp_path):
    from vfmbench.runner import validate

    for over, match in (({"weights": str(tmp_path / "none.pt")}, "diffusion.weights"),
                        ({"latent_stats": str(tmp_path / "none.pt")}, "diffusion.latent_stats"),
                        ({"latent_multiplier": 0.0}, "latent_multiplier"),
                        ({"sample": {"guided_channels": -1}}, "guided_channels"),
                        ({"train": {"precision": "fp16"}}, "diffusion.train.precision")):
        with pytest.raises(UserError, match=match):
            validate(host, resolve([{"diffusion": over}]))
    assert not any(tmp_path.iterdir())
