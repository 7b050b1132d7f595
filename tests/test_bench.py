"""The bench scripts: the GPU check's CPU variant end to end, FLOP counting, and the report generator.

Timings are not asserted (the machine may be shared); only that the numbers exist and are sane.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gpu_check_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_gpu_check_tiny_runs_every_check_on_cpu(gpu_check_json):
    data, stdout = gpu_check_json
    gpu_check = _load("gpu_check")
    env = data["environment"]
    for key in ("date", "device", "torch", "python", "vfmbench", "torch_threads"):
        assert env.get(key) not in (None, ""), key
    assert data["settings"]["tiny"] is True and data["settings"]["preset"] == gpu_check.TINY_PRESET
    assert data["matmul_peaks"]["float32"]["tflops"] > 0
    assert [c["component"] for c in data["checks"]] == list(gpu_check.CHECKS)
    for c in data["checks"]:
        assert "error" not in c and "skipped" not in c, c
        assert c["images_per_s"] > 0, c["component"]
        assert c["flops_per_step"] > 0, c["component"]
        assert 0 < c["mfu"] <= 1.5, (c["component"], c["mfu"])
        assert c["memory"]["peak_gib"] > 0
    by = {c["component"]: c for c in data["checks"]}
    assert by["vfm-vae-train"]["phases"] == ["g", "d"]  # generator and discriminator
    assert by["diffusion-train"]["diffusion"] == "lightningdit"
    assert by["sampling-step"]["guided"] is True  # inside the guidance interval: the 2B batch
    assert "MFU" in stdout and "img/s" in stdout


def test_flop_counter_counts_linear_and_cpu_attention():
    common = _load("common")
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32)
    assert common.count_flops(lambda: lin(x))["flops"] == 2 * 8 * 32 * 16
    q = torch.randn(2, 3, 10, 8, requires_grad=True)

    def attn():
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    flops = common.count_flops(attn)
    shape = (2, 3, 10, 8)
    assert sdpa_flop_count(shape, shape, shape) == 2 * (2 * 2 * 3 * 10 * 10 * 8)  # QK^T and AV
    # the CPU kernels (absent from torch's registry) are counted as the CUDA ones
    assert flops["flops"] == sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)


def test_time_fn_and_mfu():
    common = _load("common")
    calls = []
    t = common.time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and t["repeats"] == 3 and 0 <= t["min_s"] <= t["median_s"] <= t["max_s"]
    assert common.mfu(2e12, 1.0, 4.0) == pytest.approx(0.5)
    assert common.mfu(None, 1.0, 4.0) is None


def test_report_from_results(gpu_check_json, tmp_path):
    report = _load("report")
    data, _ = gpu_check_json
    env = data["environment"]
    results = {
        "gpu_check": data,
        "e2e": {"environment": env, "command": "vfmbench run --preset smoke", "first": {"wall_s": 100.0, "stages_s": {"tokenizer": 30.0, "gen-eval": 40.0}},
                "second": {"wall_s": 60.0, "stages_s": {"tokenizer": 30.0, "gen-eval": 8.0}}, "speedup_by_stage": {"tokenizer": 1.0, "gen-eval": 5.0},
                "eval_stages": ["gen-eval"], "eval_stages_s": {"first": 40.0, "second": 8.0}, "eval_speedup": 5.0,
                "targets": {"first_wall_s_below": 120.0, "eval_speedup_at_least": 3.0}},
        "scaling": {"environment": env, "settings": {"batch": 2},
                    "resolution": [{**c, "resolution": r} for r in (128, 256) for c in data["checks"][:2]],
                    "sweep": {"matrix": {"tokenizer": ["a", "b"]}, "runs": [{"run": "x", "stages_total_s": 1.0}],
                              "cumulative": [{"combinations": 1, "wall_s": 10.0}, {"combinations": 2, "wall_s": 15.0}]}},
    }
    text = report.render(results)
    assert "do not edit by hand" in text and env["date"] in text and env["device"] in text
    assert "smoke" in text and "×5" in text and "GPU check" in text and "vfm-vae-train" in text
    png = report.plot(results, tmp_path / "scaling.png")
    assert png is not None and png.stat().st_size > 0


def test_e2e_reads_stage_seconds(tmp_path):
    e2e = _load("e2e")
    for stage, sec in (("tokenizer", 3.5), ("gen-eval", 1.25)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "done.json").write_text(json.dumps({"stage": stage, "seconds": sec, "vfm_feature_cache": {"hits": 1}}))
    assert e2e.stage_seconds(tmp_path) == {"gen-eval": 1.25, "tokenizer": 3.5}
    assert e2e.cache_info(tmp_path) == {"gen-eval": {"vfm_feature_cache": {"hits": 1}}, "tokenizer": {"vfm_feature_cache": {"hits": 1}}}
