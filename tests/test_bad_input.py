"""The bad-input battery (issue 14): every case is a command as a user types it, the exit code it must
end with, a phrase its message must hold, no traceback, and nothing written under ``--out``.

Malicious files: a pickle whose unpickling would create a marker file (it never runs a shell
command) is planted, in the zip and in the legacy torch format, at every place vfmbench reads a
user file: each CLI option, config key and run-folder file. The marker must never appear.

Most cases stop in preflight, in-process (``vfmbench.cli.main``); the divergence and the two
concurrent runs run the real CLI on tiny settings.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from vfmbench.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# The smoke preset cut to a few images and steps: a case that would pass preflight is still short.
TINY = ["--preset", "smoke", "--set", "data.train_images=32", "--set", "data.val_images=8", "--set", "tokenizer.train.images=32",
        "--set", "diffusion.train.images=64", "--set", "diffusion.sample.num_images=4", "--set", "diffusion.sample.steps=1",
        "--set", "metrics.recon_images=4", "--set", "metrics.isc_splits=1", "--set", "metrics.probe.epochs=1"]
KL = ["--tokenizer", "kl-vae", "--decoder", "conv-decoder"]
INCEPTION = "weights-inception-2015-12-05-6726825d.pth"


class Marker:
    """Unpickling this creates the file ``path`` (``open(path, 'w')``): proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A torch file with real tensors and one object whose unpickling would create ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2, 2), "payload": Marker(marker)}, path, _use_new_zipfile_serialization=not legacy)
    return path


def write_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit-per-channel PNG written by hand (greyscale [H, W] or RGB [H, W, 3] uint16), so that
    what Pillow decodes is checked against a file no imaging library produced."""
    h, w = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def smoke_cfg():
    from vfmbench.config import resolve
    from vfmbench.plugins import get_plugin_manager

    return resolve([dict(get_plugin_manager().presets.get("smoke").values)])


@pytest.fixture(scope="module")
def mismatched_weights(tmp_path_factory, smoke_cfg):
    """kl-vae weights with the right names and one tensor of another shape (another tokenizer's size)."""
    from safetensors.torch import save_file

    from vfmbench.config import resolve
    from vfmbench.plugins import get_plugin_manager
    from vfmbench.preflight import build_meta

    host = get_plugin_manager()
    cfg = resolve([dict(host.presets.get("smoke").values), {"tokenizer": {"name": "kl-vae"}, "decoder": {"name": "conv-decoder"}}])
    state = build_meta(host, cfg).tokenizer.state_dict()
    tensors = {k: torch.zeros(v.shape) for k, v in state.items() if v.dtype.is_floating_point}
    first = next(k for k, v in tensors.items() if v.ndim == 4)
    tensors[first] = torch.zeros(tensors[first].shape[0] + 1, *tensors[first].shape[1:])
    path = tmp_path_factory.mktemp("mismatch") / "other.safetensors"
    save_file(tensors, str(path))
    return path


def make_case_files(tmp: Path) -> dict[str, Path]:
    marker = tmp / "MARKER"
    f = {"marker": marker, "evil_zip": plant(tmp / "evil.pt", marker), "evil_legacy": plant(tmp / "evil-legacy.pt", marker, legacy=True)}
    f["empty"] = tmp / "empty.pt"
    f["empty"].write_bytes(b"")
    torch.save({"weight": torch.zeros(4096)}, tmp / "full.pt")
    f["truncated"] = tmp / "truncated.pt"
    f["truncated"].write_bytes((tmp / "full.pt").read_bytes()[:700])
    f["file"] = tmp / "a-file"
    f["file"].write_text("x")
    f["latin1"] = tmp / "latin1.yaml"
    f["latin1"].write_bytes("run:\n  seed: 1  # caf\xe9\n".encode("latin-1"))
    results = tmp / "results.jsonl"
    results.write_text(json.dumps({"metric": "rfid", "value": 1.0, "family": "reconstruction"}) + "\n{not json\n")
    f["results"] = results
    import torch.nn as nn

    ts = tmp / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(ts))
    f["torchscript"] = ts
    npz = tmp / "samples.npz"
    np.savez(npz, arr_0=np.array([Marker(marker)], dtype=object))
    f["evil_npz"] = npz
    return f


