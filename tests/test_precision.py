"""Precision and speed switches (vfmbench.perf): gradient checkpointing and channels-last leave
the numbers unchanged, bf16 autocast trains close to fp32 with float32 parameters, torch.compile
matches eager, config errors are UserErrors, and stages record their peak memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import perturb
from torch import nn

from vfmbench import perf
from vfmbench.build import BuildContext, build_diffusion, build_tokenizer
from vfmbench.cli import resolve_run_config
from vfmbench.config import resolve
from vfmbench.errors import UserError
from vfmbench.interfaces import DiagonalGaussian
from vfmbench.train import train_loop
from vfmbench_plugins.decoders.sd_vae_decoder import SdVaeDecoder, SdVaeMsfDecoderArgs
from vfmbench_plugins.decoders.vfm_vae_decoder import VfmVaeDecoder, VfmVaeDecoderArgs
from vfmbench_plugins.diffusion.flow_dit import FlowDiT, FlowDiTArgs
from vfmbench_plugins.diffusion.lightningdit import LightningDiTArgs
from vfmbench_plugins.diffusion.lightningdit import factory as lightningdit
from vfmbench_plugins.diffusion.sit import SiTArgs
from vfmbench_plugins.diffusion.sit import factory as sit
from vfmbench_plugins.layers import ConvDecoder
from vfmbench_plugins.tokenizers.kl_vae import KlVae, KlVaeArgs
from vfmbench_plugins.tokenizers.sd_vae import LdmDecoder

DEC_TINY = dict(channels=[32, 32, 16, 8], layers=[1, 1, 1, 1], kernel_sizes=[3, 3, 5, 5], blur=[3, 3, 3, 5],
                inject_blocks=[0, 1], inject_channels=[16, 8], attn_blocks=[0], attn_depth=1, attn_heads=4, w_dim=16,
                noise_resolution=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def count_calls(modules) -> list[int]:
    """Forward calls of each module, counted by hooks (checkpointing calls a block again in backward)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for m in modules:
        m.register_forward_pre_hook(hook)  # the recomputation may stop early, before forward hooks
    return calls


def loss_and_grads(model: nn.Module, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(model: nn.Module, blocks, loss_fn) -> None:
    calls = count_calls(blocks)
    loss0, grads0 = loss_and_grads(model, loss_fn)
    plain_calls = calls[0]
    model.set_grad_checkpointing(True)
    calls[0] = 0
    loss1, grads1 = loss_and_grads(model, loss_fn)
    assert calls[0] == 2 * plain_calls  # every checkpointed block ran again in the backward pass
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # inference: no recomputation, no checkpoint overhead
        calls[0] = 0
        loss_fn()
        assert calls[0] == plain_calls


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing


def diffusion_batch(shape=(4, 8, 8), b=6):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, *shape, generator=g), torch.randint(0, 10, (b,), generator=g), torch.rand(b, generator=g), torch.randn(b, *shape, generator=g)


def test_grad_checkpointing_lightningdit_same_loss_and_gradients():
    torch.manual_seed(0)
    m = lightningdit(LightningDiTArgs(size="tiny", width=32, depth=3, heads=2), (4, 8, 8), 10)
    perturb(m)
    x, y, t, eps = diffusion_batch()

    def loss():
        terms = m.loss_terms(x, y, t, eps)
        return (terms["mse"] + terms["cos"]).mean()

    assert_same_loss_and_grads(m, m.blocks, loss)


def test_grad_checkpointing_sit_and_flow_dit_same_loss_and_gradients():
    torch.manual_seed(0)
    x, y, t, eps = diffusion_batch()
    s = sit(SiTArgs(size="tiny", width=32, depth=2, heads=2, align="repa", align_dim=8, align_depth=1, projector_dim=16), (4, 8, 8), 10)
    perturb(s)
    target = torch.randn(6, 64, 8, generator=torch.Generator().manual_seed(4))
    assert_same_loss_and_grads(s, s.blocks, lambda: sum(v.mean() for v in s.loss_terms(x, y, t, eps, align_tokens=target).values()))
    f = FlowDiT(FlowDiTArgs(width=32, depth=2, heads=2), (4, 8, 8), 10)
    perturb(f)
    assert_same_loss_and_grads(f, f.blocks, lambda: f.loss(x, y, t, eps).mean())


