"""Precision and speed switches (``run.precision``, ``run.tf32``, ``run.compile``,
``run.grad_checkpointing``, ``run.channels_last``) and per-stage peak memory.

Where each switch acts:

* ``precision`` (fp32 | bf16): bf16 autocast around every training forward (``train_loop``) and
  around the tokenizer's ``encode`` / ``encode_from_vfm`` / ``decode`` (latent caching,
  reconstruction, decoding of samples; ``autocast_methods``). Parameters, optimiser state,
  gradients and the reduced losses stay float32; outputs leave the autocast region as float32.
  Sampling follows ``diffusion.sample.precision``, which defaults to ``run.precision``. Metric feature extractors (Inception) run
  outside these regions, in float32.
* ``tf32``: TF32 tensor-core maths for float32 matmuls and convolutions on CUDA (Ampere and
  later); process-wide, set by ``apply_process_settings`` from the config at the start of a stage.
* ``compile`` (off | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs) with
  ``compile_backend``: ``torch.compile`` of the trained component's ``compile_targets()`` (default:
  the component itself), in place (``nn.Module.compile``: state-dict keys do not change). Under
  DDP the compiled modules run inside DistributedDataParallel's forward, where dynamo sees the
  active DDP module and splits graphs at its gradient buckets (DDPOptimizer) -- the order PyTorch
  recommends (wrap with DDP, compile what runs inside it).
* ``grad_checkpointing``: a trained component that implements ``set_grad_checkpointing(bool)``
  recomputes its heavy blocks' activations in the backward pass (``torch.utils.checkpoint``,
  ``use_reentrant=False``); asking it of one that does not is a ``UserError``.
* ``channels_last``: components that implement ``set_channels_last(bool)`` (conv decoders,
  discriminators, SD-VAE) keep conv weights and activations in NHWC; the others are left as they are.
"""
from __future__ import annotations

import contextlib
import functools
import resource
import sys
from typing import Any, Callable

import torch
from torch import nn

from .errors import UserError, did_you_mean

PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Validation


def check_precision(precision: str, key: str = "run.precision") -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} ({key}): {did_you_mean(precision, PRECISIONS)}")


def check_compile(mode: str, backend: str) -> None:
    """``UserError`` for an unknown ``run.compile`` mode or ``run.compile_backend``."""
    if mode not in COMPILE_MODES:
        raise UserError(f"unknown run.compile mode {mode!r}: {did_you_mean(mode, COMPILE_MODES)}")
    if mode != "off":
        known = list_compile_backends()
        if backend not in known:
            raise UserError(f"unknown run.compile_backend {backend!r}: {did_you_mean(backend, known)}")


def list_compile_backends() -> list[str]:
    from torch._dynamo import list_backends

    return sorted(set(list_backends(exclude_tags=())))


# ---------------------------------------------------------------------------------------------
# Autocast


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast on ``device``'s type when ``precision == 'bf16'``, else a no-op context."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _to_float32(out: Any) -> Any:
    """Floating tensors of ``out`` (a tensor, a tuple/list of them, or a ``DiagonalGaussian``) as float32."""
    from .interfaces import DiagonalGaussian

    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, DiagonalGaussian):
        return DiagonalGaussian(out.mean.float(), out.logvar.float())
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float32(o) for o in out)
    return out


class AutocastMethod:
    """A method of ``module`` run under bf16 autocast, its floating outputs returned as float32.

    Set as an instance attribute by ``autocast_methods``; it calls the class's function with the
    module, so a deep copy of the module (its attributes copied with it) stays self-consistent.
    """

    def __init__(self, module: nn.Module, name: str, precision: str):
        self.module, self.name, self.precision = module, name, precision
        self.fn = getattr(type(module), name)
        functools.update_wrapper(self, self.fn)

    def __call__(self, *args, **kwargs):
        with autocast(module_device(self.module), self.precision):
            out = self.fn(self.module, *args, **kwargs)
        return _to_float32(out)


