"""The one place that maps a quantizer's `backend` argument and a tensor's device to an
implementation ("torch" reference or "triton" kernels)."""

from __future__ import annotations

import importlib.util
import os

import torch

from moeprec._validation import check_choice

BACKENDS = ("auto", "torch", "triton")


def triton_interpret() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"auto" -> "triton" for CUDA tensors when Triton is installed, else "torch".

    "triton" on a CPU tensor needs TRITON_INTERPRET=1 (that is how CI tests the kernels).
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if x.is_cuda and importlib.util.find_spec("triton") is not None else "torch"
    if backend == "triton" and not x.is_cuda and not triton_interpret():
        raise ValueError(
            f"backend: 'triton' runs on CUDA tensors, or on CPU with TRITON_INTERPRET=1; got a "
            f"tensor on {x.device} without it (use backend='torch' or 'auto')"
        )
    return backend