def test_grad_checkpointing_vfm_vae_decoder_same_loss_and_gradients():
    torch.manual_seed(0)
    d = VfmVaeDecoder(24, 16, VfmVaeDecoderArgs(**DEC_TINY))
    perturb(d, 0.02)
    h = torch.randn(2, 24, 4, 4, generator=torch.Generator().manual_seed(5))
    target = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1

    def loss():
        img, lower = d.forward_multiscale(h)
        return (img - target).abs().mean() + sum(r.square().mean() for r in lower)

    assert_same_loss_and_grads(d, list(d.blocks) + list(d.inject.values()), loss)


def test_grad_checkpointing_conv_and_sd_vae_decoders_same_gradients():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(7))
    conv = ConvDecoder(8, 4, 16, [1, 2], 1)
    assert_same_loss_and_grads(conv, [b for b in conv.body if not isinstance(b, (nn.Conv2d, nn.Upsample))], lambda: conv(z).square().mean())
    sd = SdVaeDecoder(8, 4, SdVaeMsfDecoderArgs(base_channels=8, channel_mult=[1, 2, 2], blocks=1, inject_levels=[1]))
    assert_same_loss_and_grads(sd, list(sd.levels), lambda: sd(z).square().mean())
    ldm = LdmDecoder(8, 4, 32, [1, 1, 1], 1, [-1])
    assert_same_loss_and_grads(ldm, list(ldm.decoder.up_blocks), lambda: ldm(z).square().mean())


def test_grad_checkpointing_on_a_component_without_support_is_a_user_error(host):
    with pytest.raises(UserError, match="does not support gradient checkpointing.*run.grad_checkpointing"):
        perf.set_grad_checkpointing(nn.Linear(2, 2), True, "toy")
    perf.set_grad_checkpointing(nn.Linear(2, 2), False, "toy")  # switching it off never fails
    tok = KlVae(KlVaeArgs(base_channels=32, channel_mult=[1], downsample=1, blocks=1), decoder=nn.Conv2d(4, 3, 1))
    with pytest.raises(UserError, match="decoder Conv2d does not support gradient checkpointing"):
        tok.set_grad_checkpointing(True)
    # Through the build path: rae has no set_grad_checkpointing, and the smoke preset trains it.
    cfg = resolve_run_config(host, "smoke", None, ["data.resolution=32", "run.grad_checkpointing=true"],
                             {"tokenizer": "rae", "vfm": "dinov2", "decoder": None, "diffusion": None, "dataset": None, "out": None})
    with pytest.raises(UserError, match="tokenizer 'rae'.*does not support gradient checkpointing"):
        build_tokenizer(BuildContext(host=host, config=cfg))


def test_build_applies_grad_checkpointing_only_to_trained_components(host):
    def cfg(*sets):
        return resolve_run_config(host, "smoke", None, ["data.resolution=32", "run.grad_checkpointing=true", *sets],
                                  {"tokenizer": "kl-vae", "vfm": None, "decoder": None, "diffusion": "lightningdit", "dataset": None, "out": None})

    trained = build_tokenizer(BuildContext(host=host, config=cfg()))
    assert trained.encoder.grad_checkpointing and trained.decoder.grad_checkpointing
    frozen = build_tokenizer(BuildContext(host=host, config=cfg("tokenizer.train.images=0")))
    assert not frozen.decoder.grad_checkpointing
    assert build_diffusion(host, cfg(), (4, 4, 4), 10).grad_checkpointing
    assert not build_diffusion(host, cfg("diffusion.train.images=0"), (4, 4, 4), 10).grad_checkpointing