# (id, argv with {named} fields, exit code, phrase of the message). {out} is the --out folder that must stay empty.
CASES = [
    # -- malicious pickles at every user-file entry point (zip and legacy formats)
    ("weights-set-zip", ["run", *TINY, *KL, "--out", "{out}", "--set", "tokenizer.weights={evil_zip}"], 2, "refused"),
    ("weights-set-legacy", ["run", *TINY, *KL, "--out", "{out}", "--set", "tokenizer.weights={evil_legacy}"], 2, "refused"),
    ("weights-set-dry-run", ["run", *TINY, *KL, "--out", "{out}", "--dry-run", "--set", "tokenizer.weights={evil_zip}"], 2, "refused"),
    ("eval-recon-weights-zip", ["eval", "reconstruction", *KL, "--preset", "smoke", "--out", "{out}", "--weights", "{evil_zip}"], 2, "refused"),
    ("eval-recon-weights-legacy", ["eval", "reconstruction", *KL, "--preset", "smoke", "--out", "{out}", "--weights", "{evil_legacy}"], 2, "refused"),
    ("inception-weights-zip", ["run", *TINY, *KL, "--out", "{out}", "--set", "metrics.inception_weights={evil_zip}"], 2, "refused"),
    ("inception-weights-legacy", ["run", *TINY, *KL, "--out", "{out}", "--set", "metrics.inception_weights={evil_legacy}"], 2, "refused"),
    ("inception-torch-home", ["run", *TINY, *KL, "--out", "{out}", "--torch-home-evil"], 2, "refused"),
    ("lpips-weights", ["run", *TINY, *KL, "--out", "{out}", "--set", "metrics.lpips_weights={evil_legacy}"], 2, "refused"),
    ("vfm-weights-zip", ["run", *TINY, "--out", "{out}", "--set", "vfm.pretrained=true", "--set", "vfm.weights={evil_zip}"], 2, "refused"),
    ("vfm-weights-legacy", ["run", *TINY, "--out", "{out}", "--set", "vfm.pretrained=true", "--set", "vfm.weights={evil_legacy}"], 2, "refused"),
    ("va-vae-released-checkpoint", ["run", *TINY, "--tokenizer", "va-vae", "--out", "{out}", "--set", "tokenizer.args.pretrained={evil_zip}"], 2, "refused"),
    ("sd-vae-ldm-file", ["run", *TINY, "--tokenizer", "sd-vae", "--out", "{out}", "--set", "tokenizer.args.pretrained={evil_legacy}"], 2, "refused"),
    ("torchscript-vfm-weights", ["run", *TINY, "--out", "{out}", "--set", "vfm.pretrained=true", "--set", "vfm.weights={torchscript}"], 2, "vfm.trust_torchscript=true"),
    ("eval-generation-object-npz", ["eval", "generation", "{evil_npz}", "--reference", "{evil_npz}", "--smoke"], 2, "unpickled"),
    ("eval-generation-object-reference", ["eval", "generation", "{file}", "--reference", "{evil_npz}", "--smoke"], 2, "unpickled"),
    ("metrics-reference-object-npz", ["run", *TINY, *KL, "--out", "{out}", "--set", "metrics.reference={evil_npz}"], 2, "unpickled"),
    # -- sizes, keys and flags rejected up front (also under --dry-run)
    ("metrics-batch-size-0", ["run", *TINY, *KL, "--out", "{out}", "--set", "metrics.batch_size=0"], 2, "metrics.batch_size must be at least 1"),
    ("metrics-batch-size-0-dry", ["run", *TINY, *KL, "--out", "{out}", "--dry-run", "--set", "metrics.batch_size=0"], 2, "metrics.batch_size must be at least 1"),
    ("sample-batch-size-0", ["run", *TINY, *KL, "--out", "{out}", "--set", "diffusion.sample.batch_size=0"], 2, "diffusion.sample.batch_size"),
    ("train-batch-size-0", ["run", *TINY, *KL, "--out", "{out}", "--set", "tokenizer.train.batch_size=0"], 2, "tokenizer.train.batch_size"),
    ("negative-lr", ["run", *TINY, *KL, "--out", "{out}", "--set", "diffusion.train.lr=-1"], 2, "diffusion.train.lr must be a positive"),
    ("skipped-fraction-range", ["run", *TINY, *KL, "--out", "{out}", "--set", "run.max_skipped_fraction=2"], 2, "run.max_skipped_fraction"),
    ("data-batch-size-removed", ["run", *TINY, *KL, "--out", "{out}", "--set", "data.batch_size=8"], 2, "unknown config key 'data.batch_size'"),
    ("eval-generation-batch-size-0", ["eval", "generation", "{file}", "--reference", "{file}", "--smoke", "--set", "metrics.batch_size=0"], 2, "metrics.batch_size"),
    ("vfm-weights-without-pretrained", ["run", *TINY, "--out", "{out}", "--set", "vfm.weights={evil_zip}"], 2, "set vfm.pretrained=true"),
    ("vfm-weights-without-pretrained-dry", ["run", *TINY, "--out", "{out}", "--dry-run", "--set", "vfm.weights={evil_zip}"], 2, "set vfm.pretrained=true"),
    ("decoder-args", ["run", *TINY, "--out", "{out}", "--set", "decoder.args.attn_heads=3"], 2, "attn_heads"),
    ("decoder-args-dry", ["run", *TINY, "--out", "{out}", "--dry-run", "--set", "decoder.args.attn_heads=3"], 2, "attn_heads"),
    ("disk-space", ["run", *TINY, *KL, "--out", "{out}", "--set", "diffusion.sample.num_images=100000000000"], 2, "not enough free disk space"),
    ("disk-space-dry", ["run", *TINY, *KL, "--out", "{out}", "--dry-run", "--set", "diffusion.sample.num_images=100000000000"], 2, "not enough free disk space"),
    # -- weights that are missing, empty, truncated or of another model
    ("vfm-weights-missing-dry", ["run", *TINY, "--out", "{out}", "--dry-run", "--set", "vfm.pretrained=true", "--set", "vfm.weights={out}/none"], 2, "does not exist"),
    ("vfm-weights-offline-dry", ["run", *TINY, "--out", "{out}", "--dry-run", "--set", "vfm.pretrained=true", "--set", "vfm.size=full",
                                 "--set", "run.smoke=false"], 2, "were not found"),
    ("sd-vae-ft-ema-offline", ["run", *TINY, "--tokenizer", "sd-vae", "--out", "{out}", "--set", "tokenizer.args.pretrained=ft-ema"], 2, "were not found"),
    ("va-vae-missing-checkpoint", ["run", *TINY, "--tokenizer", "va-vae", "--out", "{out}", "--set", "tokenizer.args.pretrained={out}/none.pt"], 2, "does not exist"),
    ("va-vae-wrong-checkpoint", ["run", *TINY, "--tokenizer", "va-vae", "--out", "{out}", "--set", "tokenizer.args.pretrained={truncated}"], 2, "truncated"),
    ("empty-checkpoint", ["run", *TINY, *KL, "--out", "{out}", "--set", "tokenizer.weights={empty}"], 2, "is empty"),
    ("empty-checkpoint-eval", ["eval", "reconstruction", *KL, "--preset", "smoke", "--out", "{out}", "--weights", "{empty}"], 2, "is empty"),
    ("truncated-checkpoint", ["run", *TINY, *KL, "--out", "{out}", "--set", "tokenizer.weights={truncated}"], 2, "truncated"),
    ("other-tokenizer-checkpoint", ["run", *TINY, *KL, "--out", "{out}", "--set", "tokenizer.weights={mismatch}"], 2, "do not match"),
    # -- output folders, files and text
    ("out-under-file", ["run", *TINY, *KL, "--out", "{file}/runs"], 2, "is a regular file"),
    ("cache-under-file", ["run", *TINY, *KL, "--out", "{out}", "--set", "run.cache_dir={file}/cache"], 2, "is a regular file"),
    ("non-utf8-yaml", ["run", *TINY, *KL, "--out", "{out}", "--config", "{latin1}"], 2, "not UTF-8"),
    ("corrupt-results-line", ["leaderboard", "{results}", "--out", "{out}/board.md"], 2, "not a JSON line"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_battery(case, tmp_path, capsys, monkeypatch, mismatched_weights):
    name, argv, code, phrase = case
    files = make_case_files(tmp_path)
    out = tmp_path / "out"
    values = {k: str(v) for k, v in files.items()} | {"out": str(out), "mismatch": str(mismatched_weights)}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("VFMBENCH_DEBUG", raising=False)
    if "--torch-home-evil" in argv:  # the Inception file torch hub (and so torch-fidelity) would read
        argv = [a for a in argv if a != "--torch-home-evil"]
        plant(tmp_path / "torch-home" / "hub" / "checkpoints" / INCEPTION, files["marker"])
    args = [a.format(**values) for a in argv]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == code, err[-3000:]
    assert phrase in err, err[-3000:]
    assert "Traceback" not in err
    assert not files["marker"].exists(), "a planted pickle ran"
    assert files_under(out) == [], f"written before failing: {files_under(out)}"
    changed = [p for p in tmp_path.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns and not p.name.endswith(".sha256.json")]
    assert changed == [], changed  # no file beside the inputs was created or touched (a weights file's hash sidecar aside)


def _tiny_run_dir(tmp_path: Path, smoke_cfg, extra: dict | None = None) -> Path:
    """A run directory as `vfmbench run` leaves it (config.json), without running anything."""
    from vfmbench.config import deep_merge

    d = tmp_path / "run"
    d.mkdir()
    cfg = deep_merge(smoke_cfg.to_dict(), extra or {})
    (d / "config.json").write_text(json.dumps({"config": cfg, "run_name": d.name}))
    return d


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_eval_alignment_refuses_a_planted_run_folder_model(tmp_path, capsys, smoke_cfg, legacy):
    marker = tmp_path / "MARKER"
    run_dir = _tiny_run_dir(tmp_path, smoke_cfg)
    plant(run_dir / "tokenizer" / "model.pt", marker, legacy=legacy)
    before = files_under(run_dir)
    rc = main(["eval", "alignment", str(run_dir), "--images", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "refused" in err and "Traceback" not in err, err[-2000:]
    assert not marker.exists()
    assert files_under(run_dir) == before


@pytest.mark.parametrize("name", ["tokenizer/model.pt", "tokenizer/ckpt-main.pt"])
def test_resuming_a_run_folder_refuses_planted_files(tmp_path, capsys, name):
    """A run directory's own files are user files too: a planted model or training checkpoint is
    refused (exit 2), never unpickled and never skipped over as 'unreadable'."""
    from vfmbench.cli import build_parser, resolve_run_config
    from vfmbench.plugins import get_plugin_manager
    from vfmbench.runner import run_name

    out = tmp_path / "out"
    args = [*TINY, *KL, "--set", "run.stages=[tokenizer]"]
    ns = build_parser().parse_args(["run", *args, "--out", str(out)])
    host = get_plugin_manager()
    cfg = resolve_run_config(host, ns.preset, ns.config, ns.set, {"tokenizer": ns.tokenizer, "vfm": None, "decoder": ns.decoder,
                                                                  "diffusion": None, "dataset": None, "out": ns.out})
    marker = tmp_path / "MARKER"
    plant(out / run_name(host, cfg) / name, marker)
    rc = main(["run", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "refused" in err and "Traceback" not in err, err[-2000:]
    assert not marker.exists()


def test_torchscript_vfm_weights_load_only_when_trusted(tmp_path):
    """The trust flag is the one way in: the same archive that is refused loads with it."""
    import warnings

    from vfmbench.config import VfmConfig
    from vfmbench.errors import UserError
    from vfmbench.plugins import get_plugin_manager
    from vfmbench.vfm import build_vfm

    spec = get_plugin_manager().vfms.get("clip")
    model = build_vfm(spec, VfmConfig(name="clip", size="tiny", pretrained=False))
    path = tmp_path / "visual.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model.model), str(path))
    with pytest.raises(UserError, match="TorchScript archive"):
        build_vfm(spec, VfmConfig(name="clip", size="tiny", weights=str(path)))
    trusted = build_vfm(spec, VfmConfig(name="clip", size="tiny", weights=str(path), trust_torchscript=True))
    for (k, a), (_, b) in zip(sorted(model.model.state_dict().items()), sorted(trusted.model.state_dict().items())):
        assert torch.equal(a, b), k


def test_project_checkpoints_load_with_weights_only(tmp_path):
    """What the project writes (weights, training checkpoints with optimiser and RNG state, latents)
    reads back through the safe loader; weights are safetensors, found before an older .pt."""
    from vfmbench.checkpoint import is_safetensors, load_torch, save_torch, save_weights, weights_file
    from vfmbench.train import train_loop

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def phase_loss(self, phase, x, y, nimg):
            return ((self.lin(x).squeeze(1) - y) ** 2).mean(), {}

    from vfmbench.interfaces import Phase

    torch.manual_seed(0)
    m = Tiny()
    data = torch.randn(8, 3), torch.randn(8)
    train_loop(m, [Phase("main", list(m.parameters()), lr=1e-2, ema=True)], lambda i: (data[0][i], data[1][i]), 8, total_images=16,
               batch_size=4, ckpt_path=tmp_path / "ckpt.pt", seed=0, ema_halflife_images=8)
    ck = load_torch(tmp_path / "ckpt.pt")
    assert ck["nimg"] == 16 and ck["optimisers"][0]["state"] and isinstance(ck["rng"]["cpu"], torch.Tensor)
    save_torch({"latents": torch.ones(2, 4), "labels": torch.arange(2)}, tmp_path / "train.pt")
    assert torch.equal(load_torch(tmp_path / "train.pt")["labels"], torch.arange(2))
    torch.save(m.state_dict(), tmp_path / "model.pt")  # a run folder written before safetensors
    assert weights_file(tmp_path / "model") == tmp_path / "model.pt"
    save_weights({**m.state_dict(), "x._extra_state": {"guard": {"n": 3}}}, tmp_path / "model.safetensors")
    assert weights_file(tmp_path / "model") == tmp_path / "model.safetensors" and is_safetensors(tmp_path / "model.safetensors")
    back = load_torch(tmp_path / "model.safetensors")
    assert torch.equal(back["lin.weight"], m.lin.weight) and back["x._extra_state"] == {"guard": {"n": 3}}


def test_inception_weights_reach_torch_fidelity_as_a_state_dict(tmp_path, session_cache):
    """The project reads the Inception file (weights_only) and torch-fidelity gets the same tensors."""
    from vfmbench.metrics.inception import InceptionFeatures, make_smoke_inception_weights

    path = make_smoke_inception_weights(tmp_path / "inc.pth")
    feats = InceptionFeatures(path, features=("pool",))
    ref = torch.load(path, weights_only=True)
    got = feats.model.state_dict()
    assert all(torch.equal(got[k].float(), ref[k].float()) for k in ref)


# -- errors: one paragraph, exit 2 for the user's environment, a traceback only for developers


def test_full_disk_is_a_message_about_space(tmp_path, capsys, monkeypatch):
    from vfmbench.failures import message
    from vfmbench.runner import Run

    torch_error = RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/3: file write failed")
    assert message(torch_error)[1] == 2 and "disk is full" in message(torch_error)[0]

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.run_dir / "config.json"))

    monkeypatch.setattr(Run, "write_config", full)
    rc = main(["run", *TINY, *KL, "--out", str(tmp_path / "out"), "--set", "run.stages=[tokenizer]"])
    err = capsys.readouterr().err
    assert rc == 2 and "the disk is full while writing" in err and "config.json" in err and "Traceback" not in err


def test_internal_errors_show_the_traceback_only_under_debug(tmp_path, capsys, monkeypatch):
    from vfmbench import leaderboard

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(leaderboard, "collect_rows", boom)
    assert main(["leaderboard", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: a bug" in err and "VFMBENCH_DEBUG=1" in err and "Traceback" not in err
    monkeypatch.setenv("VFMBENCH_DEBUG", "1")
    assert main(["leaderboard", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


# -- high-depth images


def test_high_depth_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from vfmbench.data import to_rgb

    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    write_png16(tmp_path / "grey16.png", ramp)
    with Image.open(tmp_path / "grey16.png") as im:
        got = np.asarray(to_rgb(im))
    expected = np.rint(ramp / 257.0).astype(np.uint8)  # 65535 / 255 = 257
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 2], expected)
    assert len(np.unique(got)) > 200  # a ramp, not 255 everywhere

    rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 32896)], -1)  # 48-bit RGB
    write_png16(tmp_path / "rgb48.png", rgb)
    with Image.open(tmp_path / "rgb48.png") as im:
        got = np.asarray(to_rgb(im)).astype(int)
    assert np.abs(got - rgb / 257.0).max() <= 1.0  # Pillow keeps the high bytes: within one level

    f = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(f, mode="F").save(tmp_path / "float.tiff")
    with Image.open(tmp_path / "float.tiff") as im:
        got = np.asarray(to_rgb(im))
    assert np.array_equal(got[..., 1], np.rint(f.astype(np.float64) * 255).astype(np.uint8))


def test_imagefolder_reads_16_bit_pngs_as_a_ramp(tmp_path):
    from plugins.datasets.imagefolder import ImageFolderDataset

    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        write_png16(tmp_path / split / "a" / "x.png", ramp)
    x, _ = ImageFolderDataset(str(tmp_path), split="val", resolution=64)[0]
    assert x.dtype == torch.uint8 and x.max() == 255 and x.min() == 0
    assert torch.equal(x[0, 0], torch.from_numpy(np.rint(ramp[0] / 257.0).astype(np.uint8)))


# -- leaderboards: NaN, inf and diverged rows are marked and ranked last


def test_leaderboard_marks_and_ranks_last_nonfinite_and_diverged_rows():
    from vfmbench.leaderboard import render

    def row(run, value, **extra):
        return {"run_id": run, "label": "smoke", "family": "reconstruction", "dataset": "shapes", "split": "val", "resolution": 64,
                "metric": "rfid", "value": value, "higher_is_better": False, "protocol": {"n": 1}, **extra}

    text = render([row("nan-run", float("nan")), row("diverged-run", 0.5, diverged=True), row("good", 3.0), row("best", 2.0),
                   row("inf-run", float("inf"))])
    order = [ln.split("|")[2].strip() for ln in text.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip().isdigit()]
    assert order[:2] == ["best", "good"] and order[-1] == "diverged-run ⚠ diverged", order
    assert set(order[2:4]) == {"nan-run", "inf-run"}
    assert "nan ⚠" in text and "inf ⚠" in text and "ranked last" in text


# -- divergence and concurrency: the real CLI on tiny settings

KL_TINY = [*TINY, *KL, "--set", "data.train_images=64", "--set", "tokenizer.train.images=128", "--set", "tokenizer.train.batch_size=16",
           "--set", "metrics.batch_size=8"]


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "vfmbench.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full, cwd=ROOT, **kw)


def test_divergence_stops_or_is_marked_and_ranked_last(tmp_path):
    out = tmp_path / "runs"
    stages = ["--set", 'run.stages=["tokenizer", "recon-eval", "results"]', "--set", "tokenizer.train.lr=1e6"]
    p = cli("run", *KL_TINY, *stages, "--out", str(out))
    _, err = p.communicate(timeout=900)
    assert p.returncode == 2, err[-3000:]
    assert "tokenizer stage diverged" in err and "tokenizer.train.lr (now 1e+06)" in err and "run.allow_divergence=true" in err
    assert "Traceback" not in err and not list(out.glob("*/results.jsonl"))

    p = cli("run", *KL_TINY, *stages, "--set", "run.allow_divergence=true", "--out", str(out))
    stdout, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    run_dir = Path(stdout.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["diverged"] is True and r["diverged_stages"] == ["tokenizer"] for r in rows)
    assert "WARNING: tokenizer stage diverged" in err

    # a converged run with worse numbers still ranks above the diverged one
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**{k: v for k, v in r.items() if not k.startswith("diverged")}, "run_id": "converged",
                                         "value": (r["value"] * 10 + 100) if not r["higher_is_better"] else r["value"] / 10}) + "\n" for r in rows))
    board = tmp_path / "board.md"
    assert main(["leaderboard", str(run_dir), str(other), "--out", str(board)]) == 0
    table = [ln for ln in board.read_text().splitlines() if ln.startswith("| 1 ") or ln.startswith("| 2 ")]
    assert table[0].startswith("| 1 ") and "converged" in table[0] and "⚠ diverged" in table[1]


