"""AITER-style closeness metrics shared by the fused-MoE tests (torch and Triton backends).

Low-precision paths are judged like AITER's `checkAllclose`: a small fraction of elements may
fall outside rtol/atol (rounding boundaries flip for a few), and the whole output must agree in
direction: `1 - 2*sum(x*y) / sum(x^2 + y^2)` (0 for equal tensors, 1 for orthogonal ones).
"""

from __future__ import annotations

import torch


def mismatch_fraction(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-2, atol: float = 1e-2) -> float:
    """Fraction of elements with |out - ref| > atol + rtol * |ref| (NaN counts as a mismatch)."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    o, r = out.double(), ref.double()
    ok = (o - r).abs() <= atol + rtol * r.abs()
    return 1.0 - ok.double().mean().item()


def cos_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """1 - 2*sum(xy) / sum(x^2 + y^2), in fp64; 0 when both are all zeros."""
    x, y = out.double().flatten(), ref.double().flatten()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return (1 - 2 * (x * y).sum() / denom).item()


def assert_close_aiter(
    out: torch.Tensor,
    ref: torch.Tensor,
    *,
    rtol: float = 1e-2,
    atol: float = 1e-2,
    max_mismatch: float = 0.05,
    max_cos_diff: float = 1e-2,
) -> None:
    """Assert: no NaN, at most `max_mismatch` of elements outside rtol/atol, cos_diff small."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(out.shape)} vs {tuple(ref.shape)}")
    assert not torch.isnan(ref).any(), "reference has NaN (bad test input)"
    assert not torch.isnan(out).any(), "output has NaN"
    frac = mismatch_fraction(out, ref, rtol, atol)
    cd = cos_diff(out, ref)
    err = (out.double() - ref.double()).abs()
    where = f"max abs err {err.max().item():.3g}" if err.numel() else "empty"
    assert frac <= max_mismatch, f"{frac:.1%} of elements outside rtol={rtol}, atol={atol} ({where})"
    assert cd <= max_cos_diff, f"cos diff {cd:.3g} > {max_cos_diff} ({where})"