# ---------------------------------------------------------------------------------------------
# Channels-last


@pytest.mark.parametrize("make", [
    lambda: VfmVaeDecoder(24, 16, VfmVaeDecoderArgs(**DEC_TINY)),
    lambda: SdVaeDecoder(24, 4, SdVaeMsfDecoderArgs(base_channels=8, channel_mult=[1, 2, 2], blocks=1, inject_levels=[1])),
    lambda: ConvDecoder(24, 4, 16, [1, 2], 1),
    lambda: LdmDecoder(24, 4, 32, [1, 1, 1], 1, [-1]),
], ids=["vfm-vae-decoder", "sd-vae-msf-decoder", "conv-decoder", "ldm-decoder"])
def test_channels_last_decoders_give_the_same_outputs_and_gradients(make):
    torch.manual_seed(0)
    d = make()
    perturb(d, 0.02)
    h = torch.randn(2, 24, 4, 4, generator=torch.Generator().manual_seed(8))
    ref = d(h)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    d.zero_grad(set_to_none=True)
    assert perf.set_channels_last(d, True)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    nhwc = []  # conv outputs that are NHWC and not NCHW (unambiguous: more than one channel and pixel)
    for m in convs:
        m.register_forward_hook(lambda mod, inp, o: nhwc.append(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()))
    out = d(h)
    assert sum(nhwc) >= 0.9 * len(nhwc) > 0
    assert out.is_contiguous()  # back to NCHW for whatever comes next
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    for n, p in d.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad.contiguous(), ref_grads[n], rtol=1e-3, atol=1e-6, msg=n)


def test_channels_last_is_applied_by_build_where_supported(host):
    cfg = resolve_run_config(host, "smoke", None, ["data.resolution=32", "run.channels_last=true"],
                             {"tokenizer": "kl-vae", "vfm": None, "decoder": None, "diffusion": None, "dataset": None, "out": None})
    tok = build_tokenizer(BuildContext(host=host, config=cfg))
    assert tok.encoder.channels_last and tok.decoder.channels_last
    assert tok.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert tok.reconstruct(x).shape == x.shape
    diff = build_diffusion(host, cfg, (4, 4, 4), 10)  # a transformer: left as it is
    assert diff.x_embed.weight.is_contiguous()


# ---------------------------------------------------------------------------------------------
# bf16 autocast