def test_two_concurrent_runs_give_one_result_and_one_refusal(tmp_path):
    """The same command twice into one --out: the first is paused (SIGSTOP) as soon as it holds the
    lock, so the second surely starts while the first is mid-run; it must stop at once with exit 2
    naming the first; the first, resumed, finishes with the only result."""
    import signal

    from vfmbench.lock import LOCK_NAME

    out = tmp_path / "runs"
    args = ["run", *KL_TINY, "--set", 'run.stages=["tokenizer", "results"]', "--out", str(out)]
    first = cli(*args)
    deadline = time.time() + 600
    while not list(out.glob(f"*/{LOCK_NAME}")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first run ended before it could be paused"
        second = cli(*args)
        _, err2 = second.communicate(timeout=600)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err1 = first.communicate(timeout=900)
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 2, err2[-3000:]
    assert "is in use by pid" in err2 and f"pid {first.pid} " in err2 and "Traceback" not in err2
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    rows = (run_dir / "results.jsonl").read_text()
    assert json.loads((run_dir / "tokenizer" / "done.json").read_text())["stage"] == "tokenizer" and rows is not None
    assert not (run_dir / LOCK_NAME).exists()  # released on exit


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path):
    from vfmbench.lock import LOCK_NAME, RunLock, RunLockedError

    d = tmp_path / "run"
    d.mkdir()
    (d / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started": "2020"}))  # left by a killed run
    with RunLock(d) as lock:
        assert lock.stale["pid"] == 999999
        assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"):
            RunLock(d).acquire()
    assert not (d / LOCK_NAME).exists()
    RunLock(d).acquire().release()  # free again
