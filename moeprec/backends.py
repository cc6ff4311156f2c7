"""The one place that maps a `backend` argument and a device to an implementation: the pure-torch
reference ("torch") or the Triton kernels ("triton"). Used by the quantizers and by fused_moe."""

from __future__ import annotations

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


def resolve_backend(
    backend: str, device: torch.device, kernel_module: str | None = None, available: bool | None = None
) -> str:
    """"auto" -> "triton" on CUDA when Triton (and `kernel_module`) is there, else "torch".

    "triton" off CUDA needs TRITON_INTERPRET=1 (that is how CI tests the kernels on CPU).
    `available`: `triton_available(kernel_module)` decided beforehand, for callers traced by
    torch.compile (which cannot trace the import machinery).
    """
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if available is None:
            available = triton_available(kernel_module)
        return "triton" if available else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpret():
        raise ValueError(
            f"backend: 'triton' runs on CUDA tensors, or on CPU with TRITON_INTERPRET=1; got "
            f"tensors on {device} without it (use backend='torch' or 'auto')"
        )
    return backend
