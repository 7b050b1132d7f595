"""Shared measuring tools of the bench scripts: timers, peak memory, matmul peak, FLOP counting,
environment records and JSON output. Standard library timers (``time.perf_counter``) and torch's
own FLOP counter and profiler only.

Conventions: a *step* is one call of a component's step function (a training step with every
optimiser phase, one encode of a batch, one sampler run, ...); its cost is the median of
``repeats`` timed calls after ``warmup`` untimed ones, with CUDA synchronised before and after.
FLOPs are the matmul/convolution/attention FLOPs torch's ``FlopCounterMode`` sees in one step
(forward and backward as executed; element-wise work is not counted), and model FLOPs
utilisation (MFU) is FLOPs / (step time x the matmul peak measured in the same process).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
GIB = 2**30
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# Environment


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def git_commit() -> str:
    """The checkout's commit (read-only ``git rev-parse``) plus '+dirty' when files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict[str, Any]:
    """Date, device, versions and threading of this process (recorded with every result file)."""
    import vfmbench

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "vfmbench": getattr(vfmbench, "__version__", "?"),
        "git": git_commit(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, gpu_memory_gib=round(props.total_memory / GIB, 1), gpu_count=torch.cuda.device_count())
    return env


def set_threads(threads: int) -> None:
    """``threads`` > 0: torch intra-op threads (the caller sets OMP_NUM_THREADS for subprocesses)."""
    if threads > 0:
        torch.set_num_threads(threads)


def bench_env(threads: int = 0) -> dict[str, str]:
    """Environment for bench subprocesses: offline, no progress bars, a fixed thread count."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TQDM_DISABLE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    n = threads or int(env.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)
    env["OMP_NUM_THREADS"] = str(n)
    env["MKL_NUM_THREADS"] = str(n)
    return env


# ---------------------------------------------------------------------------------------------
# Timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Median, min and max seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times), "warmup": warmup}


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """Peak memory of a region: CUDA ``max_memory_allocated`` (reset at entry), or on CPU the
    process's peak RSS (monotonic: per-component figures need one process per component, which
    ``components.py`` does) together with the RSS at entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result: dict[str, Any] = {}

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.result = {"kind": "cuda max_memory_allocated", "peak_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                           "start_gib": self._start / GIB}
        else:
            self.result = {"kind": "process peak RSS", "peak_gib": peak_rss_bytes() / GIB, "start_gib": self._start / GIB}


# ---------------------------------------------------------------------------------------------
# Matmul peak


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 0, repeats: int = 5) -> dict[str, Any]:
    """Best achieved FLOP/s of square ``n x n`` matmuls in ``dtype`` on ``device`` (best of ``repeats``
    after one warm-up). Default sizes: 8192 on CUDA, 2048 on CPU. TF32 stays as the process has it
    (off by default), so the fp32 figure on CUDA is true fp32."""
    if not n:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1
    best = float("inf")
    for i in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        synchronize(device)
        dt = (time.perf_counter() - t0) / inner
        if i > 0:  # the first is the warm-up
            best = min(best, dt)
    flops = 2.0 * n**3
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "best_s": best, "tflops": flops / best / 1e12}


# ---------------------------------------------------------------------------------------------
# FLOP counting


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def extra_flop_formulas() -> dict:
    """Formulas torch's counter lacks: the CPU fused attention kernels (forward and backward), counted
    as the CUDA ones (two matmuls forward, four backward)."""
    aten = torch.ops.aten
    out = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flop),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flop)):
        op = getattr(aten, name, None)
        if op is not None:
            out[op] = fn
    return out


def count_flops(fn: Callable[[], Any]) -> dict[str, Any]:
    """Total FLOPs of one call of ``fn`` and the split by operator."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": int(counter.get_total_flops()), "by_op": by_op}


def mfu(flops: float | None, seconds: float, peak_tflops: float) -> float | None:
    if not flops or seconds <= 0 or peak_tflops <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


# ---------------------------------------------------------------------------------------------
# Output


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