def autocast_methods(module: nn.Module, names: tuple[str, ...], precision: str) -> None:
    """Run ``module.<name>`` under ``precision`` autocast for each of ``names`` the class defines."""
    check_precision(precision)
    if precision == "fp32":
        return
    for name in names:
        if callable(getattr(type(module), name, None)) and not isinstance(module.__dict__.get(name), AutocastMethod):
            setattr(module, name, AutocastMethod(module, name, precision))


# ---------------------------------------------------------------------------------------------
# Process-wide numerics


def apply_process_settings(tf32: bool) -> dict[str, Any]:
    """TF32 for float32 matmuls and cuDNN convolutions on (``tf32=True``) or off; returns what was set.

    These are process-wide PyTorch flags: this is the one place vfmbench sets them.
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}


# ---------------------------------------------------------------------------------------------
# Component switches


def checkpoint(fn: Callable, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint`` (non-reentrant) of ``fn(*args, **kwargs)`` when gradients
    are being recorded; a plain call otherwise (inference keeps no activations anyway)."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint as _checkpoint

    return _checkpoint(fn, *args, use_reentrant=False, **kwargs)


def set_grad_checkpointing(module: nn.Module, enabled: bool, what: str) -> None:
    """Ask ``module`` (described as ``what`` in errors) to checkpoint its heavy blocks."""
    fn = getattr(module, "set_grad_checkpointing", None)
    if fn is None:
        if not enabled:
            return
        raise UserError(
            f"{what} does not support gradient checkpointing (it has no set_grad_checkpointing method); "
            "remove --set run.grad_checkpointing=true, or pick a component that supports it (docs/performance.md)"
        )
    fn(bool(enabled))


def set_channels_last(module: nn.Module, enabled: bool) -> bool:
    """Switch ``module`` to channels-last where it declares support; returns whether it did."""
    fn = getattr(module, "set_channels_last", None)
    if fn is None:
        return False
    fn(bool(enabled))
    return True


def to_channels_last(module: nn.Module, enabled: bool) -> None:
    """Convert the 4-D parameters and buffers of ``module`` to channels-last (or back to contiguous)."""
    module.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)


def channels_last_input(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.ndim == 4 else x


def compile_targets(module: nn.Module) -> list[nn.Module]:
    """The modules ``run.compile`` compiles: ``module.compile_targets()`` when defined, else ``module``."""
    fn = getattr(module, "compile_targets", None)
    return list(fn()) if fn is not None else [module]


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_module(module: nn.Module, mode: str, backend: str = "inductor") -> list[str]:
    """Compile ``compile_targets(module)`` in place (``nn.Module.compile``); idempotent. Returns the
    class names of the modules compiled by this call."""
    check_compile(mode, backend)
    if mode == "off":
        return []
    done = []
    for m in compile_targets(module):
        if is_compiled(m):
            continue
        m.compile(backend=backend, mode=None if mode == "default" or backend != "inductor" else mode)
        done.append(type(m).__name__)
    return done


# ---------------------------------------------------------------------------------------------
# Peak memory


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window on a CUDA device (the CPU peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def process_peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_memory(device: torch.device | str) -> dict[str, Any]:
    """Peak memory since the last ``reset_peak_memory``: ``peak_memory_gib`` and what it measures.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors; ``peak_memory_reserved_gib`` adds the caching
    allocator's reserve). CPU: the process's peak RSS, a lifetime peak that no stage can reset, so a
    later stage reports at least the value of an earlier one.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return {
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 4),
            "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 4),
            "peak_memory_kind": "cuda max_memory_allocated since stage start",
        }
    return {"peak_memory_gib": round(process_peak_rss_bytes() / GIB, 4), "peak_memory_kind": "cpu process peak RSS (process lifetime, not per stage)"}


# ---------------------------------------------------------------------------------------------
# Stage start


def begin_stage(run: Any, device: torch.device | str) -> None:
    """At the start of every stage: process-wide numerics from ``run`` (``run.tf32``) and a fresh peak-memory window."""
    apply_process_settings(run.tf32)
    reset_peak_memory(device)
