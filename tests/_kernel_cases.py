"""Shared by the tests of small Triton kernels: where they run, and poisoned outputs."""

import pytest
import torch

from moeprec.backends import triton_interpret


def kernel_devices(cpu_cases, gpu_cases):
    """pytest params (device, cases): the interpreter on small cases (when TRITON_INTERPRET=1),
    CUDA on model-size ones (marked gpu)."""
    out = []
    if triton_interpret():
        out.append(pytest.param("cpu", cpu_cases, marks=pytest.mark.interpret))
    out.append(pytest.param("cuda", gpu_cases, marks=pytest.mark.gpu))
    return out


def nan_empty(shape, dtype, device):
    """An output allocation full of NaN, to swap in for a kernel module's `_empty`: an element the
    kernel does not write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
