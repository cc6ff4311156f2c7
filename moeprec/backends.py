"""The one place that maps a `backend` argument and a device to an implementation: the pure-torch
reference ("torch") or the Triton kernels ("triton"). Used by the quantizers and by fused_moe."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from moeprec._validation import check_choice

BACKENDS = ("auto", "torch", "triton")


def triton_interpret() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available(kernel_module: str | None = None) -> bool:
    """Triton is installed (and, when named, the moeprec kernel module that needs it is present)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return kernel_module is None or importlib.util.find_spec(kernel_module) is not None


# The compute capability the fp8 kernels need: e4m3 conversions and MMAs exist from sm_89 (the
# MXFP4 decode blocks convert through e4m3 too). Compiled on CPU for sm_80, they fail in ptxas
# (benchmarks/compile_targets.py, 2026-12-04).
FP8_CAPABILITY = (8, 9)
# programmatic dependent launch (griddepcontrol): sm_90 on
PDL_CAPABILITY = (9, 0)


def needs_fp8(quant: str, act_dtype: str) -> bool:
    """Whether the fused MoE's Triton kernels convert through fp8 for these formats (fp8 or
    MXFP4 weights, fp8 activations), and so need FP8_CAPABILITY."""
    return quant in ("fp8", "mxfp4") or act_dtype == "fp8"


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device (looked up once per device)."""
    device = torch.device(device)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major, props.minor


def resolve_backend(
    backend: str, device: torch.device, kernel_module: str | None = None,
    available: bool | None = None, min_capability: tuple[int, int] | None = None,
) -> str:
    """"auto" -> "triton" on CUDA when Triton (and `kernel_module`) is there, else "torch".

    "triton" off CUDA needs TRITON_INTERPRET=1 (that is how CI tests the kernels on CPU).
    `available`: `triton_available(kernel_module)` decided beforehand, for callers traced by
    torch.compile (which cannot trace the import machinery). `min_capability`: what this call's
    kernels need; on a CUDA device below it "auto" picks "torch" and "triton" raises (checked
    eagerly, not while torch.compile traces).
    """
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if available is None:
            available = triton_available(kernel_module)
        return "triton" if available and not _below(device, min_capability) else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpret():
        raise ValueError(
            f"backend: 'triton' runs on CUDA tensors, or on CPU with TRITON_INTERPRET=1; got "
            f"tensors on {device} without it (use backend='torch' or 'auto')"
        )
    if backend == "triton" and device.type == "cuda" and _below(device, min_capability):
        have = cuda_capability(device)
        raise ValueError(
            f"backend: 'triton' needs a GPU of compute capability {min_capability[0]}."
            f"{min_capability[1]} or later for this call (fp8 conversions); {device} is "
            f"{have[0]}.{have[1]} (use backend='torch' or 'auto')"
        )
    return backend


def _below(device: torch.device, need: tuple[int, int] | None) -> bool:
    if need is None or torch.compiler.is_compiling():
        return False
    return cuda_capability(device) < tuple(need)