class TinyDiT(nn.Module):
    """A tiny LightningDiT behind the train_loop interface, recording the dtype its blocks compute in."""

    def __init__(self, record: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.m = lightningdit(LightningDiTArgs(size="tiny", width=32, depth=2, heads=2), (4, 8, 8), 10)
        perturb(self.m)
        self.dtypes: list[torch.dtype] = []
        self.loss_dtypes: list[torch.dtype] = []
        if record:  # (a hook that mutates a list makes dynamo recompile every step)
            self.m.blocks[0].mlp.fc1.register_forward_hook(lambda mod, inp, out: self.dtypes.append(out.dtype))

    def training_phases(self, lr):
        return self.m.training_phases(lr)

    def compile_targets(self):
        return [self.m]

    def phase_loss(self, phase, x, y, nimg):
        g = torch.Generator().manual_seed(nimg)  # the same draws in both precisions
        t, eps = torch.rand(x.shape[0], generator=g), torch.randn(x.shape, generator=g)
        terms = self.m.loss_terms(x, y, t, eps)
        loss = (terms["mse"] + terms["cos"]).mean()
        self.loss_dtypes.append(loss.dtype)
        return loss, {}


def test_bf16_autocast_training_step_is_close_to_fp32_and_keeps_fp32_parameters(tmp_path):
    g = torch.Generator().manual_seed(9)
    X, Y = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    losses, params = {}, {}
    for precision in ("fp32", "bf16"):
        model = TinyDiT()
        before = [p.detach().clone() for p in model.parameters()]
        log = tmp_path / f"{precision}.jsonl"
        train_loop(model, model.training_phases(1e-3), lambda idx: (X[idx], Y[idx]), 16, total_images=16, batch_size=8,
                   ckpt_path=tmp_path / f"{precision}.pt", seed=0, log_every_images=8, log_path=log, precision=precision)
        losses[precision] = [json.loads(line)["diffusion/loss"] for line in log.read_text().splitlines()]
        params[precision] = list(model.parameters())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
        assert set(model.dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert set(model.loss_dtypes) == {torch.float32}  # losses reduced in fp32
    assert len(losses["fp32"]) == 2
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert b == pytest.approx(a, rel=0.05)
    assert losses["fp32"] != losses["bf16"]  # bf16 did run (its rounding shows)
    for a, b in zip(params["fp32"], params["bf16"]):
        torch.testing.assert_close(b, a, rtol=0.05, atol=4e-3)  # two Adam steps of lr 1e-3 apart at most


def test_bf16_tokenizer_encode_decode_autocast_with_float32_outputs(host):
    def make(precision):
        cfg = resolve_run_config(host, "smoke", None, ["data.resolution=32", f"run.precision={precision}"],
                                 {"tokenizer": "kl-vae", "vfm": None, "decoder": None, "diffusion": None, "dataset": None, "out": None})
        torch.manual_seed(0)
        return build_tokenizer(BuildContext(host=host, config=cfg)).eval()

    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = make("fp32"), make("bf16")
    seen = []
    bf16.decoder.conv_in.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    with torch.no_grad():
        post32, post16 = fp32.encode(x), bf16.encode(x)
        assert isinstance(post16, DiagonalGaussian) and post16.mean.dtype == torch.float32 and post16.logvar.dtype == torch.float32
        torch.testing.assert_close(post16.mean, post32.mean, rtol=0.05, atol=0.05)
        img32, img16 = fp32.decode(post32.mean), bf16.decode(post32.mean)
    assert img16.dtype == torch.float32 and seen == [torch.bfloat16]
    assert not torch.equal(img16, img32)
    torch.testing.assert_close(img16, img32, rtol=0.05, atol=0.05)
    assert bf16.state_dict().keys() == fp32.state_dict().keys()  # the wrapper adds no state


def test_autocast_helper_and_precision_errors():
    with perf.autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with perf.autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(UserError, match="unknown precision 'fp16' \\(run.precision\\)"):
        resolve([{"run": {"precision": "fp16"}}])
    with pytest.raises(UserError, match="unknown run.compile mode 'fast'"):
        resolve([{"run": {"compile": "fast"}}])
    with pytest.raises(UserError, match="unknown run.compile_backend 'inductr'.*inductor"):
        resolve([{"run": {"compile": "default", "compile_backend": "inductr"}}])
    with pytest.raises(UserError, match="expects true or false"):
        resolve([{"run": {"grad_checkpointing": "yes"}}])
    with pytest.raises(UserError, match="precision"):
        train_loop(nn.Linear(1, 1), [], lambda i: None, 1, total_images=1, batch_size=1, ckpt_path=None, seed=0, precision="half")
    run = resolve([{"run": {"precision": "bf16", "compile": "max-autotune", "tf32": True, "channels_last": True}}]).run
    assert (run.precision, run.compile, run.compile_backend, run.tf32, run.channels_last, run.grad_checkpointing) == \
        ("bf16", "max-autotune", "inductor", True, True, False)


# ---------------------------------------------------------------------------------------------
# TF32


def test_tf32_is_set_from_the_config_at_stage_start():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        perf.begin_stage(resolve([{"run": {"tf32": True}}]).run, "cpu")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        perf.begin_stage(resolve([{}]).run, "cpu")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------------------------------------
# torch.compile


def _compiled_matches_eager(backend: str) -> float:
    torch.manual_seed(0)
    eager = lightningdit(LightningDiTArgs(size="tiny", width=32, depth=2, heads=2), (4, 8, 8), 10)
    perturb(eager)
    torch.manual_seed(0)
    comp = lightningdit(LightningDiTArgs(size="tiny", width=32, depth=2, heads=2), (4, 8, 8), 10)
    comp.load_state_dict(eager.state_dict())
    x, y, t, _ = diffusion_batch()
    t0 = time.time()
    assert perf.compile_module(comp, "default", backend) == ["LightningDiT"]
    assert perf.is_compiled(comp) and perf.compile_module(comp, "default", backend) == []  # idempotent
    out_c = comp(x, t, y)
    out_c.square().mean().backward()
    seconds = time.time() - t0
    out_e = eager(x, t, y)
    out_e.square().mean().backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    for (n, pe), pc in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-6, msg=n)
    assert comp.state_dict().keys() == eager.state_dict().keys()  # compiled in place: no _orig_mod. prefix
    return seconds


def test_compile_aot_eager_matches_eager():
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    """Inductor on a 2-core CPU: 77 s cold, 18 s with a warm code cache (C++ code generation), hence slow."""
    assert _compiled_matches_eager("inductor") < 300


def test_train_loop_compiles_the_component_and_trains_as_eager(tmp_path):
    g = torch.Generator().manual_seed(9)
    X, Y = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    out = {}
    for mode in ("off", "default"):
        model = TinyDiT(record=False)
        train_loop(model, model.training_phases(1e-3), lambda idx: (X[idx], Y[idx]), 16, total_images=16, batch_size=8,
                   ckpt_path=tmp_path / f"{mode}.pt", seed=0, compile=mode, compile_backend="aot_eager")
        assert perf.is_compiled(model.m) == (mode != "off")
        out[mode] = [p.detach() for p in model.parameters()]
    for a, b in zip(out["off"], out["default"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Peak memory


def _vm_rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from Linux /proc")
def test_cpu_peak_memory_is_the_process_peak_rss():
    before = perf.process_peak_rss_bytes()
    assert before >= _vm_rss_bytes() * 0.99  # the peak bounds the current RSS (read independently from /proc)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    block.add_(1)
    after = perf.process_peak_rss_bytes()
    assert after >= _vm_rss_bytes() * 0.99 and after >= before
    info = perf.peak_memory("cpu")
    assert info["peak_memory_gib"] == pytest.approx(perf.process_peak_rss_bytes() / 2**30, abs=1e-3)
    assert info["peak_memory_gib"] > 0 and "process lifetime" in info["peak_memory_kind"]
    del block


def test_stage_done_json_records_peak_memory(host, tmp_path, monkeypatch):
    from vfmbench.runner import Run

    cfg = resolve_run_config(host, "smoke", None, ["run.stages=[results]", f"run.out={tmp_path}", "run.tf32=true"],
                             {"tokenizer": "kl-vae", "vfm": None, "decoder": None, "diffusion": None, "dataset": None, "out": None})
    started = []
    monkeypatch.setattr(perf, "reset_peak_memory", lambda device: started.append(torch.device(device)))
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        run_dir = Run.prepare(host, cfg).execute()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # run.tf32 applied at the stage's start
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert started == [torch.device("cpu")]  # one peak-memory window, opened by the stage
    done = json.loads((run_dir / "results" / "done.json").read_text())
    assert done["peak_memory_gib"] > 0 and done["peak_memory_kind"].startswith("cpu process peak RSS")
    assert done["peak_memory_gib"] == pytest.approx(perf.process_peak_rss_bytes() / 2**30, rel=0.05)


DDP_SCRIPT = '''
import sys
from pathlib import Path
import torch
from torch import nn
from vfmbench import dist
from vfmbench.interfaces import Phase
from vfmbench.train import train_loop

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    def training_phases(self, lr):
        return [Phase("g", list(self.parameters()), lr)]
    def compile_targets(self):
        return [self.net]
    def phase_loss(self, phase, x, y, nimg):
        return ((self.net(x).float() - y) ** 2).mean(), {}

out = Path(sys.argv[1])
dist.init_from_env()
g = torch.Generator().manual_seed(1)
X = torch.randn(64, 4, generator=g)
Y = torch.sin(X.sum(1, keepdim=True))
model = Toy()
train_loop(model, model.training_phases(0.01), lambda idx: (X[idx], Y[idx]), 64, total_images=128, batch_size=16,
           ckpt_path=out / "ckpt.pt", seed=3, precision="bf16", compile="default", compile_backend="aot_eager")
assert getattr(model.net, "_compiled_call_impl", None) is not None
torch.save(dict(model.state_dict()), out / f"rank{dist.rank()}.pt")
dist.barrier()
'''


@pytest.mark.slow
def test_compiled_bf16_training_under_ddp_matches_one_process(tmp_path):
    """torchrun (2 ranks, gloo): compiled modules inside DDP's forward, bf16 autocast, same global batch."""
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "ddp_perf.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    results = {}
    for n in (1, 2):
        out = tmp_path / str(n)
        out.mkdir()
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        p = subprocess.run([*launcher, str(script), str(out)], capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        results[n] = [torch.load(out / f"rank{r}.pt") for r in range(n)]
    one, (r0, r1) = results[1][0], results[2]
    for k in one:
        assert r0[k].dtype == torch.float32 and torch.equal(r0[k], r1[k])  # replicas identical, parameters fp32
        torch.testing.assert_close(r0[k], one[k], rtol=0.02, atol=2e-3)  # bf16 rounding differs with the batch split


def test_sd_vae_switches_keep_its_outputs_and_gradients(host):
    """diffusers' AutoencoderKL (sd-vae): checkpointed up/down/mid blocks and NHWC give the same numbers."""
    cfg = resolve_run_config(host, "smoke", None, ["data.resolution=32"],
                             {"tokenizer": "sd-vae", "vfm": None, "decoder": None, "diffusion": None, "dataset": None, "out": None})
    torch.manual_seed(0)
    tok = build_tokenizer(BuildContext(host=host, config=cfg))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    blocks = list(tok.vae.encoder.down_blocks) + list(tok.vae.decoder.up_blocks)
    assert_same_loss_and_grads(tok, blocks, lambda: tok.decode(tok.encode(x).mean).square().mean())
    with torch.no_grad():
        ref_post, ref = tok.encode(x), tok.decode(tok.encode(x).mean)
        tok.set_channels_last(True)
        assert tok.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        post = tok.encode(x)
        out = tok.decode(post.mean)
    assert out.is_contiguous() and post.mean.is_contiguous()
    torch.testing.assert_close(post.mean, ref_post.mean, rtol=1e-4, atol=5e-5)  # NHWC convolutions sum in another order (seen: 1.7e-5 on 2 of 6144 values)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-5)


def test_vfm_vae_switches_reach_its_decoder_and_patchgan(host):
    cfg = resolve_run_config(host, "smoke", None, ["run.channels_last=true", "run.grad_checkpointing=true", "run.precision=bf16"],
                             {"tokenizer": "vfm-vae", "vfm": None, "decoder": None, "diffusion": None, "dataset": None, "out": None})
    torch.manual_seed(0)
    tok = build_tokenizer(BuildContext(host=host, config=cfg))
    assert tok.decoder.grad_checkpointing and tok.decoder.channels_last
    patch_convs = [m for m in tok.disc["patchgan"].modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous() for m in patch_convs)
    assert tok.compile_targets() == [tok.decoder, tok.disc["patchgan"]]
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        post = tok.encode(x)
        img = tok.decode(post.mean)
    assert post.mean.dtype == img.dtype == torch.float32 and img.shape == (2, 3, 64, 64) and img.is_contiguous()
